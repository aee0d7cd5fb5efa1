"""`compose:` through real sockets: several upstream calls, one JSON answer."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.web.server import NOT_DONE_YET

from tests.conftest import Upstream, assert_envelope, js, mint_token, parse_responses, raw


async def get(port: int, target: str, headers: str = "") -> Any:
    data = await raw(port, f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}Connection: close\r\n\r\n".encode())
    (response,) = parse_responses(data)
    return response


def profile_config(users: Upstream, orders: Upstream, extra: str = "", orders_extra: str = "") -> str:
    return f"""
    upstreams:
      users: {{targets: ["{users.url}"], connect_timeout: 1s, timeout: 2s}}
      orders: {{targets: ["{orders.url}"], connect_timeout: 1s, timeout: 2s}}
    routes:
      - prefix: /api/profile
        compose:
          path: /{{id}}
          {extra}
          calls:
            user: {{upstream: users, path: "/users/{{id}}"}}
            orders: {{upstream: orders, path: "/orders?customer={{user.customer_id}}", after: user, group: orders{orders_extra}}}
      - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
    """


@pytest_twisted.ensureDeferred
async def test_two_calls_merge_into_one_answer_with_the_second_using_the_first(gateway, upstreams):
    users = await upstreams({"/users/7": js({"id": 7, "name": "Ann", "customer_id": "c-9"})})
    orders = await upstreams({"/orders?customer=c-9": js([{"id": 1}, {"id": 2}])})
    gw = await gateway(profile_config(users, orders))
    resp = await get(gw.port, "/api/profile/7")
    assert resp.status == 200, resp.body
    assert resp.json() == {"id": 7, "name": "Ann", "customer_id": "c-9", "orders": [{"id": 1}, {"id": 2}]}
    assert resp.header("x-gateway-completed") == "true"
    assert resp.header("content-type") == "application/json"
    record = gw.log[-1]
    assert [(c["call"], c["upstream"], c["status"]) for c in record["calls"]] == [
        ("user", "users", 200), ("orders", "orders", 200)]
    assert all(c["ms"] >= 0 for c in record["calls"])
    assert "completed" not in record                  # noted only for partial answers
    durations = gw.gateway.stats.upstream_durations()   # each call counts in its upstream's metrics
    assert sum(durations["users"].counts) == sum(durations["orders"].counts) == 1


class Held:
    """Requests an upstream holds unanswered; `arrived(n)` fires once n are held."""

    def __init__(self) -> None:
        self.requests: list[Any] = []
        self.lost: list[Any] = []
        self.waiters: list[tuple[int, Deferred[None]]] = []

    def __call__(self, request: Any) -> Any:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.lost.append(request))
        for n, d in list(self.waiters):
            if len(self.requests) >= n:
                self.waiters.remove((n, d))
                d.callback(None)
        return NOT_DONE_YET

    def arrived(self, n: int) -> Deferred[None]:
        from twisted.internet import reactor
        d: Deferred[None] = Deferred()
        d.addTimeout(5, reactor)
        self.waiters.append((n, d))
        if len(self.requests) >= n:
            self.waiters.remove((n, d))
            d.callback(None)
        return d


def answer(request: Any, value: Any) -> None:
    request.setHeader(b"content-type", b"application/json")
    request.write(json.dumps(value).encode())
    request.finish()


@pytest_twisted.ensureDeferred
async def test_calls_without_after_run_concurrently(gateway, upstreams):
    held = Held()
    users = await upstreams({"/users/7": held})
    orders = await upstreams({"/orders/7": held})
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["{users.url}"], timeout: 2s}}
      orders: {{targets: ["{orders.url}"], timeout: 2s}}
    routes:
      - prefix: /api/profile
        compose:
          path: /{{id}}
          calls:
            user: {{upstream: users, path: "/users/{{id}}", group: user}}
            orders: {{upstream: orders, path: "/orders/{{id}}", group: orders}}
    """)
    pending = ensureDeferred(get(gw.port, "/api/profile/7"))
    await held.arrived(2)                  # both are in flight before either answers
    answer(held.requests[1], [1, 2])
    answer(held.requests[0], {"name": "Ann"})
    resp = await pending
    assert resp.json() == {"user": {"name": "Ann"}, "orders": [1, 2]}


