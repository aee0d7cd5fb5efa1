"""CORS through real sockets, and in a real browser: headless Chromium loads a page from one
origin that calls the gateway on another."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource

from tests.conftest import assert_envelope, listen, mint_token, parse_responses, quiet_site, raw

APP = "https://app.example.com"


def request(method: str, path: str, *headers: str, close: bool = False) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api", *headers] + (["Connection: close"] if close else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def config(echo_url: str, extra: str = "") -> str:
    return f"""
    upstreams:
      users: {{targets: ["{echo_url}"]}}
    routes:
      - prefix: /api/users
        upstream: users
        cors:
          origins: ["{APP}", "https://*.example.org"]
          methods: [GET, POST, DELETE]
          headers: [Authorization, Content-Type]
          expose_headers: [X-Correlation-ID]
          credentials: true
          max_age: 10m
      - {{prefix: /api/plain, upstream: users}}
    {extra}"""


@pytest_twisted.ensureDeferred
async def test_a_preflight_is_answered_by_the_gateway_and_never_reaches_the_upstream(gateway, echo):
    gw = await gateway(config(echo.url))
    ok, other = parse_responses(await raw(gw.port, request(
        "OPTIONS", "/api/users/1", f"Origin: {APP}", "Access-Control-Request-Method: DELETE",
        "Access-Control-Request-Headers: authorization, content-type") + request(
        "OPTIONS", "/api/users/1", "Origin: https://a.b.example.org", "Access-Control-Request-Method: GET",
        close=True)))
    assert ok.status == 204 and ok.body == b""
    assert ok.header("access-control-allow-origin") == APP
    assert ok.header("access-control-allow-methods") == "GET, POST, DELETE"
    assert ok.header("access-control-allow-headers") == "Authorization, Content-Type"
    assert ok.header("access-control-allow-credentials") == "true"
    assert ok.header("access-control-max-age") == "600"
    assert "Origin" in ok.header("vary")
    assert other.status == 204 and other.header("access-control-allow-origin") == "https://a.b.example.org"
    assert echo.requests == []
    assert [r.get("cors") for r in gw.log] == ["preflight", "preflight"]


@pytest_twisted.ensureDeferred
async def test_a_disallowed_origin_gets_a_403_preflight_and_no_cors_headers_on_answers(gateway, echo):
    gw = await gateway(config(echo.url))
    preflight, refused_method, refused_header, actual, good = parse_responses(await raw(gw.port, (
        request("OPTIONS", "/api/users/1", "Origin: https://evil.example.net", "Access-Control-Request-Method: GET")
        + request("OPTIONS", "/api/users/1", f"Origin: {APP}", "Access-Control-Request-Method: PATCH")
        + request("OPTIONS", "/api/users/1", f"Origin: {APP}", "Access-Control-Request-Method: GET",
                  "Access-Control-Request-Headers: x-secret")
        + request("GET", "/api/users/1", "Origin: https://example.org.evil.net")
        + request("GET", "/api/users/2", f"Origin: {APP}", close=True))))
    for refused in (preflight, refused_method, refused_header):
        assert_envelope(refused, 403, "FORBIDDEN")
    assert preflight.header("access-control-allow-origin") is None
    assert "PATCH" in refused_method.json()["error"]["message"]
    assert "x-secret" in refused_header.json()["error"]["message"]
    assert actual.status == 200 and actual.header("access-control-allow-origin") is None
    assert actual.header("vary") == "Origin"
    assert good.status == 200 and good.header("access-control-allow-origin") == APP
    assert [r.path for r in echo.requests] == [b"/api/users/1", b"/api/users/2"]


@pytest_twisted.ensureDeferred
async def test_actual_answers_name_the_origin_never_a_star_and_the_upstreams_own_cors_headers_go(gateway,
                                                                                                 raw_upstream):
    def script(server, data):
        if b"\r\n\r\n" in server.buffer:
            server.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nAccess-Control-Allow-Origin: *\r\n"
                                   b"Vary: Accept-Encoding\r\n\r\nok")
            server.buffer = b""
    upstream = await raw_upstream(script)
    gw = await gateway(config(upstream.url))
    allowed, plain = parse_responses(await raw(gw.port, request("GET", "/api/users/1", f"Origin: {APP}")
                                               + request("GET", "/api/plain/1", f"Origin: {APP}", close=True)))
    assert [v for k, v in allowed.headers if k.lower() == "access-control-allow-origin"] == [APP]
    assert allowed.header("access-control-allow-credentials") == "true"
    assert allowed.header("access-control-expose-headers") == "X-Correlation-ID"
    assert allowed.header("vary") == "Accept-Encoding, Origin"
    # A route without cors: passes the upstream's headers as they are.
    assert plain.header("access-control-allow-origin") == "*" and plain.header("vary") == "Accept-Encoding"


@pytest_twisted.ensureDeferred
async def test_the_preflight_of_a_protected_route_passes_before_auth_and_the_401_carries_cors(gateway, echo,
                                                                                               secret_file):
    gw = await gateway(config(echo.url).replace("upstream: users\n        cors:",
                                                "upstream: users\n        auth: required\n        cors:", 1)
                       .replace("upstreams:", f'auth: {{jwt: {{algorithms: [HS256], secret_file: "{secret_file}"}}}}\n'
                                              "    upstreams:", 1))
    preflight, denied, admitted = parse_responses(await raw(gw.port, (
        request("OPTIONS", "/api/users/1", f"Origin: {APP}", "Access-Control-Request-Method: GET",
                "Access-Control-Request-Headers: authorization")
        + request("GET", "/api/users/1", f"Origin: {APP}")
        + request("GET", "/api/users/1", f"Origin: {APP}", f"Authorization: Bearer {mint_token()}", close=True))))
    assert preflight.status == 204
    assert_envelope(denied, 401, "UNAUTHORIZED")
    assert denied.header("access-control-allow-origin") == APP       # the page can read why
    assert admitted.status == 200 and admitted.header("access-control-allow-origin") == APP


# --- in a real browser ----------------------------------------------------------------------

CHROMIUM_TIMEOUT = 60

PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const gateway = "http://127.0.0.1:%(port)d";
const calls = {
  open: [gateway + "/api/open/1", {}],
  private_with_credentials: [gateway + "/api/private/1",
                             {credentials: "include", headers: {"Authorization": "Bearer %(token)s"}}],
  open_with_credentials: [gateway + "/api/open/2", {credentials: "include"}],
  other_origin_only: [gateway + "/api/other/1", {}],
  other_preflighted: [gateway + "/api/other/2", {method: "DELETE"}],
};
(async () => {
  const out = {};
  for (const [name, [url, options]] of Object.entries(calls)) {
    try {
      const r = await fetch(url, options);
      out[name] = {status: r.status, body: await r.text()};
    } catch (e) {
      out[name] = {failed: e.name};
    }
  }
  document.getElementById("out").textContent = "RESULT" + JSON.stringify(out) + "END";
})();
</script></body></html>"""


