"""The circuit breaker: one explicit closed / open / half_open state machine per upstream.

Pure logic over an injected clock (`seconds()` only), so tests drive it with `task.Clock`.
The proxy's hot path is one call each way::

    ticket = breaker.allow()            # None: answer 503 with Retry-After: breaker.retry_after()
    ...                                 # send the request
    breaker.record_success(ticket)      # or record_failure(ticket, "timeout"), or release(ticket)

The ticket is the breaker's epoch, a number that changes on every transition. A result that
carries an old epoch is ignored: a slow answer to a request sent before a trip must neither
close a half-open breaker nor count in the fresh window after recovery.

open -> half_open happens lazily, when `allow()` or a reader (`state`, `snapshot()`,
`retry_after()`) first looks after `open_for` has passed: no timer to arm, cancel on
`trip`/`reset`, or leave firing on a breaker a reload dropped. Readers never see a stale state.
Half-open hands out `half_open_requests` probe slots per epoch; a slot comes back only through
`release()`, and probes with no result after `max_open_for` count as failed, so a lost report
cannot keep an upstream shut until someone resets it by hand (Kong's stuck-unhealthy targets).
"""

from __future__ import annotations

import math
import random as _random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "BreakerSettings", "Breakers", "CircuitBreaker", "TransitionListener"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
_BUCKETS = 10       # the rolling window is this many buckets of window / _BUCKETS seconds
_SLACK = 1e-9       # float slack: a client waiting exactly Retry-After seconds gets its probe
_log = Logger(namespace="txgateway.upstream.breaker")


@dataclass(frozen=True)
class BreakerSettings:
    """One upstream's `circuit_breaker:` block; durations in seconds."""

    consecutive_failures: int = 5
    failure_ratio: float | None = 0.5          # None: trip on consecutive failures only
    window: float = 10.0
    min_requests: int = 20
    open_for: float = 30.0
    max_open_for: float = 300.0                # the cap before jitter, so capped instances still spread
    half_open_requests: int = 1
    failure_statuses: frozenset[int] = frozenset({502, 503, 504})
    jitter: float = 0.1                        # each open period is multiplied by 1 ± jitter

    def __post_init__(self) -> None:
        problems = [text for text, bad in [
            ("consecutive_failures must be >= 1", self.consecutive_failures < 1),
            ("failure_ratio must be in (0, 1]", self.failure_ratio is not None and not 0 < self.failure_ratio <= 1),
            ("window must be > 0", self.window <= 0),
            ("min_requests must be >= 1", self.min_requests < 1),
            ("open_for must be > 0", self.open_for <= 0),
            ("max_open_for must be >= open_for", self.max_open_for < self.open_for),
            ("half_open_requests must be >= 1", self.half_open_requests < 1),
            ("jitter must be in [0, 1)", not 0 <= self.jitter < 1),
        ] if bad]
        if problems:
            raise ValueError("; ".join(problems))


TransitionListener = Callable[["CircuitBreaker", str, str, str], None]   # (breaker, from, to, reason)