@pytest_twisted.ensureDeferred
async def test_a_failed_optional_call_gives_its_fallback_and_says_the_answer_is_partial(gateway, upstreams):
    users = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"})})
    orders = await upstreams({"/orders?customer=c-9": (500, b"text/html", b"<h1>oops</h1>")})
    gw = await gateway(profile_config(users, orders, orders_extra=", required: false, fallback: []"))
    resp = await get(gw.port, "/api/profile/7")
    assert resp.status == 200
    assert resp.json() == {"id": 7, "customer_id": "c-9", "orders": []}
    assert resp.header("x-gateway-completed") == "false"
    record = gw.log[-1]
    assert record["completed"] is False
    assert record["calls"][1]["status"] == 500 and record["calls"][1]["error"] == "answered 500"


@pytest_twisted.ensureDeferred
async def test_a_failed_optional_call_without_fallback_leaves_its_group_out(gateway, upstreams):
    users = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"})})
    orders = await upstreams({})
    gw = await gateway(profile_config(users, orders, orders_extra=", required: false"))
    resp = await get(gw.port, "/api/profile/7")
    assert resp.json() == {"id": 7, "customer_id": "c-9"}
    assert resp.header("x-gateway-completed") == "false"


async def failing_orders(gateway, upstreams, orders_answer: Any) -> Any:
    """A profile route whose required orders call gets `orders_answer`; returns the
    response, then checks the next good request is served."""
    users = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"}), "/users/8": js({"id": 8})})
    orders = await upstreams({"/orders?customer=c-9": orders_answer})
    gw = await gateway(profile_config(users, orders))
    resp = await get(gw.port, "/api/profile/7")
    after = await get(gw.port, "/api/users/8")
    assert after.status == 200 and after.json() == {"id": 8}
    return resp, gw


@pytest_twisted.ensureDeferred
async def test_a_failed_required_call_gives_502_in_the_envelope_and_nothing_of_the_upstream(gateway, upstreams):
    resp, gw = await failing_orders(gateway, upstreams, (500, b"text/html", b"<h1>stack trace here</h1>"))
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert b"stack trace" not in resp.body
    assert gw.log[0]["detail"] == "orders: answered 500"


@pytest_twisted.ensureDeferred
async def test_an_answer_that_is_not_json_fails_its_call(gateway, upstreams):
    resp, gw = await failing_orders(gateway, upstreams, (200, b"text/plain", b"[1, 2]"))
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert gw.log[0]["detail"] == "orders: answer is not application/json"


@pytest_twisted.ensureDeferred
async def test_invalid_json_fails_its_call(gateway, upstreams):
    resp, gw = await failing_orders(gateway, upstreams, (200, b"application/json", b'{"a": [1, 2'))
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert gw.log[0]["detail"].startswith("orders: invalid JSON")


@pytest_twisted.ensureDeferred
async def test_json_nested_ten_thousand_levels_fails_its_call_cleanly(gateway, upstreams):
    deep = b"[" * 10000 + b"]" * 10000
    resp, gw = await failing_orders(gateway, upstreams, (200, b"application/json", deep))
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert gw.log[0]["detail"] == "orders: JSON nested too deeply"


def streamed_50_mib(request: Any) -> Any:
    request.setHeader(b"content-type", b"application/json")
    request.write(b"[" + b"1," * (1 << 20))     # 2 MiB of 50, then nothing: the gateway must not wait
    return NOT_DONE_YET


def announced_50_mib(request: Any) -> Any:
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"content-length", b"%d" % (50 << 20))
    request.write(b"[1")                        # the head says it all: the call fails there
    return NOT_DONE_YET


@pytest.mark.parametrize("huge", [streamed_50_mib, announced_50_mib])
@pytest_twisted.ensureDeferred
async def test_a_50_mib_json_answer_fails_its_call_without_being_read(gateway, upstreams, huge):
    resp, gw = await failing_orders(gateway, upstreams, huge)
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert gw.log[0]["detail"] == "orders: answer larger than max_body_size"


@pytest_twisted.ensureDeferred
async def test_an_absent_field_of_an_earlier_answer_fails_the_call_that_needs_it(gateway, upstreams):
    users = await upstreams({"/users/8": js({"id": 8})})              # no customer_id
    orders = await upstreams({})
    gw = await gateway(profile_config(users, orders))
    resp = await get(gw.port, "/api/profile/8")
    assert_envelope(resp, 502, "BAD_GATEWAY")
    assert gw.log[0]["detail"] == "orders: no value for {user.customer_id}"
    assert orders.requests == []


