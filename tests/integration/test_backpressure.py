"""Streaming with backpressure: a slow reader pauses the fast writer, both directions."""

from __future__ import annotations

import socket

import pytest_twisted
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from tests.conftest import listen, simple_config

TOTAL = 64 * 2**20
CHUNK = 64 * 1024


@implementer(IPushProducer)
class FloodServer(Protocol):
    """Upstream that writes a huge Content-Length body as fast as its transport lets it."""

    written = 0

    def dataReceived(self, data):
        if b"\r\n\r\n" not in data:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % TOTAL)
        self.paused = False
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False
        while not self.paused and FloodServer.written < TOTAL:
            self.transport.write(b"x" * CHUNK)
            FloodServer.written += CHUNK

    def stopProducing(self):
        self.paused = True


def slow_client(port: int, stall: float) -> tuple[int, bytes]:
    import time
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    s.sendall(b"GET /api/users/big HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    head = s.recv(4096)
    time.sleep(stall)  # a client that stops reading
    total = len(head.partition(b"\r\n\r\n")[2])
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        total += len(data)
    s.close()
    return total, head


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_upstream_instead_of_buffering(reactor, gateway):
    FloodServer.written = 0
    port = await listen(reactor, Factory.forProtocol(FloodServer))
    try:
        gw = await gateway(simple_config(f"http://127.0.0.1:{port.getHost().port}"))
        pending = deferToThread(slow_client, gw.port, 1.5)
        await deferLater(reactor, 1.0, lambda: None)
        # While the client stalls, what left the upstream is bounded by socket buffers
        # plus at most a chunk or two held in the gateway, not the 64 MiB body.
        written_while_stalled = FloodServer.written
        held = sum(len(b) for c in gw.gateway.factory.connections
                   for b in [*c.transport._tempDataBuffer, c.transport.dataBuffer])
        assert written_while_stalled < 24 * 2**20, written_while_stalled
        assert held < 4 * 2**20, held
        total, head = await pending
        assert head.startswith(b"HTTP/1.1 200")
        assert total == TOTAL
    finally:
        await port.stopListening()


class CountingSink(Protocol):
    """Upstream that reads a request body only when told to."""

    instances: list[CountingSink] = []

    def connectionMade(self):
        self.received = 0
        CountingSink.instances.append(self)
        self.transport.pauseProducing()   # not reading: the gateway must hold back

    def dataReceived(self, data):
        if not self.received:
            data = data.partition(b"\r\n\r\n")[2]
        self.received += len(data)
        if self.received >= 32 * 2**20:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


def fast_uploader(port: int, size: int) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=15)
    s.sendall(b"POST /api/users HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"u" * (1 << 20)
    for _ in range(size // len(block)):
        s.sendall(block)
    out = s.recv(4096)
    s.close()
    return out


@pytest_twisted.ensureDeferred
async def test_fast_upload_to_slow_upstream_is_paused_not_buffered(reactor, gateway):
    CountingSink.instances = []
    port = await listen(reactor, Factory.forProtocol(CountingSink))
    try:
        gw = await gateway(simple_config(f"http://127.0.0.1:{port.getHost().port}",
                                         top="limits: {max_body_size: 64MiB}\n"))
        pending = deferToThread(fast_uploader, gw.port, 32 * 2**20)
        await deferLater(reactor, 1.0, lambda: None)
        (upstream,) = CountingSink.instances
        pools = gw.gateway.proxy.groups["users"].pools[0]
        conn = next(iter(gw.gateway.factory.connections))
        assert conn._paused, "client reading was not paused while the upstream is full"
        exchange = conn._queue[0].ctx.forwarding
        up_transport = exchange.conn.transport
        held = sum(len(b) for b in up_transport._tempDataBuffer) + len(up_transport.dataBuffer)
        assert held < 4 * 2**20, held
        assert pools.total == 1
        upstream.transport.resumeProducing()
        out = await pending
        assert out.startswith(b"HTTP/1.1 200")
        assert upstream.received == 32 * 2**20
    finally:
        await port.stopListening()
