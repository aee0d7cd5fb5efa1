"""Requests the gateway makes itself (JWKS, health checks): a connection pool that keeps
quiet, and reading bodies bounded: a misbehaving server can make the gateway wait (callers
bound that), never fill its memory."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

__all__ = ["quiet_pool", "read_body"]


def quiet_pool(reactor: Any) -> Any:
    """An HTTPConnectionPool without keep-alive whose connections log nothing. Twisted's
    factory for them logs "Starting factory ..." and "Stopping factory ..." for each one:
    with health checks, two lines per target and interval, most of the gateway's log."""
    from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory

    class QuietFactory(_HTTP11ClientFactory):
        noisy = False

    pool = HTTPConnectionPool(reactor, persistent=False)
    pool._factory = QuietFactory      # the pool's documented (if private) factory hook
    return pool


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
