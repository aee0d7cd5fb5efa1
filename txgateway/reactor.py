"""A leaner epoll loop: dispatch I/O events without the per-event logging context.

Twisted's `EPollReactor.doPoll` wraps every event in `log.callWithLogger`, which sets up a
legacy log-prefix context (three nested calls and a dict copy per event). At tens of
thousands of events per second that is measurable (FASTPATH-NOTES.md); exceptions are
caught and logged by `_doReadOrWrite` either way, so only the legacy log prefix is lost.
`tests/test_fastpaths.py` pins the Twisted source this copies, so an upgrade that changes
it fails loudly instead of silently diverging.
"""

from __future__ import annotations

import errno
from typing import Any

__all__ = ["make_lean"]


def make_lean(reactor: Any) -> bool:
    """Patch a running EPollReactor instance in place; False (no change) for others."""
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover - non-Linux
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
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
            if selectable is not None:
                dispatch(selectable, fd, event)

    reactor.doPoll = doPoll  # type: ignore[method-assign]
    reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True
