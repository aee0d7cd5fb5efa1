"""`transform:` through real sockets: JSON responses reshaped within a bound, request bodies edited."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.conftest import js, mint_token, parse_responses, raw

USER = {"id": 7, "name": "Ann", "password_hash": "x" * 40, "orders": [{"id": 1, "internal": 1}]}


def tagged(status: int, kind: bytes, body: bytes) -> Any:
    def render(request: Any) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", kind)
        request.setHeader(b"etag", b'"abc"')
        return body
    return render


def echo_body(request: Any) -> bytes:
    """Answers with the body and the framing it received."""
    request.setHeader(b"content-type", b"application/json")
    body = request.content.read()
    length, chunked = request.getHeader(b"content-length"), request.getHeader(b"transfer-encoding")
    return json.dumps({"body": json.loads(body), "length": length and length.decode(),
                       "chunked": chunked and chunked.decode()}).encode()


def config(up: Any, transform: str, auth: str = "", top: str = "") -> str:
    return f"""
    {top}
    upstreams:
      users: {{targets: ["{up.url}"], timeout: 2s}}
    routes:
      - prefix: /api/users
        upstream: users
        {auth}
        transform: {transform}
    """


async def send(port: int, *requests: bytes) -> list[Any]:
    return parse_responses(await raw(port, b"".join(requests)))


def get(path: str, close: bool = False) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode()


@pytest_twisted.ensureDeferred
async def test_a_json_response_is_reshaped_its_etag_dropped_and_the_next_request_served(gateway, upstreams):
    up = await upstreams({"/api/users/7": tagged(200, b"application/json", json.dumps(USER).encode()),
                          "/api/users/page": tagged(200, b"text/html", b"<p>hi</p>")})
    gw = await gateway(config(up, "{allow: [id, name, orders.*.id], rename: {name: full_name}}"))
    shaped, page = await send(gw.port, get("/api/users/7"), get("/api/users/page", close=True))
    (headed,) = await send(gw.port, b"HEAD /api/users/7 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert headed.status == 200 and headed.header("etag") == '"abc"'          # HEAD: nothing to reshape
    assert "transform" not in gw.log[2]
    assert shaped.status == 200 and shaped.json() == {"id": 7, "full_name": "Ann", "orders": [{"id": 1}]}
    assert shaped.header("etag") is None
    # Held whole, head included: it leaves with the new body's length, not chunked.
    assert shaped.header("content-length") == str(len(shaped.body)) and shaped.header("transfer-encoding") is None
    assert page.body == b"<p>hi</p>" and page.header("etag") == '"abc"'          # not JSON: untouched
    assert page.header("content-length") == "9"


@pytest_twisted.ensureDeferred
async def test_json_over_the_bound_or_invalid_passes_untouched(gateway, upstreams):
    big = json.dumps({"items": list(range(1000))}).encode()              # > 1KiB, announced
    def streamed(request: Any) -> Any:                                     # > 1KiB, chunked
        request.setHeader(b"content-type", b"application/json")
        for piece in (b'{"items": [', b"1," * 1000, b"1]}"):
            request.write(piece)
        request.finish()
        from twisted.web.server import NOT_DONE_YET
        return NOT_DONE_YET
    up = await upstreams({"/api/users/big": tagged(200, b"application/json", big), "/api/users/stream": streamed,
                          "/api/users/bad": tagged(200, b"application/json", b'{"id": 1,'),
                          "/api/users/err": js({"password_hash": "y"}, 500)})
    gw = await gateway(config(up, "{deny: [items, password_hash], max_body_size: 1KiB}"))
    announced, stream, bad, err = await send(gw.port, get("/api/users/big"), get("/api/users/stream"),
                                             get("/api/users/bad"), get("/api/users/err", close=True))
    assert announced.body == big and announced.header("content-length") == str(len(big))
    assert stream.body == b'{"items": [' + b"1," * 1000 + b"1]}"
    assert stream.header("transfer-encoding") == "chunked"           # released past the bound: streamed
    assert bad.body == b'{"id": 1,'
    assert err.status == 500 and err.json() == {"password_hash": "y"}       # only 2xx answers are reshaped
    assert gw.log[2]["transform"] == "response left as it was: not valid JSON"


@pytest_twisted.ensureDeferred
async def test_a_json_request_body_gets_set_and_remove_with_the_identity_and_a_new_length(gateway, upstreams,
                                                                                            secret_file):
    up = await upstreams({"/api/users/7": echo_body})
    gw = await gateway(config(
        up, "{request: {set: {requested_by: '{user_id}', meta.source: gateway}, remove: [is_admin]}}",
        auth="auth: required",
        top=f'auth: {{jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: "https://auth.test", '
            f'audience: api}}}}'))
    body = b'{"name": "Ann", "is_admin": true}'
    token = mint_token()
    request = (f"POST /api/users/7 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    chunked = (f"POST /api/users/7 HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {token}\r\n"
               f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               f"{len(body):x}\r\n").encode() + body + b"\r\n0\r\n\r\n"
    edited, streamed = await send(gw.port, request, chunked)
    got = edited.json()
    assert got["body"] == {"name": "Ann", "requested_by": "alice", "meta": {"source": "gateway"}}
    assert got["length"] == str(len(json.dumps(got["body"], separators=(",", ":"))))
    assert streamed.json()["body"] == json.loads(body) and streamed.json()["chunked"] == "chunked"


@pytest_twisted.ensureDeferred
async def test_compose_applies_each_calls_transform_and_the_routes_to_the_merged_answer(gateway, upstreams):
    up = await upstreams({"/users/7": js(USER), "/orders/7": js({"data": [{"id": 1, "sku": "a"}]})})
    gw = await gateway(f"""
    upstreams:
      a: {{targets: ["{up.url}"], timeout: 2s}}
    routes:
      - prefix: /api/profile
        transform: {{deny: [password_hash], add: {{version: 2}}}}
        compose:
          path: /{{id}}
          calls:
            user: {{upstream: a, path: "/users/{{id}}", transform: {{deny: [orders]}}}}
            orders: {{upstream: a, path: "/orders/{{id}}", group: orders, transform: {{target: data, pick: {{}}}}}}
    """)
    (resp,) = await send(gw.port, get("/api/profile/7", close=True))
    assert resp.json() == {"id": 7, "name": "Ann", "orders": [{"id": 1, "sku": "a"}], "version": 2}
    assert resp.header("content-length") == str(len(resp.body))


@pytest_twisted.ensureDeferred
async def test_a_request_body_that_stops_arriving_is_answered_408_at_the_idle_timeout(gateway, upstreams, reactor):
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
    from twisted.internet.protocol import Protocol
    from twisted.internet.task import Clock, deferLater

    class Client(Protocol):
        def __init__(self) -> None:
            self.data = b""
            self.closed: Deferred[None] = Deferred()
            self.closed.addTimeout(5, reactor)

        def dataReceived(self, data: bytes) -> None:
            self.data += data

        def connectionLost(self, reason: Any = None) -> None:
            self.closed.callback(None)

    up = await upstreams({"/api/users/7": echo_body})
    clock = Clock()
    gw = await gateway(config(up, "{request: {remove: [is_admin]}}", top="limits: {idle_timeout: 10s}"), clock=clock)
    client = Client()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", gw.port), client)
    client.transport.write(b"POST /api/users/7 HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 40\r\nConnection: close\r\n\r\n{\"is_admin\": ")
    for _ in range(250):                                  # the request reached the filter (bounded wait)
        if gw.gateway.stats.started:
            break
        await deferLater(reactor, 0.02, lambda: None)
    clock.advance(9)
    assert client.data == b""
    clock.advance(2)
    await client.closed
    (resp,) = parse_responses(client.data)
    assert resp.status == 408 and resp.json()["error"]["code"] == "REQUEST_TIMEOUT"
    assert up.requests == []


@pytest_twisted.ensureDeferred
async def test_allow_decodes_valid_bodies_and_leaves_bad_ones_as_they_came(gateway, upstreams):
    """allow's decoder (filters/allowdecode.py) and the general path it falls back to, through
    the filter: wrong shapes reshaped as allow says, deep nesting and bad UTF-8 untouched."""
    nested = b'{"id": 1, "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    bad_utf8 = b'{"id": 1, "x": "\xff"}'
    up = await upstreams({"/api/users/7": tagged(200, b"application/json", json.dumps(USER).encode()),
                          "/api/users/odd": tagged(200, b"application/json", b'{"id": 2, "orders": [{"id": 3}, 4]}'),
                          "/api/users/deep": tagged(200, b"application/json", nested),
                          "/api/users/utf8": tagged(200, b"application/json", bad_utf8)})
    gw = await gateway(config(up, "{allow: [orders.*.id, id], rename: {id: ident}}"))
    shaped, odd, deep, utf8 = await send(gw.port, get("/api/users/7"), get("/api/users/odd"),
                                         get("/api/users/deep"), get("/api/users/utf8", close=True))
    assert shaped.body == b'{"orders":[{"id":1}],"ident":7}'          # the body's order, then rename's move
    assert odd.body == b'{"orders":[{"id":3}],"ident":2}'            # a non-object element is dropped
    assert deep.status == 200 and deep.body == nested and deep.header("content-length") == str(len(nested))
    assert utf8.body == bad_utf8
    assert [line.get("transform") for line in gw.log[:4]] == [None, None, "response left as it was: not valid JSON",
                                                            "response left as it was: not valid JSON"]
