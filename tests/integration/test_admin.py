"""The admin listener over real sockets (issue 7): /healthz, /readyz (also while draining),
/metrics parsed with prometheus_client's own parser after real traffic, /status after a
breaker trip, the bearer token, and the status page rendered by headless Chromium.

Gateways here run on the real reactor clock: the drain loop and the status page need real
time. Rate limits are per hour and breakers open for minutes, so nothing refills or closes
while a test runs and every count below is exact.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.conftest import Response, parse_responses, raw

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
TOKEN = "admin-token-for-tests-0123456789"       # tests only, never a real secret
TOKEN_ENV = "TXGATEWAY_TEST_ADMIN_TOKEN"
ADMIN = 'admin: {endpoint: "tcp:0:interface=127.0.0.1"}'
ADMIN_WITH_TOKEN = f'admin: {{endpoint: "tcp:0:interface=127.0.0.1", token_env: {TOKEN_ENV}}}'
CHROMIUM_TIMEOUT = 60.0


def config(upstream_url: str, admin: str = ADMIN, drain_timeout: str = "10s") -> str:
    return f"""
drain_timeout: {drain_timeout}
{admin}
rate_limits: {{backend: local, tiers: {{free: {{rate: 100/hour}}}}, default_tier: free}}
upstreams:
  users: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 10s,
           circuit_breaker: {{consecutive_failures: 5, open_for: 5m}}}}
routes:
  - {{prefix: /api/users, upstream: users}}
  - {{prefix: /api/limited, upstream: users, rate_limit: {{key: ip, rate: 2/hour}}}}
