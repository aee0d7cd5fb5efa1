"""One periodic sweep for every deadline in the gateway.

A `callLater` per request costs a heap entry and a cancel on the hot path; a sweep every
`interval` over the objects that currently have a deadline costs nothing per request.
Deadlines are set from `now`, the time of the last sweep, so arming one does not even read
the clock. Deadlines are therefore honoured within `interval` (100 ms by default).
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.task import LoopingCall

__all__ = ["Deadlines", "HasDeadline"]


class HasDeadline(Protocol):
    deadline: float

    def expired(self) -> None:
        """The deadline passed; the object was already removed from the sweep."""


class Deadlines:
    def __init__(self, clock: Any, interval: float = 0.1) -> None:
        self.clock = clock
        self.interval = interval
        self.now: float = clock.seconds()  # refreshed by every sweep
        self._items: set[HasDeadline] = set()
        self._loop = LoopingCall(self._sweep)
        self._loop.clock = clock
        self.add = self._items.add
        self.discard = self._items.discard

    def start(self) -> None:
        self.now = self.clock.seconds()
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _sweep(self) -> None:
        self.now = now = self.clock.seconds()
        due = [item for item in self._items if item.deadline <= now]
        for item in due:
            if item in self._items:
                self._items.discard(item)
                item.expired()
