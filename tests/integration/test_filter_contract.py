"""The filter contract's guard, probed through real sockets with a filter that raises.

A bug in one filter must stay in that filter: the client gets a 500 envelope (or, once the
response started, a cut connection), the upstream's breaker and health get no verdict, the
connection's next pipelined request is answered, and the log names the filter and route.
Also: the body phase sees and may rewrite what the upstream sends, the finish phase runs
once per request, and a `respond:` route answers without an upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail

from tests.conftest import parse_responses, raw, running_gateways, with_defaults
from txgateway.config.schema import parse_config
from txgateway.testing import with_filter

CONFIG = """
upstreams:
  users: {{targets: ["{url}"], circuit_breaker: {{consecutive_failures: 2, open_for: 30s}}}}
routes:
  - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
"""


class Probe:
    """A filter whose `phase` raises for requests whose path contains b"boom"."""

    name = "probe"

    def __init__(self, phase: str) -> None:
        self.phase = phase
        self.finished = 0
        self.seen: list[bytes] = []

    def on_request(self, ctx: Any) -> Any:
        if self.phase == "request" and b"boom" in ctx.path:
            raise RuntimeError("probe: request bug")
        if self.phase == "deferred" and b"boom" in ctx.path:
            return fail(RuntimeError("probe: deferred bug"))
        return None

    def on_response_head(self, ctx: Any, head: Any) -> None:
        if self.phase == "head" and b"boom" in ctx.path:
            raise RuntimeError("probe: head bug")

    def on_response_body(self, ctx: Any, chunk: bytes, end: bool) -> bytes:
        self.seen.append(chunk)
        if self.phase == "body" and b"boom" in ctx.path:
            raise RuntimeError("probe: body bug")
        return chunk

    def on_finished(self, ctx: Any) -> None:
        self.finished += 1
        if self.phase == "finished" and b"boom" in ctx.path:
            raise RuntimeError("probe: finish bug")


async def start(runner: Any, upstream_url: str, probe: Any, text: str = CONFIG) -> Any:
    config = parse_config(with_defaults(text.format(url=upstream_url)), "test.yaml")
    gw, port = await runner.start(config)
    gw.switch.pipeline = with_filter(gw.pipeline, probe)
    return gw, port


def pipelined(*paths: str) -> bytes:
    reqs = [f"GET {p} HTTP/1.1\r\nHost: a\r\n\r\n".encode() for p in paths[:-1]]
    reqs.append(f"GET {paths[-1]} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode())
    return b"".join(reqs)


def assert_no_verdict(gw: Any) -> None:
    """The upstream was never blamed: no failure in its breaker's window, none on its target."""
    snapshot = gw.breakers["users"].snapshot()
    assert (snapshot["state"], snapshot["window_failures"], snapshot["trips"]) == ("closed", 0, 0)
    assert gw.proxy.groups["users"].balancer.members[0].failures == 0


def assert_contained(runner: Any, phase: str) -> None:
    """The probe's bug was logged once, naming the filter, its phase and the route; nothing else crashed."""
    assert len(runner.crashes) == 1, [e["log_failure"].getTraceback() for e in runner.crashes]
    line = next(x for x in runner.lines if "filter probe failed" in x)
    assert f"filter probe failed in its {phase} phase on route /api/users for GET /api/users/boom" in line
    runner.crashes.clear()


@pytest.mark.parametrize("phase", ["request", "deferred", "head"])
@pytest_twisted.ensureDeferred
async def test_a_raising_filter_gives_a_500_envelope_and_the_next_pipelined_request_is_served(reactor, echo, phase):
    probe = Probe(phase)
    async with running_gateways(reactor) as runner:
        gw, port = await start(runner, echo.url, probe)
        for _ in range(3):      # three bugs in a row: consecutive_failures is 2
            rs = parse_responses(await raw(port, pipelined("/api/users/1", "/api/users/boom", "/api/users/2")))
            assert [r.status for r in rs] == [200, 500, 200]
            envelope = json.loads(rs[1].body)["error"]
            assert (envelope["code"], envelope["status"]) == ("INTERNAL", 500)
            assert envelope["message"] == "the gateway failed to handle the request"
            assert rs[1].header("x-correlation-id") == envelope["correlation_id"]
            assert [r.json()["path"] for r in (rs[0], rs[2])] == ["/users/1", "/users/2"]
        assert_no_verdict(gw)
        shown = {"request": "request", "deferred": "request", "head": "response head"}[phase]
        assert len(runner.crashes) == 3
        runner.crashes[1:] = []
        assert_contained(runner, shown)
        assert probe.finished == 9          # the finish phase saw every request, the 500s too


