"""Writes of one reactor turn, sent together just before the reactor waits again.

The one place that touches transport internals. Twisted's `transport.write` queues and
sends on a later iteration, after an epoll_ctl pair per write. Sending at once
(`socket.send`) avoids that, but under load it wakes the peer (wrk, the upstream) once per
write: on this 2-vCPU VM every such wake-up is an inter-processor interrupt, and kernel time
was a quarter of the gateway's CPU. So a turn's writes are held per transport and flushed
together just before the reactor's next poll (by the lean loop of reactor.py, else by one
`callLater(0)`): the peers wake once per turn instead of once per write (kernel time per request 22-25 us -> 9-16 us,
docs/performance.md). Whatever the kernel does not take goes through `transport.write`,
so ordering, backpressure (producers) and error handling stay Twisted's. A transport that
batches its own way says so with `batched_writers()` (the listeners' TLS, transport/tls.py:
its ciphertext joins this batch); other transports use `transport.write`. `tests/test_fastpaths.py` fails loudly if the
Twisted internals this relies on change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

__all__ = ["BatchedWriter", "turn_for", "writer_for"]

_PLAIN_TCP = (tcp.Server, tcp.Client)


class _Turn:
    """The writers holding data in this reactor turn, and the one call that flushes them.

    The lean loop (reactor.py) calls `flush` itself before each poll (`in_poll`); on any
    other reactor a `callLater(0)` does, which also runs before the next poll.
    """

    __slots__ = ("reactor", "writers", "scheduled", "in_poll")

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.writers: list[BatchedWriter] = []
        self.scheduled = False
        self.in_poll = False

    def add(self, writer: BatchedWriter) -> None:
        self.writers.append(writer)
        if not self.scheduled and not self.in_poll:
            self.scheduled = True
            self.reactor.callLater(0, self.flush)

    def flush(self) -> None:
        self.scheduled = False
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.flush()


_turns: dict[int, _Turn] = {}   # one per reactor (tests may run several)


def turn_for(reactor: Any) -> _Turn:
    """The write batch of `reactor`."""
    turn = _turns.get(id(reactor))
    if turn is None or turn.reactor is not reactor:
        turn = _turns[id(reactor)] = _Turn(reactor)
    return turn


class BatchedWriter:
    """`write(data)` for one plain TCP transport: held until the end of the turn, then sent."""

    __slots__ = ("state", "send", "queued_write", "held", "turn")

    def __init__(self, transport: Any) -> None:
        # The transport's attributes, read from its live `__dict__`: a lookup there costs a
        # third of a generic attribute read (~200 instructions; seven a request and side).
        # The class's defaults (`dataBuffer`, `disconnecting`, `_writeDisconnected`) are
        # falsy, so a name not set on the instance yet reads as None.
        self.state: dict[str, Any] = transport.__dict__
        self.send = transport.socket.send
        self.queued_write = transport.write
        self.held: list[bytes] = []
        self.turn = turn_for(transport.reactor)

    def write(self, data: bytes) -> None:
        held = self.held
        if held:
            held.append(data)
        elif self.state["_tempDataBuffer"] or self.state.get("dataBuffer"):
            self.queued_write(data)    # Twisted holds older bytes: keep the order
        elif data:
            held.append(data)
            self.turn.add(self)

    def flush(self) -> None:
        """Send what this turn wrote, now (also before bytes take another path: tunnels)."""
        held = self.held
        if not held:
            return
        data = held[0] if len(held) == 1 else b"".join(held)
        held.clear()
        state = self.state
        if (not state["_tempDataBuffer"] and not state.get("dataBuffer") and state.get("connected")
                and not state.get("disconnecting") and not state.get("_writeDisconnected")):
            try:
                sent: int = self.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0   # let Twisted's own write path meet and report the error
            if sent == len(data):
                return
            data = data[sent:]
        self.queued_write(data)


def writer_for(transport: Any) -> tuple[Callable[[bytes], None], Callable[[], None]]:
    """`(write, flush)` for `transport`: batched per turn for plain TCP, the transport's own
    `batched_writers()` where it has them, else Twisted's write."""
    if type(transport) not in _PLAIN_TCP or not hasattr(transport, "_tempDataBuffer"):
        own = getattr(transport, "batched_writers", None)   # a transport with a batched path of its own
        if own is not None:
            return own()                                     # type: ignore[no-any-return]
        return transport.write, _nothing
    writer = BatchedWriter(transport)
    return writer.write, writer.flush


def _nothing() -> None:
    """Twisted's write path needs no flush."""
