"""Request heads an upstream would read otherwise than the gateway (issue 18, items 8-9 and its
concerns): header names with `_`, chunked trailers, `Host`, two `Authorization` headers,
`CONNECT`. Real sockets; the echo upstream records what it received.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import ALICE_KEY, assert_envelope, parse_responses, raw, simple_config
from tests.integration.test_http2 import H2Client, H2Result, cert, listeners, port_of  # noqa: F401 (the cert fixture)

GOOD = b"GET /api/users/1 HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"


def get(*headers: bytes, host: bytes = b"gw.test", path: bytes = b"/api/users/1") -> bytes:
    return (b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
            + b"Connection: close\r\n\r\n")


async def still_serves(gw: Any, echo: Any) -> None:
    seen = len(echo.requests)
    (r,) = parse_responses(await raw(gw.port, GOOD))
    assert r.status == 200, r.body
    assert len(echo.requests) == seen + 1


def names(request: Any) -> set[str]:
    return {name.decode().lower() for name, _ in request.requestHeaders.getAllRawHeaders()}


FORGED = [b"X_User_Id: admin", b"X-User_Id: admin", b"X_USER_ROLE: admin", b"x_gateway_auth: yes",
          b"X_Forwarded_For: 10.0.0.1", b"Authorization_: x", b"My_Header: kept?"]


@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_dropped(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, get(*FORGED, b"X-Plain: yes")))
    assert r.status == 200, r.body
    seen = names(echo.requests[-1])
    assert not any("_" in name or name.startswith("x-user") for name in seen), seen
    assert "x-plain" in seen
    await still_serves(gw, echo)


@pytest_twisted.ensureDeferred
async def test_underscores_allowed_still_never_forward_identity_headers(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url, top="underscores_in_headers: true\n"))
    (r,) = parse_responses(await raw(gw.port, get(*FORGED)))
    assert r.status == 200, r.body
    assert {name for name in names(echo.requests[-1]) if "_" in name} == {"authorization_", "my_header"}
    assert echo.requests[-1].getHeader(b"x-forwarded-for") == b"127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_http2_header_names_with_underscores_are_dropped(reactor, echo, gateway, cert):  # noqa: F811
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + simple_config(echo.url))
    port = await port_of(gw, 1)

    def run() -> Any:
        with H2Client(port, cert.cert) as client:
            return client.get("/api/users/1", [("x_user_id", "admin"), ("x-user_role", "admin"), ("x-ok", "1")])
    result = await deferToThread(run)
    assert result.status == 200
    seen = names(echo.requests[-1])
    assert "x-ok" in seen and not any("_" in name or name.startswith("x-user") for name in seen), seen


def keys_config(echo_url: str, keys_file: str) -> str:
    return simple_config(echo_url, top=f"auth: {{api_keys: {{header: X-API-Key, file: {keys_file}}}}}\n",
                         extra_route="  - {prefix: /api/private, upstream: users, auth: required}\n")


@pytest_twisted.ensureDeferred
async def test_chunked_trailers_never_become_headers(reactor, echo, gateway, keys_file):
    gw = await gateway(keys_config(echo.url, keys_file))
    trailer = (b"POST /api/users/1 HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3\r\nabc\r\n0\r\nX-API-Key: " + ALICE_KEY.encode() + b"\r\nX-Promoted: 1\r\n\r\n")
    # Pipelined: the second request waits while its trailer arrives; its trailer must not
    # authenticate it nor reach the upstream as a header.
    second = trailer.replace(b"/api/users/1", b"/api/private/x")
    first, refused = parse_responses(await raw(gw.port, [trailer + second]))
    assert first.status == 200 and first.json()["body_bytes"] == 3
    assert_envelope(refused, 401, "UNAUTHORIZED")
    assert len(echo.requests) == 1
    assert not names(echo.requests[0]) & {"x-api-key", "x-promoted"}
    await still_serves(gw, echo)


@pytest_twisted.ensureDeferred
async def test_oversized_trailers_get_431(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url, top="limits: {max_header_bytes: 1KiB}\n"))
    body = (b"POST /api/users/1 HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"
            + b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 100) for i in range(20)) + b"\r\n")
    responses = parse_responses(await raw(gw.port, body))
    assert_envelope(responses[-1], 431, "HEADERS_TOO_LARGE")
    await still_serves(gw, echo)


@pytest.mark.parametrize("host", [b"gw.test evil", b"a@evil.test", b"gw.test/../x", b"gw.test:80:80", b"gw.test:x",
                                  b"[::1", b"gw.test\\x", b"gw.test?x"])
@pytest_twisted.ensureDeferred
async def test_a_host_that_is_not_an_authority_gets_400(reactor, echo, gateway, host):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, get(host=host)))
    assert_envelope(r, 400, "BAD_REQUEST")
    assert echo.requests == []
    await still_serves(gw, echo)


@pytest_twisted.ensureDeferred
async def test_valid_hosts_are_forwarded_as_x_forwarded_host(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    for host in (b"gw.test", b"GW.Test:8080", b"10.0.0.1:443", b"[::1]:8443", b"svc_1.internal"):
        (r,) = parse_responses(await raw(gw.port, get(host=host)))
        assert r.status == 200, (host, r.body)
        assert echo.requests[-1].getHeader(b"x-forwarded-host") == host
    # absolute-form: the authority of the target is the host, and is checked the same way
    (r,) = parse_responses(await raw(gw.port, b"GET http://a@evil.test/api/users/1 HTTP/1.1\r\nHost: gw.test\r\n\r\n"))
    assert_envelope(r, 400, "BAD_REQUEST")


@pytest_twisted.ensureDeferred
async def test_two_authorization_headers_get_400(reactor, echo, gateway):
    gw = await gateway(simple_config(echo.url))
    (r,) = parse_responses(await raw(gw.port, get(b"Authorization: Bearer a", b"authorization: Bearer b")))
    assert_envelope(r, 400, "BAD_REQUEST")
    assert echo.requests == []
    (r,) = parse_responses(await raw(gw.port, get(b"Authorization: Bearer a")))
    assert r.status == 200 and echo.requests[-1].getHeader(b"authorization") == b"Bearer a"


@pytest.mark.parametrize("target", [b"/api/users/1", b"gw.test:443"])
@pytest_twisted.ensureDeferred
async def test_connect_gets_405_and_the_tunnel_bytes_are_not_a_request(reactor, echo, gateway, target):
    gw = await gateway(simple_config(echo.url))
    connect = b"CONNECT " + target + b" HTTP/1.1\r\nHost: gw.test\r\n\r\n" + GOOD
    responses = parse_responses(await raw(gw.port, connect))
    assert len(responses) == 1
    assert_envelope(responses[0], 405, "METHOD_NOT_ALLOWED")
    assert responses[0].header("connection") == "close"
    assert echo.requests == []
    await still_serves(gw, echo)


@pytest_twisted.ensureDeferred
async def test_the_https_redirect_goes_only_to_a_validated_host(reactor, echo, gateway, cert):  # noqa: F811
    gw = await gateway(listeners(cert, None) + simple_config(echo.url, top="redirect_to_https: true\n"))
    tls_port = await port_of(gw, 1)
    # Not an authority, or a name no certificate of the https listener is for (an open redirect).
    for host in (b"evil.example/x?", b"a@evil.example", b"gw.test evil.example", b"evil.example", b"evil.example:80",
                 b"10.0.0.1", b"[::1]:80"):
        (r,) = parse_responses(await raw(gw.port, get(host=host)))
        assert_envelope(r, 400, "BAD_REQUEST")
        assert r.header("location") is None
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users/1 HTTP/1.0\r\n\r\n"))
    assert_envelope(r, 400, "BAD_REQUEST")
    (r,) = parse_responses(await raw(gw.port, get(host=b"localhost:80")))       # the certificate's name
    assert (r.status, r.header("location")) == (308, f"https://localhost:{tls_port}/api/users/1")
    assert echo.requests == []


@pytest_twisted.ensureDeferred
async def test_http2_connect_gets_405_and_the_connection_serves_on(reactor, echo, gateway, cert):  # noqa: F811
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + simple_config(echo.url))
    port = await port_of(gw, 1)

    def run() -> Any:
        with H2Client(port, cert.cert) as client:
            connect = client.conn.get_next_available_stream_id()   # CONNECT has no :path nor :scheme
            client.results[connect] = H2Result()
            client.conn.send_headers(connect, [(":method", "CONNECT"), (":authority", "gw.test:443")], end_stream=True)
            client._send()
            return client.wait(connect)[0], client.get("/api/users/1")
    refused, after = await deferToThread(run)
    assert_envelope(refused.as_response(), 405, "METHOD_NOT_ALLOWED")
    assert after.status == 200
    assert [r.uri for r in echo.requests] == [b"/users/1"]


@pytest_twisted.ensureDeferred
async def test_http2_trailers_never_become_headers(reactor, echo, gateway, cert, keys_file):  # noqa: F811
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + keys_config(echo.url, keys_file))
    port = await port_of(gw, 1)

    def run() -> Any:
        with H2Client(port, cert.cert) as client:
            stream = client.request("/api/private/x", method="POST", end=False)
            client.conn.send_data(stream, b"abc")
            client.conn.send_headers(stream, [("x-api-key", ALICE_KEY), ("x-promoted", "1")], end_stream=True)
            client._send()
            return client.wait(stream)[0], client.get("/api/users/1", [("x-api-key", ALICE_KEY)])
    refused, after = await deferToThread(run)
    assert_envelope(refused.as_response(), 401, "UNAUTHORIZED")
    assert after.status == 200
    assert len(echo.requests) == 1 and "x-promoted" not in names(echo.requests[0])
