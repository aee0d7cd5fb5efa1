"""A call repeated on the injected clock, started and stopped any number of times."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall

__all__ = ["Periodic"]


class Periodic:
    """`call` every `interval` seconds of `clock` while started (first at once when `now`).

    Start and stop are idempotent: the gateway's child services and reloads may call either
    twice, and tests drive it with task.Clock."""

    def __init__(self, clock: Any, interval: float, call: Callable[[], Any], now: bool = False) -> None:
        self._loop = LoopingCall(call)
        self._loop.clock = clock
        self.interval = interval
        self._now = now

    @property
    def running(self) -> bool:
        return bool(self._loop.running)

    def start(self) -> None:
        if not self._loop.running:
            self._loop.start(self.interval, now=self._now)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