class CircuitBreaker:
    """Closed counts results; open refuses everything until its period ends; half_open admits
    `half_open_requests` probes: all succeed -> closed, any fails -> open for twice as long."""

    def __init__(self, name: str, settings: BreakerSettings, clock: Any, log: Logger = _log,
                 random: Callable[[], float] = _random.random) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self.log = log
        self.random = random
        self.on_transition: list[TransitionListener] = []
        self.transitions: dict[tuple[str, str], int] = {}
        self.trips = 0
        self.stale_results = 0
        self.epoch = 1
        self.opened_at: float | None = None
        self.open_for: float | None = None     # this open period, jitter included
        self._state = CLOSED
        self._until = 0.0                      # end of the open period
        self._half_open_at = 0.0
        self._backoff = settings.open_for      # the next open period before jitter
        self._probes_out = self._probes_ok = 0
        self._clear_counts()

    # --- the hot path ---------------------------------------------------------------------

    def allow(self) -> int | None:
        """A ticket (the epoch, >= 1) to pass to `record_*`/`release`, or None: fail fast."""
        if self._state == CLOSED:
            return self.epoch
        now = self.clock.seconds()
        if self._state == OPEN:
            if now + _SLACK < self._until:
                return None
            self._half_open(now)
        if self._probes_out + self._probes_ok < self.settings.half_open_requests:
            self._probes_out += 1
            return self.epoch
        if now - self._half_open_at >= self.settings.max_open_for:
            # A probe nobody reported on must not hold the upstream off forever.
            self._open(f"probe lost: no result in {self.settings.max_open_for:g}s", now)
        return None

    def record_success(self, ticket: int) -> None:
        if ticket != self.epoch:
            self.stale_results += 1
        elif self._state == CLOSED:
            self._count(False, "")
        elif self._probes_out:
            self._probes_out -= 1
            self._probes_ok += 1
            if self._probes_ok >= self.settings.half_open_requests:
                self._close(f"{self._probes_ok} probe(s) succeeded")

    def record_failure(self, ticket: int, reason: str) -> None:
        if ticket != self.epoch:
            self.stale_results += 1
        elif self._state == CLOSED:
            self._count(True, reason)
        elif self._probes_out:
            self._probes_out -= 1
            self._open(f"probe failed: {reason}", self.clock.seconds())

    def release(self, ticket: int) -> None:
        """The request ended with no verdict on the upstream (the client went away first):
        it counts for nothing, and a half-open probe slot is given back."""
        if ticket == self.epoch and self._state == HALF_OPEN and self._probes_out:
            self._probes_out -= 1

    def is_failure_status(self, status: int) -> bool:
        return status in self.settings.failure_statuses

    # --- readers and operator verbs ---------------------------------------------------------

    @property
    def state(self) -> str:
        self._refresh()
        return self._state

    def retry_after(self) -> int:
        """Whole seconds (>= 1) until a probe may be admitted; 1 while probes are in flight."""
        self._refresh()
        if self._state != OPEN:
            return 1
        return max(1, math.ceil(self._until - self.clock.seconds() - _SLACK))

    def trip(self, reason: str = "manual trip") -> None:
        """Open now, for the period an automatic trip would get (if already open, it restarts)."""
        self._open(reason, self.clock.seconds())

    def reset(self, reason: str = "manual reset") -> None:
        """Close now, counts and backoff cleared; results of requests already sent are ignored."""
        self._close(reason)

    def snapshot(self) -> dict[str, Any]:
        """Plain JSON-able values for /status, /metrics and the Manhole."""
        self._refresh()
        self._advance(self.clock.seconds())
        return {
            "name": self.name, "state": self._state, "epoch": self.epoch,
            "consecutive_failures": self._consecutive,
            "window_requests": self._total, "window_failures": self._failed,
            "opened_at": self.opened_at, "open_for": self.open_for,
            "retry_after": self.retry_after() if self._state == OPEN else None,
            "probes_in_flight": self._probes_out if self._state == HALF_OPEN else 0,
            "trips": self.trips, "stale_results": self.stale_results,
            "transitions": {f"{a}->{b}": n for (a, b), n in self.transitions.items()},
        }

    # --- transitions --------------------------------------------------------------------------

    def _refresh(self) -> None:
        now = self.clock.seconds()
        if self._state == OPEN and now + _SLACK >= self._until:
            self._half_open(now)

    def _half_open(self, now: float) -> None:
        self._half_open_at = now
        self._enter(HALF_OPEN, f"open for {self.open_for:g}s elapsed")

    def _open(self, reason: str, now: float) -> None:
        s = self.settings
        if self._state == HALF_OPEN:
            self._backoff = min(self._backoff * 2, s.max_open_for)
        self.open_for = self._backoff * (1.0 + s.jitter * (2.0 * self.random() - 1.0))
        self.opened_at, self._until = now, now + self.open_for
        self.trips += 1
        self._enter(OPEN, reason)

    def _close(self, reason: str) -> None:
        self._backoff = self.settings.open_for
        self.opened_at = self.open_for = None
        self._enter(CLOSED, reason)

    def _enter(self, state: str, reason: str) -> None:
        old, self._state = self._state, state
        self.epoch += 1
        self._probes_out = self._probes_ok = 0
        self._clear_counts()                 # the counts describe one closed period only
        self.transitions[old, state] = self.transitions.get((old, state), 0) + 1
        emit = self.log.warn if state == OPEN else self.log.info
        emit("circuit breaker {upstream}: {from_state} -> {to_state} ({reason})",
             upstream=self.name, from_state=old, to_state=state, reason=reason)
        for listener in self.on_transition:
            try:
                listener(self, old, state, reason)
            except Exception:
                self.log.failure("breaker {upstream}: on_transition listener failed", upstream=self.name)

    # --- the rolling window: _BUCKETS buckets and running totals; constant memory, O(1) -------

    def _clear_counts(self) -> None:
        self._requests = [0] * _BUCKETS
        self._failures = [0] * _BUCKETS
        self._total = 0
        self._failed = 0
        self._consecutive = 0
        self._width = self.settings.window / _BUCKETS
        self._bucket = int(self.clock.seconds() // self._width)

    def _advance(self, now: float) -> int:
        """Drop the buckets that slid out of the window; the slot for `now`."""
        bucket = int(now // self._width)
        if bucket > self._bucket:           # a clock stepping back keeps the current bucket
            for b in range(self._bucket + 1, min(bucket, self._bucket + _BUCKETS) + 1):
                slot = b % _BUCKETS
                self._total -= self._requests[slot]
                self._failed -= self._failures[slot]
                self._requests[slot] = self._failures[slot] = 0
            self._bucket = bucket
        return self._bucket % _BUCKETS

    def _count(self, failed: bool, reason: str) -> None:
        now = self.clock.seconds()
        slot = self._advance(now)
        self._requests[slot] += 1
        self._total += 1
        s = self.settings
        if failed:
            self._failures[slot] += 1
            self._failed += 1
            self._consecutive += 1
            if self._consecutive >= s.consecutive_failures:
                self._open(f"{self._consecutive} consecutive failures (last: {reason})", now)
                return
        else:
            self._consecutive = 0
        if s.failure_ratio is not None and self._total >= s.min_requests and self._failed / self._total >= s.failure_ratio:
            self._open(f"failure ratio {self._failed / self._total:.2f} over {s.window:g}s ({self._total} requests)", now)


class Breakers(Mapping[str, CircuitBreaker]):
    """Every upstream's breaker by name: what /status, /metrics and the Manhole read."""

    def __init__(self, breakers: Iterable[CircuitBreaker] = ()) -> None:
        self._by_name = {b.name: b for b in breakers}

    def add(self, breaker: CircuitBreaker) -> None:
        self._by_name[breaker.name] = breaker

    def __getitem__(self, name: str) -> CircuitBreaker:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise KeyError(f"no breaker for upstream {name!r}; known: {known}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._by_name)

    def trip(self, name: str, reason: str = "manual trip") -> dict[str, Any]:
        self[name].trip(reason)
        return self[name].snapshot()

    def reset(self, name: str, reason: str = "manual reset") -> dict[str, Any]:
        self[name].reset(reason)
        return self[name].snapshot()

    def snapshot(self) -> dict[str, dict[str, Any]]:
        return {name: breaker.snapshot() for name, breaker in self._by_name.items()}
