"""Balancing over three real targets, and active health checks.

Each target is a real twisted.web server started here: it answers JSON naming itself (with
`status`), records the paths it served, can be made slow (answering after `delay` seconds,
through reactor.callLater), and answers its /healthz with `health` (200 or 500).

The health-check tests run the gateway on a `task.Clock`: advancing it starts a round of
checks, which are real HTTP requests, so the test waits for their verdicts by polling on the
real reactor (bounded, `until`), never by sleeping.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.web.client import HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.conftest import TIMEOUT, assert_envelope, listen, parse_responses, quiet_site, raw


class TargetResource(Resource):
    isLeaf = True

    def __init__(self, target: Target, reactor: Any) -> None:
        super().__init__()
        self.target = target
        self.reactor = reactor

    def render(self, request: Any) -> Any:
        t = self.target
        if request.path == b"/healthz":
            t.checks += 1
            request.setResponseCode(t.health)
            return b"ok\n" if t.health < 400 else b"failing\n"
        t.paths.append(request.path.decode())
        body = json.dumps({"target": t.name, "path": request.path.decode()}).encode()
        request.setHeader(b"Content-Type", b"application/json")
        request.setResponseCode(t.status)
        if not t.delay:
            return body

        def answer() -> None:
            request.write(body)
            request.finish()
        call = self.reactor.callLater(t.delay, answer)
        request.notifyFinish().addErrback(lambda _: call.active() and call.cancel())
        return NOT_DONE_YET


@dataclass
class Target:
    name: str
    port: int = 0
    listening: Any = None
    paths: list[str] = field(default_factory=list)   # every non-health request served
    checks: int = 0                                    # /healthz requests served
    health: int = 200                                  # the /healthz status
    status: int = 200                                  # every other request's status
    delay: float = 0.0                                 # seconds before answering (not /healthz)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest_twisted.async_yield_fixture()
async def targets(reactor: Any) -> Any:
    """Three real upstream targets, a, b and c."""
    started = []
    for name in "abc":
        target = Target(name)
        site = quiet_site(TargetResource(target, reactor))
        target.listening = await listen(reactor, site)
        target.port = target.listening.getHost().port
        started.append(target)
    yield started
    for target in started:
        await target.listening.stopListening()


def config(targets: list[Target], balance: str, extra: str = "") -> str:
    urls = ", ".join(f'"{t.url}"' for t in targets)
    return f"""
    upstreams:
      users:
        targets: [{urls}]
        balance: {balance}
        connect_timeout: 1s
        timeout: 5s{extra}
    routes:
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """


class Client:
    """Requests through the gateway over keep-alive connections (treq)."""

    def __init__(self, reactor: Any, url: str) -> None:
        self.reactor = reactor
        self.url = url
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 64

    async def get(self, path: str) -> tuple[int, Any]:
        resp = await treq.get(self.url + path, pool=self.pool, reactor=self.reactor).addTimeout(TIMEOUT, self.reactor)
        body = await resp.content()
        return resp.code, json.loads(body)

    async def sequential(self, n: int, tag: str = "r") -> list[str]:
        """n requests one after the other; the target names that answered."""
        out = []
        for i in range(n):
            code, body = await self.get(f"/api/users/{tag}{i}")
            assert code == 200, (code, body)
            assert body["path"] == f"/users/{tag}{i}"
            out.append(body["target"])
        return out

    async def close(self) -> None:
        await self.pool.closeCachedConnections()


def served(targets: list[Target]) -> dict[str, int]:
    return {t.name: len(t.paths) for t in targets}


async def until(reactor: Any, condition: Callable[[], bool], what: str, limit: float = TIMEOUT) -> None:
    """Poll `condition` on the real reactor every 10 ms, failing after `limit` seconds."""
    deadline = reactor.seconds() + limit
    while not condition():
        assert reactor.seconds() < deadline, f"timed out waiting for {what}"
        await deferLater(reactor, 0.01, lambda: None)


# --- distribution -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_round_robin_is_exactly_even_over_three_targets(reactor, targets, gateway):
    gw = await gateway(config(targets, "round_robin"))
    client = Client(reactor, gw.url)
    names = await client.sequential(30)
    await client.close()
    assert served(targets) == {"a": 10, "b": 10, "c": 10}
    assert names == names[:3] * 10                      # the same order every cycle
    assert sorted(names[:3]) == ["a", "b", "c"]
    members = gw.gateway.proxy.groups["users"].balancer.members
    assert [(m.requests, m.in_flight) for m in members] == [(10, 0)] * 3


async def sixty_requests(reactor: Any, targets: Any, gateway: Any, policy: str) -> tuple[Any, dict[str, int]]:
    """60 requests one after the other through a gateway balancing `targets` by `policy`;
    checks each was served once and by the target it names -> (the gateway, served per target)."""
    gw = await gateway(config(targets, policy))
    client = Client(reactor, gw.url)
    names = await client.sequential(60)
    await client.close()
    counts = served(targets)
    assert sum(counts.values()) == 60 and Counter(names) == counts
    return gw, counts


@pytest_twisted.ensureDeferred
async def test_random_reaches_every_target(reactor, targets, gateway):
    _, counts = await sixty_requests(reactor, targets, gateway, "random")
    assert all(n > 0 for n in counts.values()), counts       # P(a target gets none) ~ 3 * (2/3)^60


@pytest_twisted.ensureDeferred
async def test_least_request_reaches_every_target_when_all_are_idle(reactor, targets, gateway):
    gw, counts = await sixty_requests(reactor, targets, gateway, "least_request")
    assert all(n > 0 for n in counts.values()), counts       # all idle: ties, the first sample wins
    members = gw.gateway.proxy.groups["users"].balancer.members
    assert [m.in_flight for m in members] == [0, 0, 0]


WORKERS, PER_WORKER = 6, 20       # concurrent clients, requests each (one after the other)


async def concurrent_load(reactor: Any, url: str, workers: int, per_worker: int) -> None:
    """`workers` clients, each sending `per_worker` requests one after the other."""
    client = Client(reactor, url)

    async def worker(w: int) -> None:
        await client.sequential(per_worker, tag=f"w{w}-")
    await gatherResults([Deferred.fromCoroutine(worker(w)) for w in range(workers)], consumeErrors=True)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_least_request_sends_less_to_a_slow_target(reactor, targets, gateway):
    c = targets[2]
    c.delay = 0.2
    gw = await gateway(config(targets, "least_request"))
    await concurrent_load(reactor, gw.url, WORKERS, PER_WORKER)
    counts = served(targets)
    assert sum(counts.values()) == WORKERS * PER_WORKER
    # c holds requests for 200 ms while a and b answer at once: its in-flight count stays
    # above theirs, so the two-choice comparison keeps choosing them (typically c gets 6-13
    # of 120, a and b 50-60 each; round robin gives c its 40).
    assert counts["c"] * 3 <= min(counts["a"], counts["b"]), counts
    members = gw.gateway.proxy.groups["users"].balancer.members
    assert [m.in_flight for m in members] == [0, 0, 0]


@pytest_twisted.ensureDeferred
async def test_round_robin_under_the_same_load_gives_the_slow_target_its_full_share(reactor, targets, gateway):
    """The control for the test above: the difference comes from the policy, not the load."""
    targets[2].delay = 0.2
    gw = await gateway(config(targets, "round_robin"))
    await concurrent_load(reactor, gw.url, WORKERS, PER_WORKER)
    third = WORKERS * PER_WORKER // 3
    assert served(targets) == {"a": third, "b": third, "c": third}


# --- active health checks -----------------------------------------------------------------

HEALTH = """
        health_check: {path: /healthz, interval: 5s, timeout: 2s, unhealthy_threshold: 2, healthy_threshold: 2}"""


@pytest_twisted.ensureDeferred
async def test_a_target_failing_its_checks_is_taken_out_and_brought_back(reactor, targets, gateway):
    c = targets[2]
    clock = Clock()
    gw = await gateway(config(targets, "round_robin", HEALTH), clock=clock)
    group = gw.gateway.proxy.groups["users"]
    checker, members = group.health, group.balancer.members
    ma, mb, mc = members

    async def round_done(passes: list[int], fails: list[int], what: str) -> None:
        await until(reactor, lambda: ([checker.passes[m] for m in members], [checker.fails[m] for m in members])
                    == (passes, fails), what)

    async def traffic(n: int, tag: str) -> dict[str, int]:
        before = served(targets)
        client = Client(reactor, gw.url)
        await client.sequential(n, tag)
        await client.close()
        return {name: count - before[name] for name, count in served(targets).items()}

    # The first round runs at start: every target passes.
    await round_done([1, 1, 1], [0, 0, 0], "the first round of checks")
    assert [t.checks for t in targets] == [1, 1, 1]

    c.health = 500
    clock.advance(5)
    await round_done([2, 2, 0], [0, 0, 1], "c's first failed check")
    assert not mc.down                                   # one failure: below unhealthy_threshold
    assert await traffic(6, "one-fail-") == {"a": 2, "b": 2, "c": 2}

    clock.advance(5)
    await round_done([3, 3, 0], [0, 0, 2], "c's second failed check")
    assert mc.down and not ma.down and not mb.down
    assert mc.last_error == "health check: status 500"
    assert await traffic(30, "down-") == {"a": 15, "b": 15, "c": 0}

    # Back to 200: one pass is not enough (healthy_threshold: 2), the second brings it back.
    c.health = 200
    clock.advance(5)
    await round_done([4, 4, 1], [0, 0, 0], "c's first passed check")
    assert mc.down
    assert await traffic(10, "one-pass-") == {"a": 5, "b": 5, "c": 0}
    clock.advance(5)
    await round_done([5, 5, 2], [0, 0, 0], "c's second passed check")
    assert not mc.down
    assert await traffic(30, "back-") == {"a": 10, "b": 10, "c": 10}
    assert [t.checks for t in targets] == [5, 5, 5]      # a down target is still checked


@pytest_twisted.ensureDeferred
async def test_with_every_target_down_the_answer_is_503_and_no_target_is_reached(reactor, targets, gateway):
    for t in targets:
        t.health = 500
    gw = await gateway(config(targets, "least_request", """
        health_check: {path: /healthz, interval: 5s, unhealthy_threshold: 1}"""), clock=Clock())
    members = gw.gateway.proxy.groups["users"].balancer.members
    await until(reactor, lambda: all(m.down for m in members), "every target marked down by the first round")
    resp = await raw(gw.port, b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    (r,) = parse_responses(resp)
    assert_envelope(r, 503, "UPSTREAM_UNAVAILABLE")
    assert r.header("retry-after") == "1"
    assert served(targets) == {"a": 0, "b": 0, "c": 0}



@pytest_twisted.ensureDeferred
async def test_a_passively_ejected_target_gets_no_traffic_and_a_passing_check_brings_it_back(reactor, targets, gateway):
    c = targets[2]
    clock = Clock()
    gw = await gateway(config(targets, "round_robin", """
        passive_health: {consecutive_failures: 2, eject_for: 1m}
        health_check: {path: /healthz, interval: 5s}"""), clock=clock)
    group = gw.gateway.proxy.groups["users"]
    checker, members = group.health, group.balancer.members
    mc = members[2]
    await until(reactor, lambda: [checker.passes[m] for m in members] == [1, 1, 1], "the first round of checks")

    c.status = 502                       # c's application fails; its /healthz still answers 200
    client = Client(reactor, gw.url)
    codes = Counter()
    for i in range(6):
        code, body = await client.get(f"/api/users/f{i}")
        codes[code, body["target"]] += 1
    assert codes == {(200, "a"): 2, (200, "b"): 2, (502, "c"): 2}     # a 502 is relayed, and counted
    assert mc.ejected_until == 60.0 and not mc.down
    assert Counter(await client.sequential(30, "ejected-")) == {"a": 15, "b": 15}
    assert served(targets) == {"a": 17, "b": 17, "c": 2}

    # c recovers; the next round of checks (5 s on, long before the 1 minute is over) ends
    # the ejection and c is back in rotation.
    c.status = 200
    clock.advance(5)
    await until(reactor, lambda: [checker.passes[m] for m in members] == [2, 2, 2], "the second round of checks")
    assert mc.ejected_until == 0.0 and mc.failures == 0
    names = await client.sequential(30, "back-")
    await client.close()
    assert Counter(names) == {"a": 10, "b": 10, "c": 10}
