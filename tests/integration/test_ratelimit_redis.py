"""Rate limits shared through a real Redis: exactness, Redis time, and what happens when Redis fails.

Every test runs real gateways in the test reactor against a real redis-server started by the
fixtures (tests/redisproc.py), and asserts what clients get, what is logged and what Redis holds.
txredisapi runs on the global reactor, so these tests run in real time: `redis.timeout` is kept
at 150 ms and every wait is bounded (Deferred.addTimeout on network waits, bounded polling for a
process's state).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest
import pytest_twisted
import treq
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.client import HTTPConnectionPool

from tests.conftest import Response, assert_envelope, parse_responses, raw_request
from tests.integration.test_ratelimit import LIMIT_HEADERS, expected, limits
from tests.redisproc import RedisReplyError, RedisServer, command

T = TypeVar("T")

TIMEOUT = 0.15                    # redis.timeout in the configs of tests about Redis failing
# redis.timeout for tests about what a working Redis decides: on a loaded machine (CI, other
# test runs), a gateway's first connect and PING or a script call during a burst of requests
# in the same process took longer than TIMEOUT, and Redis was then (rightly) taken for down.
PATIENT = 5.0
MARGIN = 0.15                     # what a request may take beyond it (thread, sockets, the upstream)
WAIT = 10.0                       # bound on any single network wait
PREFIX = "txgw:rl:"


# --- config -----------------------------------------------------------------------------------

def config(upstream: str, redis: str, routes: str, on_redis_error: str = "deny", instances: int = 1,
           timeout: float = TIMEOUT) -> str:
    """A redis-backed gateway; `redis` is the body of the redis: mapping. /public is never limited."""
    return f"""
redis: {{{redis}, timeout: {int(timeout * 1000)}ms}}
rate_limits:
  backend: redis
  on_redis_error: {on_redis_error}
  instances: {instances}
  tiers: {{free: {{rate: 100/hour}}}}
upstreams:
  u: {{targets: ["{upstream}"], timeout: 2s}}
routes:
{routes}
  - {{prefix: /public, upstream: u}}
"""


def url(server: RedisServer) -> str:
    return f'url: "{server.url}"'


TENANT_ROUTE = "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Tenant', rate: 4/hour, burst: 4}}"


def tenant_key(tenant: str) -> str:
    return f"{PREFIX}route:/api|/api|h:{tenant}"


# --- clients ------------------------------------------------------------------------------------

def request_bytes(path: str, headers: list[tuple[str, str | bytes]] | None = None) -> bytes:
    out = [f"GET {path} HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n".encode()]
    for name, value in headers or []:
        out.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")) + b"\r\n")
    return b"".join(out) + b"\r\n"


def _timed_request(port: int, data: bytes) -> tuple[bytes, float]:
    start = time.monotonic()
    reply = raw_request(port, data, read_timeout=5.0)
    return reply, time.monotonic() - start


def bounded(d: Deferred[T], seconds: float = WAIT) -> Deferred[T]:
    from twisted.internet import reactor
    return d.addTimeout(seconds, reactor)


async def timed_get(gw: Any, path: str = "/api", tenant: str | bytes | None = None,
                    headers: list[tuple[str, str | bytes]] | None = None) -> tuple[Response, float]:
    """One request on its own connection; the response and its wall time (measured in the client)."""
    all_headers = list(headers or [])
    if tenant is not None:
        all_headers.append(("X-Tenant", tenant))
    data, elapsed = await bounded(deferToThread(_timed_request, gw.port, request_bytes(path, all_headers)))
    (r,) = parse_responses(data)
    return r, elapsed


async def get(gw: Any, path: str = "/api", tenant: str | bytes | None = None, **kw: Any) -> Response:
    return (await timed_get(gw, path, tenant, **kw))[0]


async def statuses(gw: Any, n: int, path: str = "/api", tenant: str | bytes | None = None) -> list[int]:
    return [(await get(gw, path, tenant)).status for _ in range(n)]


async def redis(server: Any, *args: Any, **kw: Any) -> Any:
    """One command to a test Redis, from a thread (the server may be slow; the reactor is not)."""
    return await bounded(deferToThread(server.command, *args, **kw))


async def pause(seconds: float) -> None:
    from twisted.internet import reactor
    await deferLater(reactor, seconds, lambda: None)


async def poll(what: str, check: Callable[[], Awaitable[T | None]], timeout: float, every: float = 0.05) -> T:
    """Await `check()` until it returns something truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await pause(every)


