"""Reading the body of a response the gateway fetched itself (JWKS, health checks), bounded:
a misbehaving server can make the gateway wait (callers bound that), never fill its memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["read_body"]


def read_body(response: Any, limit: int) -> Deferred[bytes]:
    """The body of a treq response; fails with ValueError past `limit` bytes."""
    import treq
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise ValueError(f"response larger than {limit} bytes")
        chunks.append(data)

    collected: Deferred[Any] = treq.collect(response, collect)
    return collected.addCallback(lambda _: b"".join(chunks))
