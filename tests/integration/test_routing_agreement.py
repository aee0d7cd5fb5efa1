"""The route the gateway picks is the route the forwarded path names (issue 18, items 1-2).

For a corpus of path forms (escapes, fragments, case, `;params`, `//`, backslashes,
dot-segments) sent over real sockets, every request the upstream receives carries, in
`X-Route`, the route the gateway chose; that route must be the one whose prefix the received
path has, read literally, percent-decoded (as Flask and Starlette read it) and without its
`;params` (as Servlet containers read it). What cannot be routed so is a 400 that never
reaches the upstream, and the next request is served.
"""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import unquote

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import assert_envelope, mint_token, parse_responses, raw
from tests.integration.test_http2 import H2Client, cert, listeners, port_of  # noqa: F401 (the cert fixture)

ROUTES = {"/": "root", "/api": "public", "/api/private": "private", "/api/admin": "admin", "/files": "files"}
CASELESS = {"/api/admin"}


def config(echo_url: str, top: str = "", private: str = "") -> str:
    def route(prefix: str, extra: str = "") -> str:
        return (f"  - {{prefix: {prefix}, upstream: app, request_headers: {{set: {{X-Route: {ROUTES[prefix]}}}}}"
                f"{extra}}}\n")
    return (top + f'upstreams:\n  app: {{targets: ["{echo_url}"], timeout: 2s}}\nroutes:\n' + route("/") + route("/api")
            + route("/api/private", private) + route("/api/admin", ", case_insensitive: true")
            + route("/files", ", escaped_slashes: keep"))


def route_named_by(path: str) -> str:
    """The route whose prefix `path` has on a segment boundary (case-folded where configured)."""
    best = "/"
    for prefix in ROUTES:
        seen = path.lower() if prefix in CASELESS else path
        if prefix != "/" and (seen == prefix or seen.startswith(prefix + "/")) and len(prefix) > len(best):
            best = prefix
    return ROUTES[best]


def readings(path: str) -> list[str]:
    """The ways upstreams read a path: as is, decoded and normalised, without `;params`."""
    decoded = posixpath.normpath(unquote(path).replace("//", "/"))
    return [path, decoded, "/".join(segment.partition(";")[0] for segment in path.split("/"))]


def get(path: bytes, extra: bytes = b"") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: gw.test\r\n" + extra + b"Connection: close\r\n\r\n"


SERVED = [
    (b"/api/private/x", "/api/private/x"),
    (b"/api/%70rivate/x", "/api/private/x"),                         # unreserved escapes decoded
    (b"/api/%70%72%69%76%61%74%65/x", "/api/private/x"),
    (b"/%61pi/private/x", "/api/private/x"),
    (b"/api//private//x", "/api/private/x"),                         # slashes merged
    (b"/api/./private/x/.", "/api/private/x/"),
    (b"/api/%7Euser/%e2%82%ac", "/api/~user/%E2%82%AC"),             # other escapes in upper case
    (b"/api/PRIVATE/x", "/api/PRIVATE/x"),                           # case-sensitive route: not private
    (b"/api/ADMIN/x", "/api/admin/x"),                               # case-insensitive route
    (b"/Api/Admin", "/api/admin"),
    (b"/api/private.x", "/api/private.x"),
    (b"/api/private%2ex", "/api/private.x"),
    (b"/api/public;v=1/x", "/api/public;v=1/x"),                     # same route with or without params
    (b"/api/private/x;v=1", "/api/private/x;v=1"),
    (b"/files/a%2fb%5Cc", "/files/a%2Fb%5Cc"),                       # kept opaque where the route says so
    (b"/files/a\\b", "/files/a%5Cb"),
    (b"/other/%2e/x?q=%2F", "/other/x"),                             # the query is not the path (kept)
]

REFUSED = [
    b"/api/private#x", b"/api#/private", b"/api/x?y#z",              # fragments
    b"/api/private%2fx", b"/api/private%2Fx", b"/api/private%5cx", b"/api\\private", b"/%2Fapi/private",
    b"/api/private;x/y", b"/api;x/private",                          # params that would change the route
    b"/api/x/../private/y", b"/api/private/%2e%2e/%2E%2E/files/x",   # dot-segments leaving a route
    b"/api/%zz", b"/api/%7",                                         # malformed escapes
]


@pytest_twisted.ensureDeferred
async def test_the_route_picked_is_the_route_the_forwarded_path_names(reactor, echo, gateway):
    gw = await gateway(config(echo.url))
    for sent, forwarded in SERVED:
        (r,) = parse_responses(await raw(gw.port, get(sent)))
        assert r.status == 200, (sent, r.body)
        received = echo.requests[-1]
        path = received.path.decode("latin-1")
        chosen = received.getHeader(b"x-route").decode()
        assert path == forwarded, sent
        for reading in readings(path):
            assert route_named_by(reading) == chosen, (sent, path, reading, chosen)
    assert len(echo.requests) == len(SERVED) and echo.requests[-1].uri == b"/other/x?q=%2F"
    for sent in REFUSED:
        (r,) = parse_responses(await raw(gw.port, get(sent)))
        assert_envelope(r, 400, "BAD_REQUEST")
    assert len(echo.requests) == len(SERVED), "a refused path reached the upstream"
    (r,) = parse_responses(await raw(gw.port, get(b"/api/private/after")))
    assert r.status == 200 and echo.requests[-1].uri == b"/api/private/after"


@pytest.mark.parametrize("path", [
    b"/api/private#x", b"/api/%70rivate/x", b"/api/%70%72%69%76%61%74%65/x", b"/api/private%2fx",
    b"/api/private%2Fx", b"/api//private/x", b"/api/./private/x", b"/api/PRIVATE/x", b"/api/private;a=b/x",
])
@pytest_twisted.ensureDeferred
async def test_no_path_form_reaches_the_protected_route_without_credentials(reactor, echo, gateway, secret_file, path):
    top = (f"auth: {{jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: https://auth.test, "
           f"audience: api}}}}\n")
    gw = await gateway(config(echo.url, top=top, private=", auth: required, case_insensitive: true"))
    (r,) = parse_responses(await raw(gw.port, get(path)))
    assert r.status in (400, 401), (path, r.status, r.body)
    assert echo.requests == []
    token = b"Authorization: Bearer " + mint_token().encode() + b"\r\n"
    (r,) = parse_responses(await raw(gw.port, get(b"/api/private/x", token)))
    assert r.status == 200 and echo.requests[-1].getHeader(b"x-route") == b"private"


@pytest_twisted.ensureDeferred
async def test_http2_paths_are_routed_by_the_same_canonical_form(reactor, echo, gateway, cert):  # noqa: F811
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + config(echo.url))
    port = await port_of(gw, 1)

    def run() -> list[Any]:
        with H2Client(port, cert.cert) as client:
            return [client.get(path) for path in ("/api/private#x", "/api/%70rivate/x", "/api/private%2Fx",
                                                  "/api/ADMIN/x", "/api/private/ok")]
    fragment, encoded, slash, caseless, after = await deferToThread(run)
    assert_envelope(fragment.as_response(), 400, "BAD_REQUEST")
    assert_envelope(slash.as_response(), 400, "BAD_REQUEST")
    assert (encoded.status, caseless.status, after.status) == (200, 200, 200)
    assert [(r.uri, r.getHeader(b"x-route")) for r in echo.requests] == [
        (b"/api/private/x", b"private"), (b"/api/admin/x", b"admin"), (b"/api/private/ok", b"private")]