@pytest_twisted.ensureDeferred
async def test_a_body_filter_that_raises_cuts_that_response_only(reactor, echo):
    probe = Probe("body")
    async with running_gateways(reactor) as runner:
        gw, port = await start(runner, echo.url, probe)
        for _ in range(3):
            cut = await raw(port, pipelined("/api/users/boom", "/api/users/2"))
            assert parse_responses(cut) == []           # the connection closed before any answer
            (ok,) = parse_responses(await raw(port, pipelined("/api/users/3")))
            assert ok.status == 200 and ok.json()["path"] == "/users/3"
        assert_no_verdict(gw)
        assert len(runner.crashes) == 3
        runner.crashes[1:] = []
        assert_contained(runner, "response body")


@pytest_twisted.ensureDeferred
async def test_a_finish_filter_that_raises_still_lets_the_access_log_and_counters_run(reactor, echo):
    probe = Probe("finished")
    async with running_gateways(reactor) as runner:
        gw, port = await start(runner, echo.url, probe)
        before = gw.stats.finished
        rs = parse_responses(await raw(port, pipelined("/api/users/boom", "/api/users/2")))
        assert [r.status for r in rs] == [200, 200]
        assert gw.stats.finished == before + 2
        assert len(runner.crashes) == 1
        assert "filter probe failed in its finish phase on route /api/users" in runner.lines[-1] or any(
            "filter probe failed in its finish phase on route /api/users" in x for x in runner.lines)
        runner.crashes.clear()


class Upper:
    """A body filter that holds the whole body and releases it upper-cased at the end."""

    name = "upper"
    on_request = None
    on_finished = None

    def __init__(self) -> None:
        self.held = b""

    def on_response_head(self, ctx: Any, head: Any) -> None:
        head.length = None                   # the length is the filter's to decide now

    def on_response_body(self, ctx: Any, chunk: bytes, end: bool) -> bytes:
        self.held += chunk
        if not end:
            return b""
        out, self.held = self.held.upper(), b""
        return out


@pytest_twisted.ensureDeferred
async def test_a_body_filter_can_hold_and_rewrite_the_upstream_body(reactor, echo):
    async with running_gateways(reactor) as runner:
        _, port = await start(runner, echo.url, Upper())
        (r,) = parse_responses(await raw(port, pipelined("/api/users/7")))
        assert r.status == 200 and r.header("transfer-encoding") == "chunked"
        assert json.loads(r.body)["PATH"] == "/USERS/7"


@pytest_twisted.ensureDeferred
async def test_a_respond_route_answers_from_the_gateway_through_the_routes_filters(reactor):
    text = """
    upstreams:
      users: {targets: ["http://127.0.0.1:9"]}
    routes:
      - {prefix: /old, respond: {status: 308, headers: {Location: "https://new.example/"}}}
      - prefix: /maintenance
        respond: {status: 503, body: {error: "down for maintenance"}, headers: {Retry-After: "120"}}
        response_headers: {set: {X-Served-By: gateway}}
      - {prefix: /api, upstream: users}
    """
    async with running_gateways(reactor) as runner:
        _, port = await runner.start(parse_config(with_defaults(text), "test.yaml"))
        old, down, again = parse_responses(await raw(port, pipelined("/old/page", "/maintenance", "/old")))
        assert old.status == 308 and old.header("location") == "https://new.example/" and old.body == b""
        assert down.status == 503 and json.loads(down.body) == {"error": "down for maintenance"}
        assert down.header("content-type") == "application/json" and down.header("retry-after") == "120"
        assert down.header("x-served-by") == "gateway" and down.header("x-content-type-options") == "nosniff"
        assert again.status == 308
        assert not runner.crashes


@pytest_twisted.ensureDeferred
async def test_a_pending_filter_is_cancelled_when_the_client_leaves(reactor, echo):
    """A request hook waiting on I/O is cancelled when the client goes: no answer is written
    to a closed connection, and no traceback."""
    waiting: list[Deferred[Any]] = []

    class Waits:
        name = "waits"
        on_response_head = on_response_body = on_finished = None

        def on_request(self, ctx: Any) -> Any:
            d: Deferred[Any] = Deferred()
            waiting.append(d)
            return d

    async with running_gateways(reactor) as runner:
        _, port = await start(runner, echo.url, Waits())
        await raw(port, b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\n\r\n", read_timeout=0.3)
        assert len(waiting) == 1
        for _ in range(50):
            if waiting[0].called:
                break
            await deferLater(reactor, 0.02)
        assert waiting[0].called          # cancelled
        assert not runner.crashes


async def deferLater(reactor: Any, seconds: float) -> None:
    from twisted.internet.task import deferLater as later
    await later(reactor, seconds, lambda: None)