"""


def admin_port(gw: Any) -> int:
    waiting = gw.gateway.admin._waitingForPort
    assert waiting is not None and waiting.called, "the admin listener is not bound"
    return waiting.result.getHost().port


def http_request(path: str, method: str = "GET", headers: list[tuple[str, str]] | None = None,
                 body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def call(port: int, path: str, method: str = "GET", token: str | None = None,
               headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> Response:
    all_headers = list(headers or [])
    if token is not None:
        all_headers.append(("Authorization", f"Bearer {token}"))
    responses = parse_responses(await raw(port, http_request(path, method, all_headers, body)))
    assert len(responses) == 1, responses
    return responses[0]


async def poll(reactor: Any, check: Any, what: str, timeout: float = 5.0) -> None:
    """Bounded polling: `check()` (sync) until true, else fail naming `what`."""
    for _ in range(int(timeout / 0.01)):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by (sample name, labels)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in out, f"duplicate sample {key}"
            out[key] = sample.value
    return out


def named(all_samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
          name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (sample, labels), value in all_samples.items() if sample == name}


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


async def scrape(port: int, token: str | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await call(port, "/metrics", token=token)
    assert r.status == 200, r.body
    assert r.header("content-type") == CONTENT_TYPE_LATEST
    return samples(r.body.decode())


# --- /healthz and /readyz, also while draining --------------------------------------------

@pytest_twisted.ensureDeferred
async def test_healthz_and_readyz_answer_json_on_their_own_listener(reactor, echo, gateway):
    gw = await gateway(config(echo.url))
    port = admin_port(gw)
    assert port != gw.port

    r = await call(port, "/healthz")
    assert (r.status, r.header("content-type"), r.json()) == (200, "application/json", {"status": "ok"})
    assert r.header("cache-control") == "no-store"
    r = await call(port, "/readyz")
    assert r.status == 200 and r.header("content-type") == "application/json"
    assert r.json() == {"ready": True, "checks": {"config": "loaded", "draining": "no", "listeners": "bound"}}
    r = await call(port, "/nope")
    assert r.status == 404 and "/metrics" in r.json()["paths"]
    # The data path does not serve admin paths.
    assert (await call(gw.port, "/healthz")).status == 404


@pytest_twisted.ensureDeferred
async def test_readyz_turns_503_while_draining_and_the_request_in_flight_completes(reactor, raw_upstream, gateway):
    held: list[Any] = []

    def slow(server: Any, data: bytes) -> None:         # answers only when the test releases it
        if b"\r\n\r\n" in server.buffer and server not in held:
            held.append(server)

    upstream = await raw_upstream(slow)
    gw = await gateway(config(upstream.url))
    port, data_port = admin_port(gw), gw.port

    in_flight = ensureDeferred(raw(data_port, http_request("/api/users/slow"), read_timeout=15.0))
    await poll(reactor, lambda: held, "the request to reach the upstream")
    stopping = gw.gateway.stopService()
    assert gw.gateway.draining and not stopping.called

    r = await call(port, "/readyz")
    assert r.status == 503, r.body
    assert r.json() == {"ready": False, "checks": {"config": "loaded", "draining": "yes", "listeners": "not bound"}}
    assert (await call(port, "/healthz")).status == 200
    status = (await call(port, "/status")).json()
    assert status["draining"] is True and status["ready"] is False
    assert status["requests"]["in_flight"] == 1
    assert named(await scrape(port), "txgateway_inflight_requests") == {labels(): 1}

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", data_port), timeout=1.0).close()
        except ConnectionRefusedError:
            return True
        return False
    await poll(reactor, refused, "the data listener to stop accepting")

    assert not stopping.called and not in_flight.called   # still draining, still waiting
    held[0].transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 9\r\n\r\nslow done")
    (r,) = parse_responses(await in_flight)
    assert (r.status, r.body) == (200, b"slow done")
    await poll(reactor, lambda: stopping.called, "the drain to finish", timeout=10.0)
    assert await stopping is None                          # a drain failure would raise here
    assert gw.gateway.stats.in_flight == 0 and gw.log[-1]["status"] == 200


# --- /metrics ----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_metrics_count_requests_rejections_and_breaker_trips(reactor, echo, gateway):
    gw = await gateway(config(echo.url))
    port = admin_port(gw)

    before = await scrape(port)
    assert named(before, "txgateway_requests_total") == {}
    assert named(before, "txgateway_circuit_state") == {labels(upstream="users"): 0}
    assert named(before, "txgateway_circuit_trips_total") == {labels(upstream="users"): 0}

    sent = []
    for _ in range(3):
        sent.append((await call(gw.port, "/api/users/a")).status)
    sent.append((await call(gw.port, "/api/users", method="POST", body=b'{"x": 1}')).status)
    sent.append((await call(gw.port, "/nowhere")).status)
    for _ in range(3):
        sent.append((await call(gw.port, "/api/limited/x")).status)
    assert sent == [200, 200, 200, 200, 404, 200, 200, 429]
    assert len(echo.requests) == 6

    m = await scrape(port)
    assert named(m, "txgateway_requests_total") == {
        labels(route="/api/users", method="GET", status="200"): 3,
        labels(route="/api/users", method="POST", status="200"): 1,
        labels(route="", method="GET", status="404"): 1,
        labels(route="/api/limited", method="GET", status="200"): 2,
        labels(route="/api/limited", method="GET", status="429"): 1,
    }
    counts = named(m, "txgateway_request_duration_seconds_count")
    assert counts == {labels(route="/api/users"): 4, labels(route=""): 1, labels(route="/api/limited"): 3}
    assert sum(counts.values()) == len(sent)
    buckets = named(m, "txgateway_request_duration_seconds_bucket")
    for route_labels, count in counts.items():
        assert buckets[route_labels | {("le", "+Inf")}] == count
    assert all(v > 0 for v in named(m, "txgateway_request_duration_seconds_sum").values())
    # Only requests that reached the upstream: 4 on /api/users, 2 admitted on /api/limited.
    assert named(m, "txgateway_upstream_duration_seconds_count") == {labels(upstream="users"): 6}
    assert named(m, "txgateway_upstream_duration_seconds_bucket")[labels(upstream="users", le="+Inf")] == 6
    assert named(m, "txgateway_ratelimit_rejected_total") == {labels(route="/api/limited"): 1}
    assert named(m, "txgateway_inflight_requests") == {labels(): 0}
    assert named(m, "txgateway_redis_errors_total") == {labels(): 0}
    assert named(m, "txgateway_redis_up") == {labels(): 1}
    assert named(m, "txgateway_upstream_target_up") == {labels(upstream="users", target=echo.url): 1}
    assert named(m, "txgateway_circuit_state") == {labels(upstream="users"): 0}
    assert named(m, "process_resident_memory_bytes")[labels()] > 0
    assert named(m, "process_cpu_seconds_total")[labels()] > 0
    assert any(name == "python_gc_collections_total" for name, _ in m)
    assert any(name == "python_info" for name, _ in m)

    gw.gateway.breakers.trip("users")
    m = await scrape(port)
    assert named(m, "txgateway_circuit_state") == {labels(upstream="users"): 1}
    assert named(m, "txgateway_circuit_trips_total") == {labels(upstream="users"): 1}
    r = await call(gw.port, "/api/users/a")                 # fails fast, never reaches the upstream
    assert r.status == 503 and len(echo.requests) == 6
    m = await scrape(port)
    assert named(m, "txgateway_requests_total")[labels(route="/api/users", method="GET", status="503")] == 1
    assert named(m, "txgateway_request_duration_seconds_count")[labels(route="/api/users")] == 5
    assert named(m, "txgateway_upstream_duration_seconds_count") == {labels(upstream="users"): 6}
    assert named(m, "txgateway_inflight_requests") == {labels(): 0}


# --- /status -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_status_matches_reality_after_a_breaker_trip(reactor, echo, gateway):
    gw = await gateway(config(echo.url))
    port = admin_port(gw)
    assert [(await call(gw.port, "/api/users/a")).status for _ in range(2)] == [200, 200]
    assert (await call(gw.port, "/nowhere")).status == 404
    assert [(await call(gw.port, "/api/limited")).status for _ in range(3)] == [200, 200, 429]

    gw.gateway.breakers["users"].random = lambda: 0.5    # no jitter: open exactly open_for
    gw.gateway.breakers.trip("users")
    assert (await call(gw.port, "/api/users/a")).status == 503
    assert len(echo.requests) == 4

    r = await call(port, "/status")
    assert r.status == 200 and r.header("content-type") == "application/json"
    s = r.json()
    assert (s["ready"], s["draining"], s["config"]) == (True, False, "test.yaml")
    assert s["listeners"] == ["tcp:0:interface=127.0.0.1"]
    assert isinstance(s["version"], str) and s["version"] and s["uptime_s"] >= 0

    users = s["upstreams"]["users"]
    breaker = users["breaker"]
    assert breaker["state"] == "open" and breaker["trips"] == 1
    assert breaker["transitions"] == {"closed->open": 1}
    assert 0 < breaker["retry_after"] <= 300 and breaker["open_for"] == 300
    assert users["balance"] and users["health_check"] is None
    (target,) = users["targets"]
    assert target["url"] == echo.url
    assert (target["requests"], target["in_flight"], target["down"], target["ejected_for"]) == (4, 0, False, 0)

    assert s["limiter"] == {"backend": "local", "on_redis_error": "local", "local_buckets": 1, "redis": None}
    assert s["requests"] == {"total": 7, "in_flight": 0, "rate_limited": 1,
                             "by_class": {"2xx": 4, "4xx": 2, "5xx": 1}}
    assert [(r["prefix"], r["upstream"], r["rate_limit"]) for r in s["routes"]] == [
        ("/api/users", "users", None), ("/api/limited", "users", "ip")]

    gw.gateway.breakers.reset("users")
    s = (await call(port, "/status")).json()
    assert s["upstreams"]["users"]["breaker"]["state"] == "closed"
    assert s["upstreams"]["users"]["breaker"]["retry_after"] is None


# --- the bearer token --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_token_guards_status_and_metrics_but_not_probes_or_the_page(reactor, echo, gateway, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    gw = await gateway(config(echo.url, admin=ADMIN_WITH_TOKEN))
    port = admin_port(gw)
    assert (await call(gw.port, "/api/users/a")).status == 200

    for path in ("/status", "/metrics", "/nope"):
        for given in ([], [("Authorization", "Bearer wrong-token-0123456789abc")], [("Authorization", TOKEN)],
                      [("Authorization", f"Basic {TOKEN}")], [("Authorization", f"Bearer {TOKEN}x")]):
            r = await call(port, path, headers=given)
            assert r.status == 401, (path, given, r.status)
            assert r.header("www-authenticate") == 'Bearer realm="txgateway-admin"'
            assert "error" in r.json() and TOKEN not in r.body.decode()
    assert (await call(port, "/status", token=TOKEN)).json()["requests"]["total"] == 1
    assert named(await scrape(port, token=TOKEN), "txgateway_requests_total") == {
        labels(route="/api/users", method="GET", status="200"): 1}
    assert (await call(port, "/nope", token=TOKEN)).status == 404

    assert (await call(port, "/healthz")).status == 200
    assert (await call(port, "/readyz")).status == 200
    page = await call(port, "/")
    assert page.status == 200 and page.header("content-type") == "text/html; charset=utf-8"
    html = page.body.decode()
    assert "<title>txgateway status</title>" in html and 'get("/status")' in html and 'get("/status/history")' in html
    for data in (echo.url, str(echo.port), "/api/users", "/api/limited", "users", TOKEN, "test.yaml"):
        assert data not in html, data


# --- the status page in a real browser ---------------------------------------------------

def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail("chromium is not installed: `make system-deps` installs it (Debian package `chromium`)")
    return subprocess.run(
        [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=5000", *args],
        capture_output=True, text=True, timeout=CHROMIUM_TIMEOUT, check=False)


@pytest_twisted.ensureDeferred
async def test_status_page_in_headless_chromium_shows_the_tripped_breaker(reactor, echo, gateway, monkeypatch,
                                                                         tmp_path):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    gw = await gateway(config(echo.url, admin=ADMIN_WITH_TOKEN))
    port = admin_port(gw)
    assert [(await call(gw.port, "/api/users/a")).status for _ in range(3)] == [200, 200, 200]
    assert [(await call(gw.port, "/api/limited")).status for _ in range(3)] == [200, 200, 429]
    gw.gateway.breakers.trip("users")
    assert (await call(gw.port, "/api/users/a")).status == 503
    url = f"http://127.0.0.1:{port}/#token={TOKEN}"     # the fragment never reaches the server

    done = await deferToThread(chromium, "--dump-dom", url, profile=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    error = re.search(r'<div id="error">(.*?)</div>', dom, re.S)
    assert error is not None and error.group(1) == "", (error and error.group(1), dom[-3000:])
    upstream_row = re.search(r"<tr><td>users</td><td>(.*?)</td><td>[^<]*</td><td>([^<]*)</td><td>(.*?)</td>", dom)
    assert upstream_row is not None, dom
    breaker, target, health = upstream_row.groups()
    assert breaker.startswith('<span class="open">open</span> (retry in ')
    assert target == echo.url and health == '<span class="open">up, but breaker open</span>'   # not a plain "up"
    assert "<td>/api/users</td><td>users</td>" in dom and "<td>/api/limited</td><td>users</td>" in dom
    assert "ready - config test.yaml" in dom
    # Requests: total 7, by class, 1 rate limited.
    assert re.search(r"<tr><td>7</td><td>[^<]*</td><td>0</td><td>.*?</td><td>1</td></tr>", dom), dom

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    done = await deferToThread(chromium, f"--screenshot={shot}", "--window-size=1200,900", url,
                               profile=tmp_path / "profile")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.is_file(), done.stderr[-2000:]
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5 * 1024, len(data)
    print(f"\nstatus page screenshot: {shot}")


# --- hardening: Host names, security headers, slow and too many connections (issue 21) --------

def admin_get(path: str, host: str | None) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Connection: close"] + ([f"Host: {host}"] if host is not None else [])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def get_with_host(port: int, path: str, host: str | None) -> Response:
    (r,) = parse_responses(await raw(port, admin_get(path, host)))
    return r


@pytest_twisted.ensureDeferred
async def test_a_foreign_host_gets_403_so_dns_rebinding_cannot_read_status(reactor, echo, gateway):
    """Without a token (the default) /status holds everything: a page on rebind.attacker.example
    whose name now points at 127.0.0.1 must not read it. Loopback names, IP addresses and
    admin.allowed_hosts are answered, on any port."""
    admin = 'admin: {endpoint: "tcp:0:interface=127.0.0.1", allowed_hosts: [gw-admin.internal]}'
    gw = await gateway(config(echo.url, admin=admin))
    port = admin_port(gw)
    for path in ("/status", "/metrics", "/", "/healthz"):
        for host in ("rebind.attacker.example", f"rebind.attacker.example:{port}", "localhost.attacker.example",
                     "127.0.0.1.nip.io", "gw-admin.internal.attacker.example"):
            r = await get_with_host(port, path, host)
            assert r.status == 403, (path, host, r.body)
            assert r.header("content-type") == "application/json"
            assert "admin.allowed_hosts" in r.json()["error"]
            assert b'"version"' not in r.body and b"txgateway_requests_total" not in r.body
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"LOCALHOST:{port}", "[::1]", f"[::1]:{port}",
                 "10.0.0.7:9901", "gw-admin.internal", f"gw-admin.internal:{port}", None):
        r = await get_with_host(port, "/status", host)
        assert r.status == 200, (host, r.body)
        assert r.json()["ready"] is True


@pytest_twisted.ensureDeferred
async def test_every_admin_answer_has_security_headers_a_csp_and_no_server_version(reactor, echo, gateway):
    gw = await gateway(config(echo.url))
    port = admin_port(gw)
    answers = [await call(port, path) for path in ("/", "/status", "/metrics", "/healthz", "/nope")]
    answers.append(await call(port, "/status", method="POST", body=b"x"))
    answers.append(await get_with_host(port, "/status", "evil.example"))
    assert [r.status for r in answers] == [200, 200, 200, 200, 404, 405, 403]
    for r in answers:
        assert r.header("x-content-type-options") == "nosniff", r.headers
        assert r.header("x-frame-options") == "DENY"
        assert r.header("referrer-policy") == "no-referrer"
        assert "frame-ancestors 'none'" in (r.header("content-security-policy") or "")
        assert r.header("server") == "txgateway"
        assert b"TwistedWeb" not in b"".join(f"{k}: {v}".encode() for k, v in r.headers)
    csp = answers[0].header("content-security-policy") or ""
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert "unsafe-inline" not in csp and "script-src 'sha256-" in csp and "style-src 'sha256-" in csp


def trickle(port: int, data: bytes, pause: float, at_once: bytes = b"") -> bytes:
    """Send `at_once`, then `data` a byte every `pause` seconds until the server closes; all it answered."""
    import socket as sockets
    with sockets.create_connection(("127.0.0.1", port), timeout=5.0) as s:
        s.sendall(at_once)
        s.settimeout(pause)
        got = b""
        for byte in data:
            try:
                s.sendall(bytes([byte]))
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        s.settimeout(5.0)
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        return got


@pytest_twisted.ensureDeferred
async def test_a_trickling_admin_client_gets_408_after_header_timeout_and_the_gateway_serves_on(
        reactor, echo, gateway):
    """One byte every 100 ms restarts twisted.web's idle timer every time; the head's deadline
    does not move: 408 and closed after header_timeout (300 ms), not after the trickle."""
    gw = await gateway("limits: {header_timeout: 300ms}\n" + config(echo.url))
    port = admin_port(gw)
    head = admin_get("/status", "127.0.0.1")
    started = reactor.seconds()
    answer = await deferToThread(trickle, port, head[:-2], 0.1)
    (r,) = parse_responses(answer)
    assert r.status == 408 and r.json() == {"error": "request headers not received in time"}
    assert reactor.seconds() - started < len(head) * 0.1     # cut off before the trickle ended
    # a client that sent nothing is closed (without an answer) after header_timeout too
    started = reactor.seconds()
    assert await raw(port, b"", read_timeout=5.0) == b""
    assert reactor.seconds() - started < 2.0
    # a kept-alive connection: the next head has its own deadline from its first byte
    second = admin_get("/healthz", "127.0.0.1").replace(b"Connection: close", b"Connection: keep-alive")
    answer = await deferToThread(trickle, port, second[:-2], 0.05, second)
    first, late = parse_responses(answer)
    assert (first.status, late.status) == (200, 408)
    # an idle kept-alive connection (Prometheus between scrapes) gets no 408: its next
    # request, sent at once after twice header_timeout, is answered
    quiet = parse_responses(await raw(port, [second, admin_get("/healthz", "127.0.0.1")], pause=0.6))
    assert [r.status for r in quiet] == [200, 200]
    assert (await call(port, "/healthz")).status == 200
    assert (await call(gw.port, "/api/users/1")).status == 200


@pytest_twisted.ensureDeferred
async def test_admin_connections_are_capped_and_the_main_listener_keeps_serving(reactor, echo, gateway):
    import socket as sockets

    from txgateway.ops.admin import MAX_CONNECTIONS
    gw = await gateway(config(echo.url))
    port = admin_port(gw)
    held = [sockets.create_connection(("127.0.0.1", port)) for _ in range(MAX_CONNECTIONS)]
    try:
        await poll(reactor, lambda: len(gw.gateway.admin.factory.admission.open) == MAX_CONNECTIONS,
                   "the held admin connections")
        extra = await raw(port, admin_get("/healthz", "127.0.0.1"))
        assert extra in (b"", b"<RESET>")                     # closed at once, never answered
        assert (await call(gw.port, "/api/users/1")).status == 200
    finally:
        for s in held:
            s.close()
    await poll(reactor, lambda: not gw.gateway.admin.factory.admission.open, "the admin connections to close")
    assert (await call(port, "/healthz")).status == 200


@pytest_twisted.ensureDeferred
async def test_admin_takes_no_connection_from_the_main_listeners_descriptor_reserve(reactor, echo, gateway):
    """With fewer than a quarter of RLIMIT_NOFILE free, the admin listener refuses connections
    while the main listener still accepts and proxies."""
    import os
    import resource

    gw = await gateway(config(echo.url))
    port = admin_port(gw)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(used / 0.8) + 1, hard))    # ~20% free
    try:
        assert await raw(port, admin_get("/healthz", "127.0.0.1")) in (b"", b"<RESET>")
        assert (await call(gw.port, "/api/users/1")).status == 200
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert (await call(port, "/healthz")).status == 200
