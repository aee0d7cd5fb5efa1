"""Reloading the config (SIGHUP, or `reload()` in the Manhole) while the gateway serves.

In-process first (a gateway built from a config FILE, in the test reactor): new routes answer,
bucket and breaker state carry over for unchanged tiers and upstreams, a request in flight
finishes on the old pipeline, an invalid file is refused with every problem logged, and
restart-only settings keep their running value. Then the real daemon: a bounded load runs
while the file changes and SIGHUP arrives, and not one request fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import io
import signal
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.conftest import listen, parse_responses, quiet_site, raw, running_gateways, with_defaults
from tests.integration.test_lifecycle import Daemon, assert_clean_shutdown, assert_port_free, free_port
from txgateway.config.schema import load_config
from txgateway.service.gateway import Gateway

WAIT = 10.0          # every bounded wait in this file


def get(path: str, close: bool = True) -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: api.test\r\n" + ("Connection: close\r\n" if close else "") + "\r\n").encode()


async def fetch(port: int, path: str) -> Any:
    (resp,) = parse_responses(await raw(port, get(path), read_timeout=WAIT))
    return resp


async def poll(condition: Callable[[], bool], reactor: Any, what: str, timeout: float = WAIT) -> None:
    """Wait (bounded) until condition() holds, checking every 20 ms in the reactor."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await deferLater(reactor, 0.02, lambda: None)


@dataclasses.dataclass
class FileGateway:
    gateway: Gateway
    port: int
    path: Path
    log: list[str]          # every txgateway log line, formatted

    def write(self, text: str) -> None:
        self.path.write_text(with_defaults(text))

    def logged(self, fragment: str) -> list[str]:
        return [line for line in self.log if fragment in line]


@pytest_twisted.async_yield_fixture()
async def file_gateway(reactor: Any, tmp_path: Path) -> Any:
    """Factory: `await file_gateway(yaml)` -> FileGateway on a free port, built from a FILE
    (the conftest `gateway` fixture parses text named "test.yaml", which reload cannot re-read).
    As there, any traceback the gateway logs fails the test."""
    async with running_gateways(reactor) as runner:
        async def start(yaml_text: str) -> FileGateway:
            path = tmp_path / "gateway.yaml"
            path.write_text(with_defaults(yaml_text))
            gw, port = await runner.start(load_config(str(path)))
            return FileGateway(gw, port, path, runner.lines)

        yield start


ORDERS_ROUTE = "  - {prefix: /api/orders, upstream: users, rewrite_prefix: /orders}\n"


def users_only(url: str) -> str:
    """Upstream `users` at `url` and the one route /api/users to it (no listen: or access_log:)."""
    return f"""\
        upstreams:
          users: {{targets: ["{url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
        """


def limited_config(url: str, rate: str, extra_route: str = "") -> str:
    return f"""\
        listen: [{{endpoint: "tcp:0:interface=127.0.0.1"}}]
        access_log: "off"
        rate_limits:
          tiers:
            free: {{rate: {rate}}}
        upstreams:
          users: {{targets: ["{url}"], connect_timeout: 1s, timeout: 5s}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users, rate_limit: {{key: ip}}}}
        """ + extra_route


