"""The places that lean on Twisted and pyOpenSSL internals: pinned, so an upgrade fails loudly here."""

from __future__ import annotations

import hashlib
import inspect
import socket

import pytest_twisted
from OpenSSL import SSL
from twisted.internet import abstract, epollreactor, posixbase, tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols import policies, tls

from tests.conftest import listen
from txgateway.core.fastwrite import writer_for
from txgateway.core.reactor import make_lean

# sha256 prefixes of the Twisted 26.10 sources that core/fastwrite.py / core/reactor.py rely on.
# If one changes, re-read the new source, adapt the module, then update the pin.
PINNED = {
    epollreactor.EPollReactor.doPoll: "09b62ae68ef01b4b",
    posixbase._PollLikeMixin._doReadOrWrite: "5ffee55b79492b00",
    tcp.Connection.doRead: "20ac74ffecd6b7f2",
    tcp.Connection._dataReceived: "7ed147aeca0c7f8a",
    abstract.FileDescriptor.write: "3e46c97fc173bc7e",
    abstract.FileDescriptor.doWrite: "a986d7b1b1054e43",
    # transport/tls.py overrides or calls these, and reads the flags they set (_handshakeDone,
    # _appSendBuffer, disconnecting, _lostTLSConnection, _aborted) to know when its compiled
    # data path (tlsbio.DataPath) may run; wrappedProtocol is a property there.
    tls.TLSMemoryBIOProtocol._flushSendBIO: "c034168e4f0faf2c",
    tls.TLSMemoryBIOProtocol._flushReceiveBIO: "b45e129f60c44862",
    tls.TLSMemoryBIOProtocol.dataReceived: "0c9326eac628dc89",
    tls.TLSMemoryBIOProtocol.connectionLost: "db44a0b303d81d19",
    tls.TLSMemoryBIOProtocol.makeConnection: "c83b193e6cb07f9f",
    tls.TLSMemoryBIOProtocol._checkHandshakeStatus: "3902da2549f56145",
    tls.TLSMemoryBIOProtocol.write: "e029bcaebbb754c2",
    tls.TLSMemoryBIOProtocol._write: "b795cc8e83620d7d",
    tls.TLSMemoryBIOProtocol._bufferedWrite: "88a1032b1e8fa054",
    tls.TLSMemoryBIOProtocol._unbufferPendingWrites: "c2b342c0a2c72978",
    tls.TLSMemoryBIOProtocol._shutdownTLS: "f72004ba90a03215",
    tls.TLSMemoryBIOProtocol._tlsShutdownFinished: "e78b042366fe0af0",
    tls.TLSMemoryBIOProtocol.loseConnection: "5681a9bd1bd76930",
    tls.TLSMemoryBIOProtocol.abortConnection: "3b083442ea198088",
    policies.ProtocolWrapper.__init__: "ba28d8c44e706b36",
    # transport/tlsbio.py reads the SSL object and memory BIOs pyOpenSSL makes here, reads
    # like these, and hands a failed call's result to _raise_ssl_error (transport/tls.py).
    SSL.Connection.__init__: "3161e88318ab2413",
    SSL.Connection.bio_read: "bc83763ed40fc664",
    SSL.Connection.recv: "84b0e9671ae37797",
    SSL.Connection._raise_ssl_error: "04b0d7964c73ea9e",
}


def test_twisted_internals_we_rely_on_are_unchanged():
    for func, digest in PINNED.items():
        source = inspect.getsource(func)
        assert hashlib.sha256(source.encode()).hexdigest()[:16] == digest, func.__qualname__


class Collect(Protocol):
    def connectionMade(self):
        self.factory.conns.append(self)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    sock.settimeout(10)
    data = b""
    while len(data) < size:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        data += chunk
    return data


