"""Active health checks: GET `health_check.path` on every target of an upstream, each interval.

A 2xx or 3xx answer within `timeout` is a pass. `unhealthy_threshold` failures in a row mark
a target down (out of rotation), `healthy_threshold` passes in a row bring it back, and any
pass ends a passive ejection early. Targets start up: a gateway starting while a target is
still booting sends it traffic until the checks say otherwise, rather than nothing at all.
Scheduling and timeouts use the injected clock; the requests are real (treq).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.task import LoopingCall
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from txgateway.core.fetch import quiet_pool, read_body
from txgateway.upstream.balance import Balancer, Member
from txgateway.upstream.resilienceconfig import HealthCheck

__all__ = ["HealthChecker"]

MAX_BODY = 64 * 1024


class HealthChecker:
    def __init__(self, balancer: Balancer, check: HealthCheck, reactor: Any, clock: Any) -> None:
        self.balancer = balancer
        self.check = check
        self.reactor = reactor
        self.clock = clock
        self.passes: dict[Member, int] = {m: 0 for m in balancer.members}
        self.fails: dict[Member, int] = {m: 0 for m in balancer.members}
        self._pending: set[Deferred[Any]] = set()
        self._loop = LoopingCall(self.run)
        self._loop.clock = clock
        self._client: Any = None

    def start(self) -> None:
        import treq.client
        from twisted.web.client import Agent
        pool = quiet_pool(self.reactor)
        # The checks speak TLS to https targets exactly as the proxy does (tls.ca, verify,
        # client certificate): not with treq's default browser-like policy.
        agent: Any = Agent(self.reactor, contextFactory=_TargetsTLS(self.balancer), pool=pool)
        self._client = treq.client.HTTPClient(agent)
        self._loop.start(self.check.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        for d in list(self._pending):
            d.cancel()

    def run(self) -> None:
        """One round: a check of every target whose previous check has finished."""
        for member in self.balancer.members:
            if any(getattr(d, "member", None) is member for d in self._pending):
                continue
            d = self._probe(member)
            d.member = member  # type: ignore[attr-defined]
            self._pending.add(d)
            d.addBoth(self._done, d)

    def _probe(self, member: Member) -> Deferred[None]:
        url = member.url.rstrip("/") + self.check.path.decode()
        d: Deferred[Any] = self._client.get(url, headers=Headers({b"User-Agent": [b"txgateway-health"]}))
        d.addCallback(_status_after_body)
        d.addTimeout(self.check.timeout, self.clock)        # covers the body too
        return d.addCallbacks(self._judge, self._failed, callbackArgs=(member,), errbackArgs=(member,))

    def _judge(self, status: int, member: Member) -> None:
        if 200 <= status < 400:
            self._passed(member)
        else:
            self._record_failure(member, f"status {status}")

    def _failed(self, failure: Failure, member: Member) -> None:
        if failure.check(CancelledError) or not self._loop.running:      # stopped: no verdict
            return
        # The timeout cancels a check still connecting with ConnectingCancelledError, whose
        # message is only the address.
        if failure.check(TimeoutError, ConnectingCancelledError):
            self._record_failure(member, f"no answer within {self.check.timeout:g}s")
        else:
            self._record_failure(member, failure.getErrorMessage() or type(failure.value).__name__)

    def _done(self, _: Any, d: Deferred[Any]) -> None:
        self._pending.discard(d)

    def _passed(self, member: Member) -> None:
        member.checks_passed += 1
        self.fails[member] = 0
        self.passes[member] += 1
        if member.down and self.passes[member] >= self.check.healthy_threshold:
            self.balancer.set_down(member, False, f"{self.passes[member]} health checks passed")
        elif not member.down and member.ejected_until:
            self.balancer.set_down(member, False, "health check passed")

    def _record_failure(self, member: Member, reason: str) -> None:
        member.checks_failed += 1
        self.passes[member] = 0
        self.fails[member] += 1
        member.last_error = f"health check: {reason}"
        if not member.down and self.fails[member] >= self.check.unhealthy_threshold:
            self.balancer.set_down(member, True, f"{self.fails[member]} health checks failed, last: {reason}")


@implementer(IPolicyForHTTPS)
class _TargetsTLS:
    """The TLS connection creator of each https target (its pool's), for the checks' Agent."""

    def __init__(self, balancer: Balancer) -> None:
        self.creators = {(m.pool.target.host.encode(), m.pool.target.port): m.pool.tls
                         for m in balancer.members if m.pool.tls is not None}

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        return self.creators[hostname, port]


def _status_after_body(response: Any) -> Deferred[int]:
    """The status, once the body (at most MAX_BODY bytes) has been read and dropped."""
    return read_body(response, MAX_BODY).addCallback(lambda _: response.code)