def composed(up: Upstream, calls: dict[str, str], head: str = "", timeout: str = "2s") -> str:
    """One upstream `a`, and /api/c composing `calls` (name -> the call's flow mapping)."""
    lines = "".join(f"            {name}: {{upstream: a, {call}}}\n" for name, call in calls.items())
    return f"""
    upstreams:
      a: {{targets: ["{up.url}"], timeout: {timeout}}}
    routes:
      - prefix: /api/c
        compose:
          path: /{{id}}
          {head}
          calls:
""" + lines


def search_config(up: Upstream) -> str:
    # escaped_slashes: keep, so that a%2fb reaches the template as one value (routes refuse %2F
    # by default: tests/integration/test_routing_agreement.py).
    return composed(up, {"item": 'path: "/items/{id}", group: item',
                         "hits": 'path: "/search/{query.q}?near={id}", group: hits'}).replace(
        "      - prefix: /api/c\n", "      - prefix: /api/c\n        escaped_slashes: keep\n")


@pytest_twisted.ensureDeferred
async def test_template_values_are_single_encoded_segments(gateway, upstreams):
    seen: list[bytes] = []

    def record(request: Any) -> bytes:
        seen.append(request.uri)
        request.setHeader(b"content-type", b"application/json")
        return b"{}"

    up = await upstreams({})
    up.listening.factory.resource.answers = _Any(record)
    gw = await gateway(search_config(up))
    for target in ("/api/c/a%2fb?q=x%2F..%2F..%2Fadmin", "/api/c/7?q=a%0d%0aHost:%20evil",
                   "/api/c/7?q=x%3Fadmin%3D1"):
        seen.clear()
        resp = await get(gw.port, target)
        assert resp.status == 200, resp.body
        assert resp.header("x-gateway-completed") == "true"
        assert sorted(seen) == sorted({
            "/api/c/a%2fb?q=x%2F..%2F..%2Fadmin": [b"/items/a%2Fb", b"/search/x%2F..%2F..%2Fadmin?near=a%2Fb"],
            "/api/c/7?q=a%0d%0aHost:%20evil": [b"/items/7", b"/search/a%0D%0AHost%3A%20evil?near=7"],
            "/api/c/7?q=x%3Fadmin%3D1": [b"/items/7", b"/search/x%3Fadmin%3D1?near=7"],
        }[target])


