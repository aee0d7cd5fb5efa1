"""Forward auth through real sockets: a real auth service (an upstream of the config) decides,
the gateway admits, refuses or answers 503, and keeps decisions per credential."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from tests.conftest import assert_envelope, free_port, listen, parse_responses, quiet_site, raw, raw_request

# Authorization value -> (status, response headers) of the auth service.
ANSWERS: dict[str, tuple[int, dict[str, str]]] = {
    "Bearer alice": (200, {"X-User-Id": "alice", "X-User-Role": "admin", "X-User-Tier": "pro",
                           "X-Scopes": "read write", "X-Not-Copied": "1"}),
    "Bearer bob": (200, {"X-User-Id": "bob", "X-User-Role": "user", "X-User-Tier": "free"}),
    "Bearer banned": (403, {}),
    "Bearer broken": (500, {}),
    "Bearer teapot": (418, {}),
    "Bearer bad-id": (200, {"X-User-Id": "x" * 300}),
}


class AuthService(Resource):
    """Decides by the Authorization header; records what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        headers = {k.decode().lower(): b", ".join(v).decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.asked.append({"method": request.method.decode(), "uri": request.uri.decode(), "headers": headers,
                           "body": request.content.read()})
        status, out = ANSWERS.get(headers.get("authorization", ""), (401, {}))
        request.setResponseCode(status)
        for name, value in out.items():
            request.setHeader(name, value)
        if status == 401:
            request.setHeader("WWW-Authenticate", 'Bearer realm="example", error="invalid_token"')
        return b'{"decided": true}'


@pytest_twisted.async_yield_fixture()
async def auth_service(reactor: Any) -> Any:
    service = AuthService()
    site = quiet_site(service)
    port = await listen(reactor, site)
    service.url = f"http://127.0.0.1:{port.getHost().port}"
    yield service
    await port.stopListening()


def config(echo_url: str, auth_url: str, forward_extra: str = "", top: str = "", route_extra: str = "",
           auth_upstream_extra: str = "") -> str:
    return f"""
    {top}
    upstreams:
      users: {{targets: ["{echo_url}"]}}
      authsvc: {{targets: ["{auth_url}"], timeout: 2s{auth_upstream_extra}}}
    routes:
      - prefix: /api/users
        upstream: users
        auth:
          forward:
            upstream: authsvc
            path: /auth/verify
            headers_to_send: [Authorization]
            headers_from_response: [X-User-Id, X-User-Role, X-User-Tier, X-Scopes]
            {forward_extra}
        {route_extra}
    """


def request(method: str, path: str, *headers: str, body: bytes = b"", close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def seen(response: Any) -> dict[str, str]:
    """The headers the echo upstream received, lower-cased."""
    return {k.lower(): v for k, v in response.json()["headers"].items()}


@pytest_twisted.ensureDeferred
async def test_an_admit_copies_the_named_headers_and_the_auth_service_sees_method_uri_and_credentials_only(
        gateway, echo, auth_service):
    gw = await gateway(config(echo.url, auth_service.url))
    ok, = parse_responses(await raw(gw.port, request(
        "POST", "/api/users/7?x=1", "Authorization: Bearer alice", "Cookie: session=secret",
        "X-Scopes: forged", "X-User-Id: mallory", body=b"payload", close=True)))
    assert ok.status == 200
    asked, = auth_service.asked
    assert asked["method"] == "POST" and asked["uri"] == "/auth/verify" and asked["body"] == b""
    assert asked["headers"]["x-forwarded-method"] == "POST"
    assert asked["headers"]["x-forwarded-uri"] == "/api/users/7?x=1"
    assert asked["headers"]["authorization"] == "Bearer alice"
    assert "cookie" not in asked["headers"] and "x-scopes" not in asked["headers"]
    upstream = seen(ok)
    assert (upstream["x-user-id"], upstream["x-user-role"], upstream["x-user-tier"]) == ("alice", "admin", "pro")
    assert upstream["x-scopes"] == "read write"                # the auth service's, not the client's
    assert "x-not-copied" not in upstream
    assert upstream["cookie"] == "session=secret" and ok.json()["body_bytes"] == 7


@pytest_twisted.ensureDeferred
async def test_refusals_come_back_in_the_envelope_and_other_answers_are_503_never_an_admit(
        gateway, echo, auth_service):
    gw = await gateway(config(echo.url, auth_service.url))
    missing, banned, broken, teapot, bad_id, ok = parse_responses(await raw(gw.port, (
        request("GET", "/api/users/1")
        + request("GET", "/api/users/2", "Authorization: Bearer banned")
        + request("GET", "/api/users/3", "Authorization: Bearer broken")
        + request("GET", "/api/users/4", "Authorization: Bearer teapot")
        + request("GET", "/api/users/5", "Authorization: Bearer bad-id")
        + request("GET", "/api/users/6", "Authorization: Bearer bob", close=True))))
    assert_envelope(missing, 401, "UNAUTHORIZED")
    assert missing.header("www-authenticate") == 'Bearer realm="example", error="invalid_token"'
    assert_envelope(banned, 403, "FORBIDDEN")
    for unavailable in (broken, teapot, bad_id):
        assert_envelope(unavailable, 503, "UPSTREAM_UNAVAILABLE")
    assert ok.status == 200 and seen(ok)["x-user-id"] == "bob"
    assert [r.path for r in echo.requests] == [b"/api/users/6"]


@pytest_twisted.ensureDeferred
async def test_the_identity_feeds_roles_and_rate_limits_like_a_jwt_identity(gateway, echo, auth_service):
    gw = await gateway(config(echo.url, auth_service.url, route_extra="roles: [admin, user]\n"
                              "        rate_limit: {key: user}", top="""
    rate_limits:
      tiers:
        free: {rate: 2/minute}
        pro: {rate: 5/minute}
      default_tier: free
    """))
    alice = [request("GET", "/api/users/a", "Authorization: Bearer alice")] * 3
    bob = [request("GET", "/api/users/b", "Authorization: Bearer bob")] * 3
    replies = parse_responses(await raw(gw.port, b"".join(alice + bob) + request("GET", "/x", close=True)))
    assert [r.status for r in replies[:6]] == [200, 200, 200, 200, 200, 429]    # pro: burst 5, free: 2
    assert replies[0].header("x-ratelimit-limit") != replies[3].header("x-ratelimit-limit")


@pytest_twisted.ensureDeferred
async def test_roles_refuse_an_identity_without_the_role(gateway, echo, auth_service):
    gw = await gateway(config(echo.url, auth_service.url, route_extra="roles: [admin]"))
    bob, alice = parse_responses(await raw(gw.port, request("GET", "/api/users/1", "Authorization: Bearer bob")
                                           + request("GET", "/api/users/1", "Authorization: Bearer alice",
                                                     close=True)))
    assert_envelope(bob, 403, "FORBIDDEN")
    assert alice.status == 200


@pytest_twisted.ensureDeferred
async def test_decisions_are_kept_per_credential_for_cache_ttl(reactor, gateway, echo, auth_service):
    clock = Clock()
    clock.advance(1000)
    gw = await gateway(config(echo.url, auth_service.url, forward_extra="cache_ttl: 30s"), clock=clock)
    twice = (request("GET", "/api/users/1", "Authorization: Bearer alice")
             + request("GET", "/api/users/2", "Authorization: Bearer nobody")
             + request("GET", "/api/users/3", "Authorization: Bearer alice")
             + request("GET", "/api/users/4", "Authorization: Bearer nobody", close=True))
    replies = parse_responses(await raw(gw.port, twice))
    assert [r.status for r in replies] == [200, 401, 200, 401]
    assert replies[3].header("www-authenticate") == 'Bearer realm="example", error="invalid_token"'
    assert seen(replies[2])["x-user-id"] == "alice"
    assert len(auth_service.asked) == 2
    assert [r.get("auth_service") for r in gw.log] == [None, None, "cached", "cached"]
    clock.advance(29)
    assert [r.status for r in parse_responses(await raw(gw.port, twice))] == [200, 401, 200, 401]
    assert len(auth_service.asked) == 2
    clock.advance(2)                                        # past cache_ttl: asked again
    assert [r.status for r in parse_responses(await raw(gw.port, twice))] == [200, 401, 200, 401]
    assert len(auth_service.asked) == 4


@pytest_twisted.ensureDeferred
async def test_an_auth_service_that_does_not_answer_in_time_is_a_503(reactor, gateway, echo, raw_upstream):
    arrived: Deferred[None] = Deferred().addTimeout(10, reactor)

    def silent(server: Any, data: bytes) -> None:
        if not arrived.called:
            arrived.callback(None)
    auth = await raw_upstream(silent)
    clock = Clock()
    gw = await gateway(config(echo.url, auth.url), clock=clock)
    answer = deferToThread(raw_request, gw.port, request("GET", "/api/users/1", "Authorization: Bearer alice",
                                                         close=True), read_timeout=5.0)
    await arrived
    clock.advance(1.9)
    assert gw.log == []                                     # the upstream's timeout is 2s: not yet
    clock.advance(0.2)
    timed_out, = parse_responses(await answer)
    assert_envelope(timed_out, 503, "UPSTREAM_UNAVAILABLE")
    assert gw.log[0]["auth_service_error"] == "timeout"
    assert echo.requests == []


@pytest_twisted.ensureDeferred
async def test_a_refused_connection_and_an_open_breaker_are_503_without_asking(gateway, echo, auth_service):
    down = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(config(echo.url, down, auth_upstream_extra=", circuit_breaker: {consecutive_failures: 1, "
                                                                  "open_for: 30s}"))
    refused, = parse_responses(await raw(gw.port, request("GET", "/api/users/1", "Authorization: Bearer a",
                                                          close=True)))
    assert_envelope(refused, 503, "UPSTREAM_UNAVAILABLE")
    tripped, = parse_responses(await raw(gw.port, request("GET", "/api/users/1", "Authorization: Bearer a",
                                                          close=True)))
    assert_envelope(tripped, 503, "UPSTREAM_UNAVAILABLE")
    assert tripped.header("retry-after") is not None
    assert [r.get("auth_service_error") for r in gw.log][1] == "breaker open"
    assert json.loads(refused.body)["error"]["message"] == "the auth service could not decide"
    assert echo.requests == []


@pytest_twisted.ensureDeferred
async def test_a_pooled_connection_the_auth_service_closed_is_retried_once_on_a_fresh_one(gateway, echo,
                                                                                         raw_upstream):
    def one_answer_per_connection(server: Any, data: bytes) -> None:
        if b"\r\n\r\n" not in server.buffer:
            return
        server.buffer = b""
        if getattr(server, "answered", False):
            server.transport.loseConnection()           # closed as the gateway reuses it
            return
        server.answered = True
        server.transport.write(b"HTTP/1.1 200 OK\r\nX-User-Id: alice\r\nContent-Length: 0\r\n\r\n")
    auth = await raw_upstream(one_answer_per_connection)
    gw = await gateway(config(echo.url, auth.url))
    replies = parse_responses(await raw(gw.port, request("GET", "/api/users/1", "Authorization: Bearer a")
                                        + request("GET", "/api/users/2", "Authorization: Bearer a", close=True)))
    assert [r.status for r in replies] == [200, 200]
    assert [seen(r)["x-user-id"] for r in replies] == ["alice", "alice"]
    assert sum(chunk.count(b"GET /auth/verify") for chunk in auth.requests) == 3


class Silent(Protocol):
    """An auth service that reads and never answers; says when its connection is gone."""

    def __init__(self, arrived: Deferred[None], gone: Deferred[None]) -> None:
        self.arrived, self.gone = arrived, gone

    def dataReceived(self, data: bytes) -> None:
        if not self.arrived.called:
            self.arrived.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.gone.called:
            self.gone.callback(None)


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_while_the_auth_service_thinks_costs_it_no_verdict(reactor, gateway, echo):
    arrived: Deferred[None] = Deferred().addTimeout(10, reactor)
    gone: Deferred[None] = Deferred().addTimeout(10, reactor)
    port = await listen(reactor, Factory.forProtocol(lambda: Silent(arrived, gone)))
    try:
        gw = await gateway(config(echo.url, f"http://127.0.0.1:{port.getHost().port}",
                                  auth_upstream_extra=", circuit_breaker: {consecutive_failures: 1, open_for: 30s}"))
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), Protocol())
        client.transport.write(request("GET", "/api/users/1", "Authorization: Bearer alice"))
        await arrived
        client.transport.loseConnection()
        await gone                                        # the gateway dropped its question
    finally:
        await port.stopListening()
    group = gw.gateway.proxy.groups["authsvc"]
    assert [m.in_flight for m in group.balancer.members] == [0]
    assert group.breaker.state == "closed" and group.breaker.snapshot()["consecutive_failures"] == 0
    assert echo.requests == []
