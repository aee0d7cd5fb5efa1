"""Which headers belong to one connection rather than to the message, in one place.

Hop-by-hop headers (RFC 9110 7.6.1, and every `Proxy-*`) describe a single connection and are
never forwarded; the framing headers are rewritten by each side for its own connection. A
transport takes these out of a request before any filter sees it (with `Host` and `Expect`,
which it turns into context fields), and the upstream side takes them out of a response.
"""

from __future__ import annotations

from typing import Final

__all__ = ["HOP_BY_HOP", "NO_FIELDS", "NO_FRAMING", "NO_TOKENS", "REQUEST_CONSUMED", "RESPONSE_CONSUMED", "FieldNames",
           "consumed_by_transport"]

HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                               b"proxy-connection", b"proxy-authenticate", b"proxy-authorization"})
# Taken out of a request by the transport: filters never see them.
REQUEST_CONSUMED: Final = HOP_BY_HOP | {b"content-length", b"host", b"expect"}
# Taken out of an upstream's response before the response hooks.
RESPONSE_CONSUMED: Final = HOP_BY_HOP | {b"content-length"}

# What a connection's parser state points to between messages, so that a message's lists go
# when it has been read (in the cache) rather than when the next one begins: after hundreds of
# other requests at 256 connections (docs/performance.md). Each message begins with new ones;
# nothing adds to these.
NO_FIELDS: Final[list[tuple[bytes, bytes]]] = []
NO_FRAMING: Final[dict[bytes, bytes]] = {}
NO_TOKENS: Final[list[bytes]] = []


def consumed_by_transport(name: bytes) -> bool:
    """Whether a request header (lower case) never reaches the filters."""
    return name in REQUEST_CONSUMED or name.startswith(b"proxy-")


class FieldNames:
    """Field names lower-cased, the same objects as the last head's at the same place. A
    parser hands a new bytes object per field: its `lower()` (a generic method call) and the
    first hash of the result cost ~500 instructions, a dict keyed by the raw name as much (its
    hash, then a compare); peers send the same names in the same order head after head, and one
    compare with the last head's name at that place costs ~50, the lower-case object's hash kept
    for every later set or dict lookup. One per side (every client connection's, every upstream
    connection's), not one per connection: a connection's own was cold by its next head at 256
    connections (docs/performance.md, "foot"). Peers sending other names at a place cost a
    `lower()` each time they alternate, never a wrong name."""

    __slots__ = ("raw", "low")

    def __init__(self) -> None:
        self.raw: list[bytes] = []
        self.low: list[bytes] = []

    def lower(self, name: bytes, place: int) -> bytes:
        """`name.lower()`; `place`: the field's place in its head (any count that repeats with
        the head)."""
        raw = self.raw
        if place < len(raw):
            if raw[place] == name:
                return self.low[place]
            low = name.lower()
            raw[place] = name
            self.low[place] = low
            return low
        low = name.lower()
        if place == len(raw) and place < _PLACES:
            raw.append(name)
            self.low.append(low)
        return low


_PLACES: Final = 64     # fields remembered per connection