@pytest_twisted.ensureDeferred
async def test_a_new_route_answers_and_a_drained_bucket_stays_drained_at_the_new_tier_rate(file_gateway, echo):
    gw = await file_gateway(limited_config(echo.url, "3/hour"))
    statuses = [(await fetch(gw.port, "/api/users/1")).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert (await fetch(gw.port, "/api/orders/1")).status == 404
    buckets = gw.gateway.local_buckets.buckets
    (key,) = buckets
    assert key.startswith("route:/api/users|free|ip:")

    gw.write(limited_config(echo.url, "5/hour", "  - {prefix: /api/orders, upstream: users, rewrite_prefix: /orders}\n"))
    assert gw.gateway.reload() == []

    resp = await fetch(gw.port, "/api/orders/9")
    assert resp.status == 200 and resp.json()["path"] == "/orders/9"
    # Same tier name, same route: the same bucket, still empty, now refilling at 5/hour.
    resp = await fetch(gw.port, "/api/users/1")
    assert resp.status == 429, resp.body
    assert resp.header("x-ratelimit-limit") == "5"
    assert list(buckets) == [key] and gw.gateway.local_buckets.peek(key) < 1
    assert gw.logged("reload: ") and gw.logged("applied: 2 routes, 1 upstreams (1 kept as they were)")


def breaker_config(url: str, orders_timeout: str) -> str:
    breaker = "circuit_breaker: {consecutive_failures: 5, open_for: 1m}"
    return f"""\
        upstreams:
          users: {{targets: ["{url}"], timeout: 5s, {breaker}}}
          orders: {{targets: ["{url}"], timeout: {orders_timeout}, {breaker}}}
        routes:
          - {{prefix: /api/users, upstream: users}}
          - {{prefix: /api/orders, upstream: orders}}
        """


@pytest_twisted.ensureDeferred
async def test_a_tripped_breaker_stays_open_on_an_unchanged_upstream_and_a_changed_one_starts_fresh(
        file_gateway, echo):
    gw = await file_gateway(breaker_config(echo.url, "5s"))
    for name in ("users", "orders"):
        gw.gateway.breakers.trip(name, "test")
        assert (await fetch(gw.port, f"/api/{name}/1")).status == 503
    users_before, orders_before = gw.gateway.breakers["users"], gw.gateway.breakers["orders"]
    users_group = gw.gateway.proxy.groups["users"]

    gw.write(breaker_config(echo.url, "4s"))
    assert gw.gateway.reload() == []

    assert gw.gateway.breakers["users"] is users_before and users_before.state == "open"
    assert gw.gateway.proxy.groups["users"] is users_group          # pools, breaker, health: kept
    resp = await fetch(gw.port, "/api/users/1")
    assert resp.status == 503 and resp.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"
    orders = gw.gateway.breakers["orders"]
    assert orders is not orders_before and orders.state == "closed"
    assert (await fetch(gw.port, "/api/orders/1")).status == 200
    assert gw.gateway.proxy.groups["orders"].config.timeout == 4.0


class HeldResource(Resource):
    """Answers each request only when the test releases it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.held: list[Any] = []

    def render_GET(self, request: Any) -> Any:
        self.held.append(request)
        return NOT_DONE_YET

    def release(self, body: bytes = b"done") -> None:
        for request in self.held:
            if not request._disconnected:
                request.setHeader(b"Content-Type", b"text/plain")
                request.write(body)
                request.finish()
        self.held.clear()


def versioned_config(url: str, version: str, timeout: str, extra_route: str = "") -> str:
    return f"""\
        upstreams:
          slow: {{targets: ["{url}"], timeout: {timeout}}}
        routes:
          - prefix: /slow
            upstream: slow
            response_headers: {{set: {{X-Config-Version: {version}}}}}
        """ + extra_route


def two_requests_on_one_connection(port: int, first_done: threading.Event) -> list[tuple[int, str | None, bytes]]:
    """Two GETs on one keep-alive connection, the second after the first's answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    out = []
    try:
        for path in ("/slow/1", "/slow/2"):
            conn.request("GET", path, headers={"Host": "api.test"})
            resp = conn.getresponse()
            out.append((resp.status, resp.getheader("X-Config-Version"), resp.read()))
            first_done.set()
    finally:
        conn.close()
    return out


@pytest_twisted.ensureDeferred
async def test_a_request_in_flight_finishes_on_the_old_pipeline_and_its_connection_then_takes_the_new_one(
        reactor, file_gateway):
    held = HeldResource()
    site = quiet_site(held)
    upstream = await listen(reactor, site)
    try:
        url = f"http://127.0.0.1:{upstream.getHost().port}"
        gw = await file_gateway(versioned_config(url, "old", "10s"))
        old_group = gw.gateway.proxy.groups["slow"]
        first_done = threading.Event()
        pending = deferToThread(two_requests_on_one_connection, gw.port, first_done)
        await poll(lambda: len(held.held) == 1, reactor, "the upstream to hold the first request")

        # The upstream changes too: its old group (pool) closes while the request is on it.
        gw.write(versioned_config(url, "new", "9s", "  - {prefix: /added, upstream: slow}\n"))
        assert gw.gateway.reload() == []
        assert gw.gateway.proxy.groups["slow"] is not old_group
        held.release(b"first")
        await poll(first_done.is_set, reactor, "the first answer")
        await poll(lambda: len(held.held) == 1, reactor, "the upstream to hold the second request")
        held.release(b"second")

        first, second = await pending
        assert first == (200, "old", b"first")      # began before the reload: the old header rules
        assert second == (200, "new", b"second")    # same connection, next request: the new ones
        assert gw.gateway.proxy.groups["slow"].config.timeout == 9.0
    finally:
        held.release()
        await upstream.stopListening()


def problems_config(url: str) -> str:
    return f"""\
        listen: [{{endpoint: "tcp:0:interface=127.0.0.1"}}]
        access_log: "off"
        limits: {{header_timeout: soon}}
        upstreams:
          users: {{targets: ["{url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
          - {{prefix: /api/orders, upstream: orders}}
        """


@pytest_twisted.ensureDeferred
async def test_an_invalid_file_is_refused_every_problem_logged_and_the_old_config_keeps_serving(file_gateway, echo):
    gw = await file_gateway(f"""\
        upstreams:
          users: {{targets: ["{echo.url}"]}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
        """)
    running, pipeline = gw.gateway.config, gw.gateway.pipeline

    gw.write(problems_config(echo.url))
    problems = gw.gateway.reload()

    path = str(gw.path)
    assert sorted(problems) == [                    # every problem, not only the first
        f'{path}:3: limits.header_timeout: expected a duration like "250ms", "5s" or "1m", got "soon"',
        f'{path}:8: routes[1].upstream: no upstream named "orders" (defined: users)',
    ]
    refused = gw.logged("reload refused")
    assert len(refused) == 2 and all(any(p in line for line in refused) for p in problems)
    assert gw.gateway.config is running and gw.gateway.pipeline is pipeline
    assert (await fetch(gw.port, "/api/users/3")).status == 200
    assert (await fetch(gw.port, "/api/orders/3")).status == 404

    gw.path.write_text("routes: [\n")              # not even YAML
    (problem,) = gw.gateway.reload()
    assert problem.startswith(f"{path}:2: invalid YAML:")
    gw.path.unlink()                                # gone
    assert gw.gateway.reload() == [f"{path}: cannot read config: No such file or directory"]
    assert len(gw.logged("reload refused")) == 4
    assert gw.gateway.config is running
    assert (await fetch(gw.port, "/api/users/4")).status == 200


@pytest_twisted.ensureDeferred
async def test_restart_only_changes_warn_and_keep_the_running_values(file_gateway, echo):
    base = users_only(echo.url)
    gw = await file_gateway('admin: {endpoint: "tcp:0:interface=127.0.0.1"}\ndrain_timeout: 5s\n' + textwrap.dedent(base))
    running = gw.gateway.config
    admin_port = (await gw.gateway.admin._waitingForPort).getHost().port

    gw.write('listen: [{endpoint: "tcp:0:interface=127.0.0.2"}]\naccess_log: "off"\n'
             'admin: {endpoint: "tcp:9999:interface=127.0.0.1"}\ndrain_timeout: 1s\n'
             + textwrap.dedent(base) + ORDERS_ROUTE)
    assert gw.gateway.reload() == []

    for what in ("listen", "admin", "drain_timeout"):
        (line,) = gw.logged(f"reload: {what} changed")
        assert "needs a restart, the running value stays" in line
    config = gw.gateway.config
    assert (config.listen, config.admin, config.drain_timeout) == (running.listen, running.admin, 5.0)
    assert (await fetch(gw.port, "/api/orders/1")).json()["path"] == "/orders/1"   # the rest applied
    admin_get = get("/healthz").replace(b"Host: api.test", b"Host: 127.0.0.1")   # the admin answers no other name
    resp = parse_responses(await raw(admin_port, admin_get, read_timeout=WAIT))
    assert resp and resp[0].status == 200                                  # admin where it was


@pytest_twisted.ensureDeferred
async def test_the_manholes_reload_reloads_and_prints_the_outcome(file_gateway, echo):
    from txgateway.ops.manhole import namespace
    base = users_only(echo.url)
    gw = await file_gateway(base)
    reload = namespace(gw.gateway)["reload"]

    gw.write(textwrap.dedent(base) + ORDERS_ROUTE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reload()
    assert out.getvalue() == f"reloaded {gw.path}\n"
    assert (await fetch(gw.port, "/api/orders/5")).status == 200
    assert gw.logged("manhole: reload requested")

    gw.write(problems_config(echo.url))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reload()
    printed = sorted(out.getvalue().splitlines())
    assert len(printed) == 2 and "limits.header_timeout" in printed[0] and 'no upstream named "orders"' in printed[1]
    assert len(gw.logged("reload refused")) == 2
    assert (await fetch(gw.port, "/api/orders/6")).status == 200          # the reloaded config still serves


# --- the real daemon -------------------------------------------------------------------------

LOAD_SECONDS = 3.0
LOAD_RATE = 200          # requests per second, over all connections
LOAD_CONNECTIONS = 4


def daemon_config(port: int, url: str, tmp_path: Path, rate: str, extra_route: str = "") -> str:
    return textwrap.dedent(f"""\
        listen:
          - endpoint: "tcp:{port}:interface=127.0.0.1"
        access_log: "{tmp_path / 'access.log'}"
        drain_timeout: 5s
        rate_limits:
          tiers:
            free: {{rate: {rate}}}
        upstreams:
          users: {{targets: ["{url}"], connect_timeout: 1s, timeout: 5s}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
          - {{prefix: /api/limited, upstream: users, rate_limit: {{key: ip}}}}
        """) + extra_route


@dataclasses.dataclass
class LoadResult:
    statuses: dict[int, int]
    errors: list[str]

    @property
    def total(self) -> int:
        return sum(self.statuses.values())


def run_load(port: int, seconds: float, rate: float, connections: int) -> LoadResult:
    """Keep-alive connections, each paced to rate/connections requests per second, for
    `seconds`; every answer's status counted, every exception (reset, timeout) recorded."""
    lock = threading.Lock()
    result = LoadResult({}, [])
    interval = connections / rate
    stop_at = time.monotonic() + seconds

    def one_connection(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
        next_at = time.monotonic() + n * interval / connections
        i = 0
        try:
            while next_at < stop_at:
                pause = next_at - time.monotonic()
                if pause > 0:
                    time.sleep(pause)            # pacing the load, not waiting for a condition
                i += 1
                try:
                    conn.request("GET", f"/api/users/{n}-{i}", headers={"Host": "api.test"})
                    resp = conn.getresponse()
                    resp.read()
                    status = resp.status
                    if resp.getheader("connection", "").lower() == "close":
                        conn.close()
                except Exception as e:           # any failure is a failed request
                    with lock:
                        result.errors.append(f"{n}-{i}: {e!r}")
                    conn.close()
                else:
                    with lock:
                        result.statuses[status] = result.statuses.get(status, 0) + 1
                next_at += interval
        finally:
            conn.close()

    threads = [threading.Thread(target=one_connection, args=(n,)) for n in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 2 * WAIT)
    return result


def get_status(port: int, path: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path, headers={"Host": "api.test"})
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_sighup_under_load_loses_no_request_and_refuses_an_invalid_file(reactor, echo, tmp_path):
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(daemon_config(port, echo.url, tmp_path, "1000/minute"))
    daemon = Daemon(tmp_path, config)
    try:
        await deferToThread(daemon.wait_for_port, port)
        # A first answer means the reactor runs, so the SIGHUP handler (installed after
        # start-up) is in place.
        status, headers = await deferToThread(get_status, port, "/api/limited/1")
        assert (status, headers["x-ratelimit-limit"]) == (200, "1000"), daemon.output
        assert (await deferToThread(get_status, port, "/api/added/1"))[0] == 404

        load: Deferred[LoadResult] = deferToThread(run_load, port, LOAD_SECONDS, LOAD_RATE, LOAD_CONNECTIONS)
        await deferLater(reactor, 0.5, lambda: None)        # the load is under way
        config.write_text(daemon_config(port, echo.url, tmp_path, "2000/minute",
                                        "  - {prefix: /api/added, upstream: users, rewrite_prefix: /added}\n"))
        daemon.proc.send_signal(signal.SIGHUP)
        await poll(lambda: "reload: " in daemon.output and " applied: " in daemon.output, reactor,
                   "the reload to be applied")
        assert not load.called, "the load ended before the reload: it proves nothing"
        status, headers = await deferToThread(get_status, port, "/api/added/1")
        assert status == 200, daemon.output
        status, headers = await deferToThread(get_status, port, "/api/limited/2")
        assert (status, headers["x-ratelimit-limit"]) == (200, "2000")   # the tier's new rate

        await deferLater(reactor, 0.5, lambda: None)
        config.write_text(problems_config(echo.url))
        daemon.proc.send_signal(signal.SIGHUP)
        await poll(lambda: daemon.output.count("reload refused") == 2, reactor, "the invalid file to be refused")
        assert not load.called
        result = await load

        assert result.errors == [], result.errors[:10]
        assert set(result.statuses) == {200}, result.statuses
        assert result.total >= LOAD_RATE * LOAD_SECONDS * 0.5, result.statuses   # a real load ran
        # The refused file changed nothing: the reloaded config still serves, route and tier.
        assert (await deferToThread(get_status, port, "/api/added/2"))[0] == 200
        status, headers = await deferToThread(get_status, port, "/api/limited/3")
        assert (status, headers["x-ratelimit-limit"]) == (200, "2000")
        refused = [line for line in daemon.output.splitlines() if "reload refused" in line]
        assert any("limits.header_timeout" in line for line in refused), refused
        assert any('no upstream named "orders"' in line for line in refused), refused

        daemon.proc.send_signal(signal.SIGTERM)
        code = await deferToThread(daemon.wait)
        assert_clean_shutdown(daemon, code)
        assert_port_free(port)
    finally:
        daemon.kill()


PLAIN_ROUTES = """\
upstreams:
  users: {{targets: ["{url}"]}}
routes:
{routes}"""


@pytest_twisted.ensureDeferred
async def test_auth_added_through_a_jwks_url_refuses_the_reload_instead_of_opening_routes(file_gateway, echo):
    users = "  - {prefix: /api/users, upstream: users}\n"
    gw = await file_gateway(PLAIN_ROUTES.format(url=echo.url, routes=users))
    gw.write('auth: {jwt: {algorithms: [RS256], jwks_url: "http://127.0.0.1:9/jwks.json"}}\n'
             + PLAIN_ROUTES.format(url=echo.url, routes=users + "  - {prefix: /api/private, upstream: users, auth: required}\n"))
    problems = gw.gateway.reload()
    assert problems == ["auth.jwt.jwks_url changed (None -> http://127.0.0.1:9/jwks.json): that needs a restart"]
    assert (await fetch(gw.port, "/api/private/secrets")).status == 404      # never proxied unauthenticated
    assert (await fetch(gw.port, "/api/users/1")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_redis_backed_limiter_added_refuses_the_reload(file_gateway, echo):
    users = "  - {prefix: /api/users, upstream: users}\n"
    gw = await file_gateway(PLAIN_ROUTES.format(url=echo.url, routes=users))
    gw.write('redis: {url: "redis://127.0.0.1:9"}\nrate_limits: {backend: redis, tiers: {free: {rate: 3/hour}}}\n'
             + PLAIN_ROUTES.format(url=echo.url, routes="  - {prefix: /api/users, upstream: users, rate_limit: {key: ip}}\n"))
    assert gw.gateway.reload() == ["rate_limits: a Redis-backed limiter added or removed needs a restart"]
    assert (await fetch(gw.port, "/api/users/1")).status == 200


@pytest_twisted.ensureDeferred
async def test_buckets_stay_with_their_route_when_a_route_is_inserted_before_it(file_gateway, echo):
    def cfg(routes: str) -> str:
        return "rate_limits: {tiers: {free: {rate: 3/hour}}}\n" + PLAIN_ROUTES.format(url=echo.url, routes=routes)
    a = "  - {prefix: /api/a, upstream: users, rate_limit: {key: ip}}\n"
    b = "  - {prefix: /api/b, upstream: users, rate_limit: {key: ip}}\n"
    new = "  - {prefix: /api/new, upstream: users, rate_limit: {key: ip}}\n"
    gw = await file_gateway(cfg(a + b))
    assert [(await fetch(gw.port, "/api/a/1")).status for _ in range(4)] == [200, 200, 200, 429]
    gw.write(cfg(new + a + b))
    assert gw.gateway.reload() == []
    got = {p: (await fetch(gw.port, p)).status for p in ("/api/a/1", "/api/new/1")}
    assert got == {"/api/a/1": 429, "/api/new/1": 200}


def composed_config(url: str, deadline: str) -> str:
    return f"""\
        upstreams:
          users: {{targets: ["{url}"], timeout: 5s, circuit_breaker: {{consecutive_failures: 5, open_for: 1m}}}}
        routes:
          - {{prefix: /api/users, upstream: users}}
          - prefix: /api/both
            compose:
              path: /{{id}}
              deadline: {deadline}
              calls:
                a: {{upstream: users, path: "/users/{{id}}", group: a}}
                b: {{upstream: users, path: "/users/{{id}}/more", group: b}}
        """


@pytest_twisted.ensureDeferred
async def test_composed_calls_share_the_kept_upstream_groups_across_a_reload(file_gateway, echo):
    gw = await file_gateway(composed_config(echo.url, "5s"))
    resp = await fetch(gw.port, "/api/both/1")
    assert resp.status == 200 and resp.json()["b"]["path"] == "/users/1/more"
    gw.gateway.breakers.trip("users", "test")
    gw.write(composed_config(echo.url, "4s"))
    assert gw.gateway.reload() == []
    resp = await fetch(gw.port, "/api/both/1")
    assert resp.status == 503 and resp.json()["error"]["code"] == "UPSTREAM_UNAVAILABLE"   # the same breaker
    gw.gateway.breakers.reset("users")
    assert (await fetch(gw.port, "/api/both/2")).json()["a"]["path"] == "/users/2"
