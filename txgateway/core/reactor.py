"""A leaner epoll loop: fewer Python frames between epoll and a protocol's dataReceived.

Twisted's `EPollReactor.doPoll` wraps every event in `log.callWithLogger`, which sets up a
legacy log-prefix context (three nested calls and a dict copy per event), then goes through
`_doReadOrWrite` -> `fileno()` -> `doRead` -> `_dataReceived` -> `protocol.dataReceived`.
At tens of thousands of events per second those frames are measurable (docs/performance.md).
Here a plain read event on a TCP connection calls `recv` and the protocol directly, with
Twisted's own handling of what it returns (empty read: connection done; an exception from
the protocol: logged, connection lost); every other event (writes, hang-ups, errors,
listening ports, TLS over anything but TCP) goes through `_doReadOrWrite` unchanged.
`tests/test_fastpaths.py` pins the Twisted sources this copies, so an upgrade that changes
them fails loudly instead of silently diverging.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

__all__ = ["make_lean"]


def make_lean(reactor: Any) -> bool:
    """Patch a running EPollReactor instance in place; False (no change) for others."""
    try:
        from twisted.internet.epollreactor import EPOLLIN, EPollReactor
    except ImportError:  # pragma: no cover - non-Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    from twisted.internet import tcp
    from twisted.internet.main import CONNECTION_DONE
    from twisted.python import log

    from txgateway.core.fastwrite import turn_for

    turn = turn_for(reactor)
    turn.in_poll = True          # the turn's writes are flushed here, not by a callLater(0)
    flush = turn.flush
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite
    disconnect = reactor._disconnectSelectable
    connections = (tcp.Server, tcp.Client)

    def doPoll(timeout: float | None) -> None:
        if turn.writers:
            flush()
        if timeout is None:
            timeout = -1
        try:
            events = poll(timeout, len(selectables))
        except OSError as err:
            if err.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            if event != EPOLLIN or type(selectable) not in connections:
                dispatch(selectable, fd, event)
                continue
            # tcp.Connection.doRead and _dataReceived, inlined.
            try:
                data = selectable.socket.recv(selectable.bufferSize)
            except OSError:
                dispatch(selectable, fd, event)   # Twisted's doRead meets the error again and decides
                continue
            if not data:
                disconnect(selectable, CONNECTION_DONE, True)
                continue
            try:
                selectable.protocol.dataReceived(data)
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
                disconnect(selectable, why, True)

    reactor.doPoll = doPoll  # type: ignore[method-assign]
    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True
