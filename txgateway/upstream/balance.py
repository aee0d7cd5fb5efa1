"""Choosing a target of an upstream: the balancing policy over the targets that are healthy.

A target is out of rotation while it is ejected by passive health (`consecutive_failures`
live failures in a row eject it for `eject_for`, doubled on each ejection not followed by a
success, up to `max_eject_for`: Envoy's outlier detection, but it always comes back, unlike
Kong's targets stuck unhealthy until a restart) or marked down by active health checks.
An ejection ends early when an active check passes. With every target out, `pick` returns
None and the proxy answers 503.

Targets may carry weights. Then round_robin is nginx's smooth weighted round robin (weights
5, 1, 1 give a a b a c a a, never five in a row), random draws by weight, and least_request
draws its two candidates by weight and keeps the one with fewer requests in flight per unit
of weight. Without weights (all 1) the unweighted choosers run, as before.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.logger import Logger

from txgateway.upstream.pool import TargetPool
from txgateway.upstream.resilienceconfig import PassiveHealth

__all__ = ["Balancer", "Member"]

_log = Logger(namespace="txgateway.upstream.balance")


class Member:
    """One target as the balancer sees it: its pool, load and health."""

    __slots__ = ("pool", "in_flight", "failures", "ejected_until", "ejections", "down", "last_error", "requests",
                 "weight", "current", "checks_passed", "checks_failed")

    def __init__(self, pool: TargetPool) -> None:
        self.pool = pool
        self.weight = pool.target.weight
        self.current = 0               # smooth weighted round robin's running score
        self.in_flight = 0             # requests now between pick and done (least_request)
        self.requests = 0              # picked, ever
        self.failures = 0              # consecutive live failures
        self.ejected_until = 0.0
        self.ejections = 0             # in a row, without a success: the backoff exponent
        self.down = False              # the active health check says so
        self.last_error: str | None = None
        self.checks_passed = 0         # active health checks, ever (metrics)
        self.checks_failed = 0

    @property
    def url(self) -> str:
        return self.pool.target.url


class Balancer:
    """`pick()` a member by `policy` among those in rotation; told `succeeded`/`failed`."""

    def __init__(self, name: str, pools: Sequence[TargetPool], policy: str, passive: PassiveHealth,
                 clock: Any, random: Callable[[], float] = _random.random) -> None:
        self.name = name
        self.members = [Member(pool) for pool in pools]
        self.policy = policy
        self.passive = passive
        self.clock = clock
        self.random = random
        self._next = 0
        if any(m.weight != 1 for m in self.members):
            self._choose = {"round_robin": self._smooth_weighted, "least_request": self._least_request_weighted,
                            "random": self._random_weighted}[policy]
        else:
            self._choose = {"round_robin": self._round_robin, "least_request": self._least_request,
                            "random": self._random}[policy]

    def pick(self, tried: Sequence[Member] = ()) -> Member | None:
        """A member in rotation not in `tried` (retries go elsewhere), or None."""
        members = self.members
        if len(members) == 1 and not tried:
            only = members[0]
            return only if not only.down and (not only.ejected_until or self._back(only)) else None
        candidates = [m for m in members if m not in tried and not m.down and (not m.ejected_until or self._back(m))]
        if not candidates:
            return None
        return self._choose(candidates)

    def _round_robin(self, candidates: list[Member]) -> Member:
        self._next += 1
        return candidates[self._next % len(candidates)]

    def _least_request(self, candidates: list[Member]) -> Member:
        """Power of two choices: two at random, the one with fewer requests in flight."""
        if len(candidates) == 1:
            return candidates[0]
        n = len(candidates)
        i = int(self.random() * n)
        j = (i + 1 + int(self.random() * (n - 1))) % n
        a, b = candidates[i], candidates[j]
        return a if a.in_flight <= b.in_flight else b

    def _random(self, candidates: list[Member]) -> Member:
        return candidates[int(self.random() * len(candidates))]

    def _smooth_weighted(self, candidates: list[Member]) -> Member:
        """nginx's smooth weighted round robin: each pick raises every candidate's score by
        its weight and takes the highest, which then gives back the total."""
        total = 0
        best = candidates[0]
        for member in candidates:
            member.current += member.weight
            total += member.weight
            if member.current > best.current:
                best = member
        best.current -= total
        return best

    def _random_weighted(self, candidates: list[Member]) -> Member:
        point = self.random() * sum(m.weight for m in candidates)
        for member in candidates:
            point -= member.weight
            if point < 0:
                return member
        return candidates[-1]

    def _least_request_weighted(self, candidates: list[Member]) -> Member:
        """Two drawn by weight; the one with fewer requests in flight per unit of weight."""
        a = self._random_weighted(candidates)
        b = self._random_weighted(candidates)
        return a if a.in_flight * b.weight <= b.in_flight * a.weight else b

    def _back(self, member: Member) -> bool:
        """An ejection that has run out: back in rotation (said once)."""
        if member.ejected_until > self.clock.seconds():
            return False
        member.ejected_until = 0.0
        _log.info("upstream {upstream}: target {target} back in rotation after ejection",
                  upstream=self.name, target=member.url)
        return True

    def succeeded(self, member: Member) -> None:
        member.failures = 0
        member.ejections = 0

    def failed(self, member: Member, reason: str) -> None:
        member.failures += 1
        member.last_error = reason
        if member.failures >= self.passive.consecutive_failures and not member.ejected_until:
            self.eject(member, f"{member.failures} consecutive failures (last: {reason})")

    def eject(self, member: Member, reason: str) -> None:
        p = self.passive
        period = min(p.max_eject_for, p.eject_for * 2 ** member.ejections)
        member.ejections += 1
        member.ejected_until = self.clock.seconds() + period
        _log.warn("upstream {upstream}: target {target} ejected for {seconds:g}s: {reason}",
                  upstream=self.name, target=member.url, seconds=period, reason=reason)

    def set_down(self, member: Member, down: bool, reason: str) -> None:
        """The active health check's verdict; a pass also ends a passive ejection."""
        if not down and member.ejected_until:
            member.ejected_until = 0.0
            member.failures = 0
            if not member.down:
                _log.info("upstream {upstream}: target {target} back in rotation before its ejection ended ({reason})",
                          upstream=self.name, target=member.url, reason=reason)
                return
        if member.down == down:
            return
        member.down = down
        _log.info("upstream {upstream}: target {target} {state} ({reason})", upstream=self.name,
                  target=member.url, state="down" if down else "up", reason=reason)

    def retry_after(self) -> int:
        """Whole seconds (>= 1) until an ejected target is due back."""
        now = self.clock.seconds()
        waits = [m.ejected_until - now for m in self.members if m.ejected_until > now and not m.down]
        return max(1, int(min(waits) + 0.999)) if waits else 1

    def snapshot(self) -> list[dict[str, Any]]:
        now = self.clock.seconds()
        return [{"url": m.url, "weight": m.weight, "in_flight": m.in_flight, "requests": m.requests, "down": m.down,
                 "ejected_for": round(max(0.0, m.ejected_until - now), 3), "failures": m.failures,
                 "last_error": m.last_error} for m in self.members]