class _Any(dict):
    """Answers for every path: one callable."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def get(self, key: Any, default: Any = None) -> Any:
        return self.fn


@pytest_twisted.ensureDeferred
async def test_a_dot_segment_or_absent_value_from_the_request_is_refused_400(gateway, upstreams):
    up = await upstreams({})
    gw = await gateway(search_config(up))
    for target in ("/api/c/7?q=..", "/api/c/7?q=%2e", "/api/c/7", "/api/c/7?q="):
        resp = await get(gw.port, target)
        assert_envelope(resp, 400, "BAD_REQUEST")
    assert up.requests == []
    resp = await get(gw.port, "/api/c/7/extra?q=x")
    assert_envelope(resp, 404, "NO_ROUTE")


@pytest_twisted.ensureDeferred
async def test_identity_values_and_forwarding_headers_go_on_every_call_each_a_child_span(gateway, upstreams, secret_file):
    up = await upstreams({"/users/7": js({"id": 7}), "/orders/7?by=alice&tier=pro": js([])})
    gw = await gateway(f"""
    auth:
      jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: "https://auth.test", audience: api}}
    upstreams:
      a: {{targets: ["{up.url}"], timeout: 2s}}
    routes:
      - prefix: /api/profile
        auth: required
        compose:
          path: /{{id}}
          calls:
            user: {{upstream: a, path: "/users/{{id}}"}}
            orders: {{upstream: a, path: "/orders/{{id}}?by={{user_id}}&tier={{user_tier}}", group: orders,
                     headers: {{X-Api-Version: "2"}}}}
    """)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = await get(gw.port, "/api/profile/7", f"Authorization: Bearer {mint_token()}\r\n"
                     f"X-Correlation-ID: abc-123\r\ntraceparent: {trace}\r\ntracestate: k=v\r\nX-User-Id: forged\r\n"
                     f"X-Internal-Note: not for calls\r\n")
    assert resp.status == 200, resp.body
    spans = set()
    for request in up.requests:
        h = request.requestHeaders
        assert h.getRawHeaders(b"x-user-id") == [b"alice"]
        assert h.getRawHeaders(b"x-user-role") == [b"admin"]
        assert h.getRawHeaders(b"x-correlation-id") == [b"abc-123"]
        assert h.getRawHeaders(b"x-forwarded-for") == [b"127.0.0.1"]
        assert h.getRawHeaders(b"authorization") is None
        assert h.getRawHeaders(b"tracestate") == [b"k=v"] and h.getRawHeaders(b"x-internal-note") is None
        (parent,) = h.getRawHeaders(b"traceparent")
        assert parent.split(b"-")[1] == b"0af7651916cd43dd8448eb211c80319c"
        spans.add(parent.split(b"-")[2])
    assert len(spans) == 2 and b"b7ad6b7169203331" not in spans
    assert [r.requestHeaders.getRawHeaders(b"x-api-version") for r in up.requests] == [None, [b"2"]]


@pytest_twisted.ensureDeferred
async def test_an_open_breaker_fails_a_required_call_with_503(gateway, upstreams, reactor):
    users = await upstreams({"/users/7": js({"id": 7, "customer_id": "c-9"})})
    orders = await upstreams({"/orders?customer=c-9": (503, b"text/plain", b"down")})
    gw = await gateway(profile_config(users, orders).replace(
        "orders: {targets", "orders: {circuit_breaker: {consecutive_failures: 1, open_for: 30s}, targets"))
    first = await get(gw.port, "/api/profile/7")
    assert_envelope(first, 502, "BAD_GATEWAY")
    second = await get(gw.port, "/api/profile/7")
    assert_envelope(second, 503, "UPSTREAM_UNAVAILABLE")
    assert len(orders.requests) == 1                       # the open breaker kept the call home
    assert gw.log[1]["calls"][1]["status"] == 503


@pytest_twisted.ensureDeferred
async def test_calls_timing_out_together_end_at_the_route_deadline_with_504(gateway, upstreams):
    from twisted.internet.task import Clock
    held = Held()
    up = await upstreams({"/a/1": held, "/b/1": held, "/c/1": held})
    clock = Clock()
    gw = await gateway(composed(up, {"a": 'path: "/a/{id}", group: a',
                                     "b": 'path: "/b/{id}", group: b, required: false',
                                     "c": 'path: "/c/{id}", group: c, required: false'},
                                head="deadline: 2s", timeout="30s"), clock=clock)
    pending = ensureDeferred(get(gw.port, "/api/c/1"))
    await held.arrived(3)
    clock.advance(1.0)
    assert not pending.called
    clock.advance(1.1)
    resp = await pending
    assert_envelope(resp, 504, "GATEWAY_TIMEOUT")
    assert [c["error"] for c in gw.log[0]["calls"]] == ["composition deadline"] * 3
    await held_closed(held, 3)


async def held_closed(held: Held, n: int) -> None:
    """Every held request's connection is closed by the gateway (calls cancelled)."""
    from twisted.internet import reactor
    d: Deferred[None] = Deferred()
    d.addTimeout(5, reactor)

    def check(_: Any = None) -> None:
        if len(held.lost) >= n and not d.called:
            d.callback(None)

    for request in held.requests:
        request.notifyFinish().addBoth(check)
    check()
    await d


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_mid_composition_cancels_every_call(gateway, upstreams, reactor):
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    held = Held()
    up = await upstreams({"/a/1": held, "/b/1": held})
    gw = await gateway(composed(up, {"a": 'path: "/a/{id}", group: a', "b": 'path: "/b/{id}", group: b'},
                                timeout="30s"))
    client = Protocol()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client)
    client.transport.write(b"GET /api/c/1 HTTP/1.1\r\nHost: a\r\n\r\n")
    await held.arrived(2)
    client.transport.loseConnection()
    await held_closed(held, 2)
    assert gw.log[0]["status"] == 499
    assert [c["error"] for c in gw.log[0]["calls"]] == ["cancelled", "cancelled"]


@pytest_twisted.ensureDeferred
async def test_a_failed_required_call_answers_at_once_and_cancels_the_others(gateway, upstreams):
    held = Held()
    up = await upstreams({"/slow/1": held, "/broken/1": (503, b"text/plain", b"down")})
    gw = await gateway(composed(up, {"slow": 'path: "/slow/{id}", group: slow',
                                     "broken": 'path: "/broken/{id}", group: broken'}, timeout="30s"))
    resp = await get(gw.port, "/api/c/1")                 # does not wait for the slow call
    assert_envelope(resp, 502, "BAD_GATEWAY")
    await held_closed(held, 1)
    calls = gw.log[0]["calls"]
    assert (calls[0]["error"], calls[1]["error"]) == ("cancelled: broken failed", "answered 503")
    assert gw.log[0]["detail"] == "broken: answered 503"


