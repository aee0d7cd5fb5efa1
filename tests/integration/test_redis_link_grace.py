"""A Redis reply already read is never taken for a timeout, even when the gateway is busy at
the moment the timeout falls due: txredisapi hands out the replies of one read a reactor turn
apart, and the link waits while they keep coming (RedisLink._bound)."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater

from txgateway.filters.ratelimit.redisconfig import RedisConfig
from txgateway.filters.ratelimit.redislink import RedisLink


class _SlowPairRedis(Protocol):
    """Answers PING; holds two GETs and answers both 0.25 s later in one write."""

    factory: Any

    def dataReceived(self, data: bytes) -> None:
        for part in data.split(b"*")[1:]:
            if b"PING" in part.upper():
                self.transport.write(b"+PONG\r\n")
            elif b"GET" in part.upper():
                self.factory.gets += 1
                if self.factory.gets == 2:
                    sock = self.transport.socket
                    threading.Timer(0.25, lambda: sock.send(b"$1\r\na\r\n$1\r\nb\r\n")).start()
            else:
                self.transport.write(b"+OK\r\n")


@pytest_twisted.ensureDeferred
async def test_replies_of_one_read_are_not_timeouts_when_the_gateway_is_busy(reactor):
    factory = Factory.forProtocol(_SlowPairRedis)
    factory.gets = 0
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    link = RedisLink(RedisConfig(port=port.getHost().port, timeout=0.2, pool_size=1), reactor)
    try:
        link.start()
        await deferLater(reactor, 0.3, lambda: None)
        results: list[tuple[str, str, Any]] = []
        for key in ("a", "b"):
            link.call("get", key).addCallbacks(lambda v, k=key: results.append((k, "answer", v)),
                                               lambda f, k=key: results.append((k, "failed", f.getErrorMessage())))
        reactor.callLater(0.2, time.sleep, 0.3)       # busy exactly when the timeout falls due
        await deferLater(reactor, 0.8, lambda: None)
        assert results == [("a", "answer", "a"), ("b", "answer", "b")]
        assert link.up and link.errors == 0
    finally:
        await link.stop()
        await port.stopListening()
