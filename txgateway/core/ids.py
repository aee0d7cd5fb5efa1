"""Request identities the gateway vouches for: the correlation id and the W3C trace context."""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = ["correlation_id", "new_uuid4", "trace_flags", "traceparent"]

_CORRELATION_ID: Final = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")
_TRACEPARENT: Final = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def new_uuid4(random: bytes) -> str:
    """A UUID4 string from 16 random bytes (str(uuid.uuid4()) costs 3x more)."""
    h = random.hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[random[8] & 3]}{h[17:20]}-{h[20:32]}"


def correlation_id(value: bytes | None, random: bytes | None = None) -> str:
    """Keep a well-formed client id (1-128 of [A-Za-z0-9._-]), else a new UUID4."""
    if value is not None and _CORRELATION_ID.match(value):
        return value.decode("ascii")
    return new_uuid4(random or os.urandom(16))


def traceparent(value: bytes | None, random: bytes | None = None, new_flags: bytes = b"01") -> bytes:
    """W3C trace context: continue the caller's trace with a new span id, or start one with
    `new_flags` (sampled, unless a tracer that records the traces it samples says otherwise).

    `random` supplies 24 random bytes (trace id, span id) so a request needs one getrandom.
    """
    ids = (random or os.urandom(24))[:24].hex().encode()    # trace id, span id: one hex for both
    if value is not None:
        match = _continued(value)
        if match is not None:
            return b"".join((b"00-", match.group(2), b"-", ids[32:], b"-", match.group(4)))
    return b"".join((b"00-", ids[:32], b"-", ids[32:], b"-", new_flags))


def trace_flags(value: bytes) -> int | None:
    """The flags of a `traceparent` that `traceparent` would continue; None for one it replaces."""
    match = _continued(value)
    return None if match is None else int(match.group(4), 16)


def _continued(value: bytes) -> re.Match[bytes] | None:
    match = _TRACEPARENT.match(value.strip())
    if match and match.group(1) != b"ff" and match.group(2) != b"0" * 32 and match.group(3) != b"0" * 16:
        return match
    return None