@pytest_twisted.ensureDeferred
async def test_optional_calls_late_at_the_deadline_leave_a_partial_answer(gateway, upstreams):
    from twisted.internet.task import Clock
    held = Held()
    up = await upstreams({"/a/1": js({"a": 1}), "/b/1": held})
    clock = Clock()
    gw = await gateway(composed(up, {"a": 'path: "/a/{id}"', "b": 'path: "/b/{id}", group: b, required: false, after: a'},
                                head="deadline: 1s", timeout="30s"), clock=clock)
    pending = ensureDeferred(get(gw.port, "/api/c/1"))
    await held.arrived(1)                                  # b starts once a has answered
    clock.advance(1.2)
    resp = await pending
    assert resp.status == 200 and resp.json() == {"a": 1}
    assert resp.header("x-gateway-completed") == "false"
    assert gw.log[0]["calls"][1]["error"] == "composition deadline"


@pytest_twisted.ensureDeferred
async def test_the_bench_config_answers_what_the_peer_harness_checks(gateway, upstreams):
    from pathlib import Path
    up = await upstreams({"/users/1": js({"ok": True}), "/orders/1": js({"orders": [{"id": 1, "total": 42}]}),
                          "/search/1": js({"hits": 3})})
    text = (Path(__file__).resolve().parents[2] / "bench" / "anchors-compose.yaml").read_text()
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("listen:", "  - endpoint:", "access_log:")))
    gw = await gateway(text.replace("http://127.0.0.1:9001", up.url))
    resp = await get(gw.port, "/api/composite/1")
    assert resp.status == 200
    assert b'"ok":true' in resp.body and b'"total":42' in resp.body and b'"hits":3' in resp.body


def answer_every_head(server: Any, data: bytes) -> None:
    """A raw upstream answering `{}` to each request head it has read whole."""
    while b"\r\n\r\n" in server.buffer:
        _, _, server.buffer = server.buffer.partition(b"\r\n\r\n")
        server.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")


@pytest_twisted.ensureDeferred
async def test_each_call_sends_one_exact_head_its_own_headers_replacing_forwarded_ones(gateway, raw_upstream):
    # The GET's head is made of blocks rendered once (composer._CallProxy); the POST's own
    # x-correlation-id replaces the forwarded one (the generic head): both must say the same.
    up = await raw_upstream(answer_every_head)
    gw = await gateway(f"""
    upstreams:
      a: {{targets: ["http://127.0.0.1:{up.port}"], timeout: 2s}}
    routes:
      - prefix: /api/profile
        compose:
          path: /{{id}}
          calls:
            plain: {{upstream: a, path: "/users/{{id}}?full=1", group: plain}}
            own: {{upstream: a, path: "/orders/{{id}}", method: POST, group: own, headers: {{X-Correlation-ID: mine}}}}
    """)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    resp = await get(gw.port, "/api/profile/7", f"X-Correlation-ID: abc-123\r\ntraceparent: {trace}\r\n"
                     f"tracestate: k=v\r\nX-Internal-Note: not for calls\r\n")
    assert resp.status == 200 and resp.json() == {"plain": {}, "own": {}}, resp.body
    heads = {head.split(b" ", 1)[0]: head.split(b"\r\n") for head in b"".join(up.requests).split(b"\r\n\r\n") if head}
    plain, own = heads[b"GET"], heads[b"POST"]
    assert plain[:2] == [b"GET /users/7?full=1 HTTP/1.1", b"host: 127.0.0.1:%d" % up.port]
    assert own[:2] == [b"POST /orders/7 HTTP/1.1", b"host: 127.0.0.1:%d" % up.port]
    assert plain[-1] == b"accept: application/json"
    assert own[-3:] == [b"x-correlation-id: mine", b"accept: application/json", b"content-length: 0"]
    assert b"x-correlation-id: abc-123" in plain and b"x-correlation-id: abc-123" not in own
    assert b"tracestate: k=v" in plain and not any(line.startswith(b"x-internal-note") for line in plain)
    spans = {line.split(b"-")[2] for line in plain + own if line.startswith(b"traceparent: 00-0af7651916cd43dd")}
    assert len(spans) == 2 and b"b7ad6b7169203331" not in spans
    forwarded = [line for line in plain[2:-1] if not line.startswith((b"traceparent", b"x-correlation-id"))]
    assert forwarded and forwarded == [line for line in own[2:-3] if not line.startswith(b"traceparent")]