async def _accepted(reactor) -> tuple[object, socket.socket, object]:
    """A listening port, a blocking client socket connected to it, and the server transport."""
    factory = Factory.forProtocol(Collect)
    factory.conns = []
    port = await listen(reactor, factory)
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port.getHost().port))
    while not factory.conns:
        await deferLater(reactor, 0.01, lambda: None)
    return port, client, factory.conns[0].transport


@pytest_twisted.ensureDeferred
async def test_writes_of_a_turn_leave_together_and_the_rest_queues_in_order(reactor):
    port, client, transport = await _accepted(reactor)
    try:
        write, _ = writer_for(transport)
        big = bytes(range(256)) * 40000  # ~10 MB: more than the kernel takes at once
        write(b"first")
        write(big)
        # Held for the end of the turn: nothing sent or queued in Twisted's buffer yet.
        assert not transport._tempDataBuffer and not transport.dataBuffer
        await deferLater(reactor, 0, lambda: None)
        assert transport._tempDataBuffer or transport.dataBuffer, "the remainder must be queued, not dropped"
        write(b"last")   # behind Twisted's queued bytes
        expected = b"first" + big + b"last"
        received = await deferToThread(_read_exactly, client, len(expected))
        assert received == expected
    finally:
        client.close()
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_flush_sends_at_once_so_a_close_can_follow(reactor):
    port, client, transport = await _accepted(reactor)
    try:
        write, flush = writer_for(transport)
        write(b"head ")
        flush()
        client.settimeout(10)
        assert client.recv(100) == b"head "       # sent by flush(), not at the end of the turn
        write(b"body")
        flush()                                   # what a writer does before loseConnection
        transport.loseConnection()
        received = await deferToThread(_read_exactly, client, 100)
        assert received == b"body"                # ...then EOF
    finally:
        client.close()
        await port.stopListening()


def test_lean_reactor_patch_applies_only_to_epoll():
    class NotEpoll:
        pass
    assert make_lean(NotEpoll()) is False
    reactor = epollreactor.EPollReactor()
    try:
        assert make_lean(reactor) is True
        assert reactor.doIteration is reactor.doPoll
        reactor.doPoll(0)  # polls an empty set without error
    finally:
        reactor._poller.close()


def test_lean_loop_reads_closes_and_fails_like_twisted():
    reactor = epollreactor.EPollReactor()
    assert make_lean(reactor)
    received: list[bytes] = []
    lost: list = []

    class Recorder(Protocol):
        def connectionMade(self):
            self.write, _ = writer_for(self.transport)

        def dataReceived(self, data):
            received.append(data)
            if data == b"boom":
                raise RuntimeError("a bug in the protocol")
            self.write(b"echo:" + data)     # held, then flushed by the loop itself before it polls

        def connectionLost(self, reason):
            lost.append(reason)

    def spin(done):
        for _ in range(500):
            reactor.runUntilCurrent()
            reactor.doIteration(0.01)
            if done():
                return
        raise AssertionError("the lean loop did not deliver the event")

    port = reactor.listenTCP(0, Factory.forProtocol(Recorder), interface="127.0.0.1")
    try:
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        client.sendall(b"hello")
        spin(lambda: received)
        assert received == [b"hello"]
        assert not reactor.getDelayedCalls()        # no callLater(0): the lean loop flushes
        reactor.doIteration(0)
        client.settimeout(5)
        assert client.recv(100) == b"echo:hello"
        client.close()                              # an empty read: the connection is done
        spin(lambda: lost)
        assert lost[0].check(ConnectionDone)
        other = socket.create_connection(("127.0.0.1", port.getHost().port))
        other.sendall(b"boom")                      # the protocol raises: logged, connection lost
        spin(lambda: len(lost) == 2)
        assert lost[1].check(RuntimeError)
        other.settimeout(5)
        assert other.recv(10) == b""                # ...and the socket is closed
        other.close()
    finally:
        port.stopListening()
        for _ in range(5):
            reactor.runUntilCurrent()
            reactor.doIteration(0)
        reactor._poller.close()
