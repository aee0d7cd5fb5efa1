"""Send at once when nothing is queued: the one place that touches transport internals.

Twisted's `transport.write` always queues and sends on the next reactor iteration, which
costs an epoll_ctl pair and a loop turn per write. When a plain TCP transport has nothing
queued, `socket.send` now is equivalent and about twice as fast on the proxy path
(FASTPATH-NOTES.md). Whatever the kernel does not take goes through `transport.write`,
so ordering, backpressure (producers) and error handling stay Twisted's. TLS and other
transports always use `transport.write`. `tests/test_fastwrite.py` fails loudly if the
Twisted internals this relies on change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp

__all__ = ["writer_for"]

_PLAIN_TCP = (tcp.Server, tcp.Client)


def writer_for(transport: Any) -> Callable[[bytes], None]:
    """A `write(data)` for `transport` that sends immediately when it safely can."""
    if type(transport) not in _PLAIN_TCP or not hasattr(transport, "_tempDataBuffer"):
        return transport.write
    send = transport.socket.send
    queued_write = transport.write

    def write(data: bytes) -> None:
        if (not transport._tempDataBuffer and not transport.dataBuffer and transport.connected
                and not transport.disconnecting and not transport._writeDisconnected):
            try:
                sent = send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0   # let Twisted's own write path meet and report the error
            if sent == len(data):
                return
            data = data[sent:]
        queued_write(data)

    return write
