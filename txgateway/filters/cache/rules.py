"""RFC 9111 arithmetic: Cache-Control directives, HTTP dates, freshness lifetime and age.

Pure functions over header lists (lower-case names, as filters see them), so every rule is
testable without a request. Numbers are clamped: a `max-age` of 2^64, a negative one or
"soon" never raise, they mean what the RFC says (the largest delta, or invalid = stale).
"""

from __future__ import annotations

import calendar
from email.utils import formatdate, parsedate_tz
from typing import Final

__all__ = [
    "DEFAULT_CACHEABLE", "MAX_DELTA", "Directives", "directives", "field_values", "http_date",
    "members", "parse_delta", "parse_directives", "parse_http_date",
]

MAX_DELTA: Final = 2**31   # RFC 9111 §1.2.2: larger delta-seconds are taken as this
# RFC 9110 §15.1: statuses cacheable by default (206 is left out: ranges pass through).
DEFAULT_CACHEABLE: Final = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})


def field_values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The comma-separated members of every `name` field, stripped, empty ones dropped."""
    return members([value for key, value in headers if key == name])


def members(values: list[bytes]) -> list[bytes]:
    """The comma-separated members of these field values, stripped, empty ones dropped."""
    out: list[bytes] = []
    for value in values:
        out.extend(p.strip() for p in value.split(b",") if p.strip())
    return out


def parse_delta(value: bytes | None) -> int | None:
    """delta-seconds: None when invalid (callers treat that as stale / not acceptable)."""
    if value is None:
        return None
    value = value.strip().strip(b'"')
    if not value.isdigit():
        return None
    n = int(value)
    return MAX_DELTA if n > MAX_DELTA else n


_DATES: Final[dict[bytes, float | None]] = {}   # parse_http_date's memory: values seen lately
_DATES_KEPT: Final = 64


class _LastDate:
    """The value parse_http_date saw last: comparing with it costs less than hashing a new one."""

    __slots__ = ("value", "when")

    def __init__(self) -> None:
        self.value = b""
        self.when: float | None = None


_LAST: Final = _LastDate()


def parse_http_date(value: bytes | None) -> float | None:
    """Seconds since the epoch, None if not a date. Remembered: parsing costs a miss more than
    all the rest of its storing, and every response of one second carries the same `Date`."""
    if value is None:
        return None
    last = _LAST
    if value == last.value:
        return last.when
    if value in _DATES:
        when = _DATES[value]
    else:
        if len(_DATES) >= _DATES_KEPT:
            _DATES.clear()
        when = _DATES[value] = _parse_http_date(value)
    last.value, last.when = value, when
    return when


def _parse_http_date(value: bytes) -> float | None:
    try:
        parts = parsedate_tz(value.decode("latin-1"))
    except (ValueError, IndexError, TypeError):
        return None
    if parts is None:
        return None
    try:
        return float(calendar.timegm((*parts[:6], 0, 0, 0)) - (parts[9] or 0))
    except (ValueError, OverflowError, TypeError):
        return None


def http_date(t: float) -> bytes:
    return formatdate(t, usegmt=True).encode()


class Directives:
    """One message's Cache-Control directives (names lower case; values unquoted)."""

    __slots__ = ("d",)

    def __init__(self, d: dict[bytes, bytes | None]) -> None:
        self.d = d

    def __contains__(self, name: bytes) -> bool:
        return name in self.d

    def delta(self, name: bytes) -> int | None:
        """The directive's delta-seconds; None if absent or invalid. A repeated or malformed
        directive counts as invalid (RFC 9111 §4.2.1: the response is then stale)."""
        return parse_delta(self.d.get(name))

    def has_valid(self, name: bytes) -> bool:
        return name in self.d and self.delta(name) is not None


def directives(headers: list[tuple[bytes, bytes]]) -> Directives:
    return parse_directives([v for k, v in headers if k == b"cache-control"])


def parse_directives(values: list[bytes]) -> Directives:
    """The directives of these Cache-Control field values."""
    d: dict[bytes, bytes | None] = {}
    seen: set[bytes] = set()
    for item in members(values):
        name, eq, value = item.partition(b"=")
        name = name.strip().lower()
        v = value.strip() if eq else None
        if v is not None and v.startswith(b'"'):
            v = v.strip(b'"')
        if name in seen and name in (b"max-age", b"s-maxage"):
            d[name] = b"invalid"         # conflicting lifetimes: treat as stale
            continue
        seen.add(name)
        d[name] = v
    return Directives(d)
