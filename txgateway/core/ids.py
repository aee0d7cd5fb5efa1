"""Request identities the gateway vouches for: the correlation id and the W3C trace context."""

from __future__ import annotations

import os
import re
from typing import Final

__all__ = ["RequestIds", "correlation_id", "trace_flags", "traceparent"]

_CORRELATION_ID: Final = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")
_TRACEPARENT: Final = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")

_PER_BLOCK: Final = 512      # requests' ids drawn by one getrandom
# A request's ids as text: `x` a random hex digit, `v` a random UUID variant digit (RFC 4122:
# 10xx), any other byte itself.
_UUID: Final = b"xxxxxxxx-xxxx-4xxx-vxxx-xxxxxxxxxxxx"
_TRACE: Final = b"00-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-xxxxxxxxxxxxxxxx-"    # then the flags
_X: Final = 0x78
_V: Final = 0x76
# A random byte -> a random hex digit (its low 4 bits) or variant digit (its low 2): a
# translate is a fraction of what hexlify costs a byte.
_HEX: Final = bytes(b"0123456789abcdef"[i & 15] for i in range(256))
_VARIANT: Final = bytes(b"89ab"[i & 3] for i in range(256))


def _laid_out(layout: bytes) -> bytes:
    """`_PER_BLOCK` copies of `layout` with its random digits: random bytes made digits, then
    each other place set a column at a time (a strided copy over the block, nothing per id)."""
    width = len(layout)
    random = os.urandom(width * _PER_BLOCK)
    out = bytearray(random.translate(_HEX))
    for place, char in enumerate(layout):
        if char == _V:
            out[place::width] = random[place::width].translate(_VARIANT)
        elif char != _X:
            out[place::width] = bytes((char,)) * _PER_BLOCK
    return bytes(out)


class RequestIds:
    """New correlation ids (random UUID4s) and new `traceparent`s, made `_PER_BLOCK` at a time:
    a request takes three slices (a UUID's format alone was ~1k instructions a request, its
    random bytes' hex another few hundred)."""

    __slots__ = ("flags", "uuid", "uuid_bytes", "trace", "_uuids", "_uuids_text", "_traces", "_next")

    def __init__(self, flags: bytes = b"01") -> None:
        self.flags = flags             # a new trace's: sampled unless a tracer decides (filters/headers.py)
        self.uuid = ""                 # the last drawn request's, by `draw`
        self.uuid_bytes = b""
        self.trace = b""
        self._uuids = b""
        self._uuids_text = ""
        self._traces = b""
        self._next = _PER_BLOCK

    def draw(self) -> None:
        """The next request's `uuid` (also as `uuid_bytes`) and new `trace`."""
        i = self._next
        if i >= _PER_BLOCK:
            self._fill()
            i = 0
        self._next = i + 1
        at = i * len(_UUID)
        self.uuid = self._uuids_text[at:at + len(_UUID)]
        self.uuid_bytes = self._uuids[at:at + len(_UUID)]
        width = len(_TRACE) + 2
        at = i * width
        self.trace = self._traces[at:at + width]

    def _fill(self) -> None:
        self._uuids = _laid_out(_UUID)
        self._uuids_text = self._uuids.decode("ascii")
        self._traces = _laid_out(_TRACE + self.flags)


_spare: RequestIds | None = None      # for the rare ids made outside the forwarding filter


def correlation_id(value: bytes | None, fresh: str | None = None) -> str:
    """Keep a well-formed client id (1-128 of [A-Za-z0-9._-]), else `fresh`, a new UUID4
    (drawn here when not given)."""
    global _spare
    if value is not None and _CORRELATION_ID.match(value):
        return value.decode("ascii")
    if fresh is None:
        if _spare is None:
            _spare = RequestIds()
        _spare.draw()
        fresh = _spare.uuid
    return fresh


def traceparent(value: bytes | None, new: bytes) -> bytes:
    """W3C trace context: continue the caller's trace with `new`'s span id, or start `new`
    (a `RequestIds.trace`)."""
    if value is not None:
        match = _continued(value)
        if match is not None:
            return b"".join((b"00-", match.group(2), new[35:53], match.group(4)))   # 35:53: "-<span id>-"
    return new


def trace_flags(value: bytes) -> int | None:
    """The flags of a `traceparent` that `traceparent` would continue; None for one it replaces."""
    match = _continued(value)
    return None if match is None else int(match.group(4), 16)


def _continued(value: bytes) -> re.Match[bytes] | None:
    match = _TRACEPARENT.match(value.strip())
    if match and match.group(1) != b"ff" and match.group(2) != b"0" * 32 and match.group(3) != b"0" * 16:
        return match
    return None