class Page(Resource):
    isLeaf = True

    def __init__(self, html: str) -> None:
        super().__init__()
        self.html = html.encode()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return self.html


def chromium(url: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: `make system-deps` installs it (Debian package `chromium`)")
    return subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", "--dump-dom", url],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False)


@pytest_twisted.ensureDeferred
async def test_a_page_on_another_origin_reads_allowed_routes_and_is_refused_the_others(reactor, gateway, echo,
                                                                                      secret_file, tmp_path):
    site = quiet_site(Page(""))
    page_port = await listen(reactor, site)
    origin = f"http://127.0.0.1:{page_port.getHost().port}"
    try:
        gw = await gateway(f"""
        auth: {{jwt: {{algorithms: [HS256], secret_file: "{secret_file}"}}}}
        upstreams:
          users: {{targets: ["{echo.url}"]}}
        routes:
          - {{prefix: /api/open, upstream: users, cors: {{origins: ["{origin}"]}}}}
          - prefix: /api/private
            upstream: users
            auth: required
            cors: {{origins: ["{APP}", "{origin}"], headers: [Authorization], credentials: true}}
          - {{prefix: /api/other, upstream: users, cors: {{origins: ["{APP}"], methods: [GET, DELETE]}}}}
        """)
        site.resource = Page(PAGE % {"port": gw.port, "token": mint_token()})
        done = await deferToThread(chromium, origin + "/", tmp_path / "profile")
    finally:
        await page_port.stopListening()
    assert done.returncode == 0, done.stderr[-2000:]
    found = re.search(r"RESULT(.*?)END", done.stdout, re.S)
    assert found is not None, done.stdout[-3000:]
    out = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert out["open"]["status"] == 200 and json.loads(out["open"]["body"])["path"] == "/api/open/1"
    private = out["private_with_credentials"]
    assert private["status"] == 200, private
    assert json.loads(private["body"])["headers"]["X-User-Id"] == "alice"
    # No Access-Control-Allow-Credentials on that route: the browser hides the answer.
    assert out["open_with_credentials"] == {"failed": "TypeError"}
    # Another origin's route: neither a simple request nor a preflighted one gets through.
    assert out["other_origin_only"] == {"failed": "TypeError"}
    assert out["other_preflighted"] == {"failed": "TypeError"}
    assert b"DELETE" not in [r.method for r in echo.requests]
    assert {r.get("cors") for r in gw.log} >= {"preflight", "origin not allowed"}