async def connected(gw: Any) -> None:
    """Wait for the gateway's Redis link to answer (it connects at start, without waiting)."""
    await bounded(gw.gateway.redis.call("ping"))


async def assert_still_serves(gw: Any) -> None:
    r = await get(gw, "/public")
    assert r.status == 200, r.body
    assert r.json()["path"] == "/public"
    assert limits(r) == dict.fromkeys(LIMIT_HEADERS)


# --- log capture ----------------------------------------------------------------------------------

@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every twisted.logger event published during the test (the observer is removed at the end)."""
    captured: list[dict[str, Any]] = []
    observer = captured.append
    globalLogPublisher.addObserver(observer)
    yield captured
    globalLogPublisher.removeObserver(observer)


def redis_messages(events: list[dict[str, Any]], start: str) -> list[str]:
    return [formatEvent(e) for e in events
            if e.get("log_namespace") == "txgateway.redis" and str(e.get("log_format", "")).startswith(start)]


def no_tracebacks(events: list[dict[str, Any]]) -> None:
    bad = [formatEvent(e) for e in events
           if "log_failure" in e or e.get("isError") or "Traceback" in formatEvent(e)]
    assert not bad, bad


# --- 1. headers, envelope, what Redis holds ------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_headers_429_envelope_and_the_redis_key_expiring_when_full(reactor, echo, gateway, redis_server):
    gw = await gateway(config(echo.url, url(redis_server), """\
  - {prefix: /api/slow, upstream: u, rate_limit: {rate: 3/day}}
  - {prefix: /api/fast, upstream: u, rate_limit: {rate: 5/second, burst: 2}}""", timeout=PATIENT))
    # 3/day: one token per 28800 s, so the few milliseconds between requests never show.
    for remaining in (2, 1, 0):
        r = await get(gw, "/api/slow")
        assert r.status == 200, r.body
        assert limits(r) == expected("/api/slow", 3, 86400, remaining, 28800 * (3 - remaining))
        assert r.header("retry-after") is None
    r = await get(gw, "/api/slow")
    err = assert_envelope(r, 429, "RATE_LIMITED")
    assert err["message"] == "rate limit exceeded; retry later"
    assert r.header("retry-after") == "28800"
    assert limits(r) == expected("/api/slow", 3, 86400, 0, 86400)
    assert len(echo.requests) == 3                       # the 429 never reached the upstream
    assert [rec["rate_limit"] for rec in gw.log] == ["allowed"] * 3 + ["rejected"]

    slow = PREFIX + "route:/api/slow|/api/slow|ip:127.0.0.1"
    assert await redis(redis_server, "KEYS", PREFIX + "*") == [slow]
    assert float(await redis(redis_server, "HGET", slow, "t")) < 0.01
    pttl = await redis(redis_server, "PTTL", slow)
    assert 86_400_000 - 60_000 < pttl <= 86_400_000 + 1000, pttl   # the time to refill to full, no longer

    # 5/second, burst 2: empty, then full again 0.4 s later, when the key must be gone.
    assert await statuses(gw, 2, "/api/fast") == [200, 200]
    r = await get(gw, "/api/fast")
    assert_envelope(r, 429, "RATE_LIMITED")
    assert r.header("retry-after") == "1"
    emptied = time.monotonic()
    fast = PREFIX + "route:/api/fast|/api/fast|ip:127.0.0.1"
    pttl = await redis(redis_server, "PTTL", fast)
    assert 0 < pttl <= 400 + 1000, pttl

    async def gone() -> bool:
        return await redis(redis_server, "EXISTS", fast) == 0
    await poll("the full bucket's key to expire", gone, 3.0)
    assert time.monotonic() - emptied < 0.4 + 1.0
    r = await get(gw, "/api/fast")                       # a new, full bucket
    assert r.status == 200 and limits(r) == expected("/api/fast", 5, 1, 1, 1)
    assert await redis(redis_server, "EXISTS", slow) == 1
    await assert_still_serves(gw)


# --- 2. exactness across two instances --------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_two_gateways_admit_exactly_the_burst_between_them(reactor, echo, gateway, redis_server):
    # on_redis_error: deny, so a Redis call that fails shows as 503s, never as a wrong count.
    text = config(echo.url, url(redis_server), "  - {prefix: /api, upstream: u, rate_limit: {rate: 20/hour}}",
                  timeout=PATIENT)
    a, b = await gateway(text), await gateway(text)
    await connected(a)
    await connected(b)
    pool = HTTPConnectionPool(reactor, persistent=False)

    async def one(port: int) -> tuple[int, Any]:
        resp = await treq.get(f"http://127.0.0.1:{port}/api", pool=pool, reactor=reactor)
        await treq.content(resp)
        return resp.code, resp.headers

    results = await bounded(gatherResults([Deferred.fromCoroutine(one((a, b)[i % 2].port)) for i in range(60)]))
    codes = [code for code, _ in results]
    assert codes.count(200) == 20 and codes.count(429) == 40, codes
    # Atomic decisions in Redis: the admitted requests saw 19, 18, ..., 0 left, each once.
    remaining = sorted(int(h.getRawHeaders("x-ratelimit-remaining")[0]) for code, h in results if code == 200)
    assert remaining == list(range(20))
    assert {h.getRawHeaders("retry-after")[0] for code, h in results if code == 429} == {"180"}
    assert len(echo.requests) == 20
    assert sum(rec["rate_limit"] == "allowed" for rec in a.log + b.log) == 20
    assert sum(rec["rate_limit"] == "rejected" for rec in a.log + b.log) == 40
    assert len(a.log) == len(b.log) == 30
    assert float(await redis(redis_server, "HGET", PREFIX + "route:/api|/api|ip:127.0.0.1", "t")) < 0.01
    await assert_still_serves(a)
    await assert_still_serves(b)


# --- 3. Redis TIME ------------------------------------------------------------------------------------

class SkewedClock:
    """The gateway's clock: the reactor's timers, but `seconds()` off by `skew` (a badly set host)."""

    def __init__(self, reactor: Any, skew: float) -> None:
        self.reactor = reactor
        self.skew = skew

    def seconds(self) -> float:
        return float(self.reactor.seconds() + self.skew)

    def callLater(self, delay: float, f: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self.reactor.callLater(delay, f, *args, **kw)

    def getDelayedCalls(self) -> Any:
        return self.reactor.getDelayedCalls()


@pytest_twisted.ensureDeferred
async def test_refill_follows_redis_time_not_the_gateway_clock(reactor, echo, gateway, redis_server):
    clock = SkewedClock(reactor, -86400.0)               # a day behind, then jumping forward an hour
    gw = await gateway(config(echo.url, url(redis_server),
                              "  - {prefix: /api, upstream: u, rate_limit: {rate: 2/second, burst: 1}}",
                              timeout=PATIENT), clock=clock)
    first_sent = time.monotonic()
    assert await statuses(gw, 2) == [200, 429]
    clock.skew += 3600                                   # a gateway clock jumping an hour refills nothing
    r = await get(gw)
    assert r.status == 429 and r.header("retry-after") == "1"

    async def admitted() -> bool:
        return (await get(gw)).status == 200
    await poll("a token refilled by Redis time", admitted, 2.0)
    waited = time.monotonic() - first_sent
    assert 0.5 - 0.02 <= waited < 1.5, waited           # one token per 0.5 s of Redis time
    assert (await get(gw)).status == 429
    await assert_still_serves(gw)


# --- 4. NOSCRIPT ----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_decisions_stay_right_after_script_flush(reactor, echo, gateway, redis_server, events):
    gw = await gateway(config(echo.url, url(redis_server) + ", pool_size: 1",
                              "  - {prefix: /api, upstream: u, rate_limit: {rate: 3/hour}}", timeout=PATIENT))
    assert await statuses(gw, 2) == [200, 200]           # the script is loaded: EVALSHA from now on

    async def noscript_errors() -> int:
        stats = await bounded(deferToThread(redis_server.info, "errorstats"))
        match = re.match(r"count=(\d+)", stats.get("errorstat_NOSCRIPT", "count=0"))
        assert match is not None
        return int(match.group(1))

    assert await noscript_errors() == 0
    assert await redis(redis_server, "SCRIPT", "FLUSH") == "OK"
    r = await get(gw)
    assert r.status == 200 and r.header("x-ratelimit-remaining") == "0"
    assert await noscript_errors() == 1                  # EVALSHA failed, the source was sent again
    assert await redis(redis_server, "SCRIPT", "FLUSH") == "OK"
    r = await get(gw)
    assert_envelope(r, 429, "RATE_LIMITED")
    assert r.header("retry-after") == "1200"
    assert await noscript_errors() == 2
    assert gw.gateway.redis.state["state"] == "up" and gw.gateway.redis.errors == 0
    assert redis_messages(events, "redis lost") == []
    no_tracebacks(events)
    await assert_still_serves(gw)


# --- 5. Redis killed and restarted --------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
@pytest_twisted.ensureDeferred
async def test_redis_killed_then_restarted(reactor, echo, gateway, redis_server, events, mode):
    text = config(echo.url, url(redis_server), TENANT_ROUTE, on_redis_error=mode, instances=2)
    gw = await gateway(text)
    link = gw.gateway.redis
    r = await get(gw, tenant="before")
    assert r.status == 200 and limits(r) == expected("/api", 4, 3600, 3, 900)
    assert link.state["state"] == "up"

    redis_server.kill()
    outage = [await timed_get(gw, tenant="during") for _ in range(3)]
    slowest = max(elapsed for _, elapsed in outage)
    assert slowest <= TIMEOUT + MARGIN, [elapsed for _, elapsed in outage]
    assert link.state["state"] == "down" and link.state["outages"] == 1
    rs = [r for r, _ in outage]
    if mode == "local":
        # This instance's share: rate/2, burst 4//2 = 2, from in-process buckets.
        assert [r.status for r in rs] == [200, 200, 429]
        assert limits(rs[0]) == expected("/api", 4, 3600, 1, 1800)
        assert limits(rs[1]) == expected("/api", 4, 3600, 0, 3600)
        assert_envelope(rs[2], 429, "RATE_LIMITED")
        assert rs[2].header("retry-after") == "1800"
        assert [rec["rate_limit"] for rec in gw.log[-3:]] == ["local:allowed", "local:allowed", "local:rejected"]
    elif mode == "allow":
        assert [r.status for r in rs] == [200, 200, 200]
        assert all(limits(r) == dict.fromkeys(LIMIT_HEADERS) for r in rs)
        assert [rec["rate_limit"] for rec in gw.log[-3:]] == ["allow"] * 3
    else:
        for r in rs:
            assert_envelope(r, 503, "RATE_LIMITER_UNAVAILABLE")
            assert r.header("retry-after") == "1"
            assert limits(r) == dict.fromkeys(LIMIT_HEADERS)
        assert [rec["rate_limit"] for rec in gw.log[-3:]] == ["deny"] * 3
    assert len(redis_messages(events, "redis lost")) == 1
    assert redis_messages(events, "redis back") == []

    await bounded(deferToThread(redis_server.restart))
    waits: list[float] = []

    async def shared_again() -> bool:
        r, elapsed = await timed_get(gw, tenant=f"probe-{len(waits)}")
        waits.append(elapsed)
        return r.status == 200 and r.header("x-ratelimit-remaining") == "3"   # Redis's burst, not the local share
    await poll("a decision computed by Redis after the restart", shared_again, 10.0)
    assert max(waits) <= TIMEOUT + MARGIN, waits         # nor while it reconnects
    assert link.state["state"] == "up" and link.state["outages"] == 1
    # Shared again: a key drained through another instance is empty here too.
    other = await gateway(text)
    assert await statuses(other, 5, tenant="shared") == [200, 200, 200, 200, 429]
    r = await get(gw, tenant="shared")
    assert_envelope(r, 429, "RATE_LIMITED")
    assert limits(r) == expected("/api", 4, 3600, 0, 3600)
    assert await redis(redis_server, "EXISTS", tenant_key("shared")) == 1
    lost, back = redis_messages(events, "redis lost"), redis_messages(events, "redis back")
    assert len(lost) == 1 and len(back) == 1, (lost, back)
    assert redis_server.url.removesuffix("/0") in lost[0] and redis_server.url.removesuffix("/0") in back[0]
    await assert_still_serves(gw)


# --- 6. Redis slow ----------------------------------------------------------------------------------------

def _debug_args() -> list[str]:
    """Redis >= 7 refuses DEBUG unless enable-debug-command allows it (here: local connections)."""
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.", out)
    return ["--enable-debug-command", "local"] if match is None or int(match.group(1)) >= 7 else []


@pytest.fixture
def debug_redis() -> Iterator[RedisServer]:
    """A redis-server (like the redis_server fixture) that takes DEBUG SLEEP."""
    server = RedisServer(extra_args=_debug_args())
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("mode", ["local", "allow", "deny"])
@pytest_twisted.ensureDeferred
async def test_a_sleeping_redis_is_not_waited_for(reactor, echo, gateway, debug_redis, events, mode):
    redis_server = debug_redis
    gw = await gateway(config(echo.url, url(redis_server), TENANT_ROUTE, on_redis_error=mode, instances=2))
    assert (await get(gw, tenant="before")).status == 200
    sleeping = bounded(deferToThread(redis_server.command, "DEBUG", "SLEEP", "1"))
    slept_from = time.monotonic()

    def unresponsive() -> bool:
        try:
            command(redis_server.port, "PING", timeout=0.05)
        except TimeoutError:
            return True
        return False

    async def asleep() -> bool:
        return await bounded(deferToThread(unresponsive))
    await poll("redis-server to be inside DEBUG SLEEP", asleep, 0.8, every=0.01)
    r, elapsed = await timed_get(gw, tenant="during")
    assert not sleeping.called and time.monotonic() - slept_from < 1.0   # answered during the sleep
    assert elapsed <= TIMEOUT + MARGIN, elapsed
    if mode == "local":
        assert r.status == 200 and limits(r) == expected("/api", 4, 3600, 1, 1800)
    elif mode == "allow":
        assert r.status == 200 and limits(r) == dict.fromkeys(LIMIT_HEADERS)
    else:
        assert_envelope(r, 503, "RATE_LIMITER_UNAVAILABLE")
        assert r.header("retry-after") == "1"
    assert gw.gateway.redis.state["state"] == "down"
    assert gw.log[-1]["rate_limit"] == {"local": "local:allowed", "allow": "allow", "deny": "deny"}[mode]
    assert await sleeping == "OK"
    waits: list[float] = []

    async def shared_again() -> bool:
        r, elapsed = await timed_get(gw, tenant=f"probe-{len(waits)}")
        waits.append(elapsed)
        return r.status == 200 and r.header("x-ratelimit-remaining") == "3"
    await poll("a decision computed by Redis after the sleep", shared_again, 10.0)
    assert max(waits) <= TIMEOUT + MARGIN, waits
    assert gw.gateway.redis.state["state"] == "up"
    assert len(redis_messages(events, "redis lost")) == 1 and len(redis_messages(events, "redis back")) == 1
    await assert_still_serves(gw)


# --- 7. long and binary key values ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    pytest.param(b"v" * 10_240, id="10KB"),
    pytest.param(bytes(range(0x80, 0x100)), id="binary"),
])
@pytest_twisted.ensureDeferred
async def test_a_huge_or_binary_header_key_is_hashed_into_a_bounded_redis_key(reactor, echo, gateway, redis_server, value):
    gw = await gateway(config(echo.url, url(redis_server),
                              "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Tenant', rate: 2/hour}}",
                              timeout=PATIENT))
    rs = [await get(gw, tenant=value) for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 429]
    assert limits(rs[1]) == expected("/api", 2, 3600, 0, 3600)
    keys = await redis(redis_server, "KEYS", PREFIX + "*", decode=False)
    assert keys == [f"{PREFIX}route:/api|/api|h#{hashlib.sha256(value).hexdigest()}".encode()]
    assert len(keys[0]) < 200 and keys[0].isascii()
    assert value[:32] not in keys[0]
    assert await statuses(gw, 2, tenant="plain") == [200, 200]   # another value, another bucket
    await assert_still_serves(gw)


# --- 8. password ----------------------------------------------------------------------------------------

@pytest.fixture
def password_server() -> Iterator[RedisServer]:
    server = RedisServer(password="test-only-redis-password-9f3k")
    server.start()
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_a_password_protected_redis(reactor, echo, gateway, password_server, events):
    route = "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Tenant', rate: 2/hour}}"
    with pytest.raises(RedisReplyError):
        await redis(password_server, "PING", auth=False)          # it really wants the password
    gw = await gateway(config(echo.url, url(password_server), route, timeout=PATIENT))
    assert await statuses(gw, 3, tenant="t") == [200, 200, 429]
    assert await redis(password_server, "EXISTS", tenant_key("t")) == 1
    assert gw.gateway.redis.state["state"] == "up"

    wrong = f'url: "redis://:wrong-password@127.0.0.1:{password_server.port}/0"'
    bad = await gateway(config(echo.url, wrong, route, on_redis_error="deny"))
    for _ in range(2):
        r, elapsed = await timed_get(bad, tenant="u")
        assert_envelope(r, 503, "RATE_LIMITER_UNAVAILABLE")
        assert elapsed <= TIMEOUT + MARGIN, elapsed
    assert bad.gateway.redis.state["state"] == "down"
    lost = redis_messages(events, "redis lost")
    assert len(lost) == 1, lost
    assert not any("wrong-password" in formatEvent(e) or password_server.password in formatEvent(e) for e in events)
    assert await redis(password_server, "EXISTS", tenant_key("u")) == 0
    await assert_still_serves(gw)
    await assert_still_serves(bad)


@pytest_twisted.ensureDeferred
async def test_a_wrong_redis_password_says_why_once_and_leaves_no_unhandled_error(reactor, echo, gateway,
                                                                                password_server, events):
    import gc
    route = "  - {prefix: /api, upstream: u, rate_limit: {key: 'header:X-Tenant', rate: 2/hour}}"
    wrong = f'url: "redis://:wrong-password@127.0.0.1:{password_server.port}/0"'
    bad = await gateway(config(echo.url, wrong, route, on_redis_error="deny"))
    r, _ = await timed_get(bad, tenant="u")
    assert_envelope(r, 503, "RATE_LIMITER_UNAVAILABLE")
    await bad.gateway.stopService()         # the gateway lets go of its Redis connection objects
    gc.collect()
    lost = redis_messages(events, "redis lost")
    assert len(lost) == 1 and "auth" in lost[0].lower() and "wrong-password" not in lost[0], lost
    no_tracebacks(events)


# --- 9. Sentinel ----------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_limits_follow_a_sentinel_failover(reactor, echo, gateway, redis_sentinel_setup, events):
    setup = redis_sentinel_setup
    sentinel = f'sentinel: {{master: mymaster, hosts: ["127.0.0.1:{setup.sentinel.port}"]}}'
    text = config(echo.url, sentinel, TENANT_ROUTE, on_redis_error="deny").replace(
        f"timeout: {int(TIMEOUT * 1000)}ms", "timeout: 200ms")
    gw = await gateway(text)
    assert await statuses(gw, 5, tenant="drained") == [200, 200, 200, 200, 429]
    old = setup.current_master()
    assert old is setup.master
    assert await redis(old, "EXISTS", tenant_key("drained")) == 1

    async def replicated() -> bool:
        return await redis(setup.replica, "EXISTS", tenant_key("drained")) == 1
    await poll("the drained bucket to reach the replica", replicated, 5.0)

    new_addr = await bounded(deferToThread(setup.sentinel.failover), 20.0)
    new = setup.server_at(new_addr[1])
    assert new is setup.replica
    probes = iter(range(1000))

    async def limiting_on_new_master() -> bool:
        tenant = f"probe-{next(probes)}"
        r = await get(gw, tenant=tenant)
        return (r.status == 200 and r.header("x-ratelimit-remaining") == "3"
                and await redis(new, "EXISTS", tenant_key(tenant)) == 1)
    await poll("a decision made on the new master", limiting_on_new_master, 15.0, every=0.1)
    # The state the old master had came along: the drained tenant is still limited.
    r = await get(gw, tenant="drained")
    assert_envelope(r, 429, "RATE_LIMITED")
    assert await statuses(gw, 5, tenant="after") == [200, 200, 200, 200, 429]
    assert float(await redis(new, "HGET", tenant_key("after"), "t")) < 0.01
    assert gw.gateway.redis.state["state"] == "up"
    await assert_still_serves(gw)
