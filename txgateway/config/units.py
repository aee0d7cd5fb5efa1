"""Parsing of the config file's human units: durations, sizes and rates.

Each parser raises ValueError with the expected form, so the config loader can name the
file, key and line around it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d)$")
_DURATION_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^(\d+)(B|KB|MB|GB|KiB|MiB|GiB)?$")
_SIZE_BYTES = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
               "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}
_RATE = re.compile(r"^(\d+)/(second|minute|hour|day)$")
_WINDOW_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def parse_duration(text: str) -> float:
    """'250ms', '5s', '1m', '2h', '1d' -> seconds. A bare number has no unit and is refused."""
    match = _DURATION.match(str(text).strip())
    if not match:
        raise ValueError(f'expected a duration like "250ms", "5s" or "1m", got "{text}"')
    return float(match.group(1)) * _DURATION_SECONDS[match.group(2)]


def parse_size(text: str | int) -> int:
    """'10MiB', '16KiB', '512' -> bytes."""
    match = _SIZE.match(str(text).strip())
    if not match:
        raise ValueError(f'expected a size like "512", "16KiB" or "10MiB", got "{text}"')
    return int(match.group(1)) * _SIZE_BYTES[match.group(2)]


@dataclass(frozen=True)
class Rate:
    """A token-bucket rate: `count` tokens per `window` seconds."""

    count: int
    window: int
    text: str

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(str(text).strip())
        if not match:
            raise ValueError(f'expected "N/second|minute|hour|day", got "{text}"')
        count = int(match.group(1))
        if count <= 0:
            raise ValueError(f'expected "N/second|minute|hour|day" with N above zero, got "{text}"')
        return cls(count, _WINDOW_SECONDS[match.group(2)], text.strip())

    @property
    def per_second(self) -> float:
        return self.count / self.window
