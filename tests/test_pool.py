"""TargetPool's queue of requests waiting for a free slot, on a MemoryReactor (no sockets:
when a connection attempt ends is up to the test)."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure

from txgateway.config.schema import Target, Upstream
from txgateway.upstream.pool import TargetPool


class User:
    """An UpstreamUser recording what the pool tells it."""

    connect_timeout = 5.0            # the backstop of its connect attempts

    def __init__(self) -> None:
        self.calls: list[str] = []

    def connecting(self) -> None:
        self.calls.append("connecting")

    def connected(self, conn: Any) -> None:
        self.calls.append("connected")

    def connect_failed(self, reason: Failure) -> None:
        self.calls.append("connect_failed")


def test_a_waiter_is_told_when_its_connection_attempt_starts():
    reactor = MemoryReactor()
    target = Target("http://127.0.0.1:9", "127.0.0.1", 9)
    pool = TargetPool(reactor, target, Upstream("users", (target,), max_connections=1))
    first, second = User(), User()
    pool.acquire(first)
    pool.acquire(second)                       # the only slot is taken: it waits
    assert len(reactor.tcpClients) == 1 and list(pool.waiting) == [second]
    factory = reactor.tcpClients[0][2]
    pool.connect_failed(factory, Failure(ConnectionRefusedError()))
    # The slot is free: the waiter's attempt starts now, and it hears so (its connect deadline starts again).
    assert first.calls == ["connect_failed"] and second.calls == ["connecting"]
    assert len(reactor.tcpClients) == 2 and not pool.waiting
    assert pool.forget(second) is False        # no longer waiting: its attempt is under way
    third = User()
    pool.acquire(third)
    pool.acquire(User())
    assert pool.forget(third) is False and len(reactor.tcpClients) == 3
