"""The status page's live charts (issue 17 part 5) in headless Chromium: a quiet period, then
a bad one (502s from a dead target that gets ejected, 503s under an open breaker); the charts'
data points are checked against /status/history and /status, and both screenshots are kept
as test artifacts (tests/artifacts/, paths printed)."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.conftest import free_port
from tests.integration.test_admin import ADMIN_WITH_TOKEN, ARTIFACTS, TOKEN, TOKEN_ENV, admin_port, call, chromium


def page_config(echo_url: str, dead_url: str) -> str:
    return f"""
{ADMIN_WITH_TOKEN}
upstreams:
  users: {{targets: ["{echo_url}"], circuit_breaker: {{consecutive_failures: 50, open_for: 5m}}}}
  orders: {{targets: ["{dead_url}"], connect_timeout: 1s, passive_health: {{consecutive_failures: 2, eject_for: 60s}}}}
routes:
  - {{prefix: /api/users, upstream: users}}
  - {{prefix: /api/orders, upstream: orders}}
"""


def chart_values(dom: str, scope: str, chart: str) -> dict[str, list[list[float | None]]]:
    """series name -> [[t, value], ...] as the page drew them (its data-values attributes)."""
    svg = re.search(r'<svg[^>]*data-scope="%s" data-chart="%s".*?</svg>' % (re.escape(scope), chart), dom, re.S)
    assert svg is not None, (scope, chart, dom[-3000:])
    return {name: json.loads(html.unescape(values))
            for name, values in re.findall(r'data-series="([^"]*)" data-values="([^"]*)"', svg.group(0))}


async def shot(url: str, name: str, profile: Path) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    path.unlink(missing_ok=True)
    done = await deferToThread(chromium, f"--screenshot={path}", "--window-size=1280,1900", url, profile=profile)
    assert done.returncode == 0 and path.is_file(), done.stderr[-2000:]
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and path.stat().st_size > 20 * 1024
    print(f"\nstatus page screenshot: {path}")
    return path


async def dom(url: str, profile: Path) -> str:
    done = await deferToThread(chromium, "--dump-dom", url, profile=profile)
    assert done.returncode == 0, done.stderr[-2000:]
    error = re.search(r'<div id="error">(.*?)</div>', done.stdout, re.S)
    assert error is not None and error.group(1) == "", (error and error.group(1))
    return done.stdout


def check_against_the_api(page: str, history: dict[str, Any], status: dict[str, Any]) -> None:
    """Every point drawn is the sample's value; the gateway's samples drawn add up to /status's count."""
    by_t = {s["t"]: s["series"] for s in history["samples"]}
    for scope in ("gateway", "route /api/users", "route /api/orders", "upstream users", "upstream orders"):
        for name, points in chart_values(page, scope, "rps").items():
            for t, value in points:
                assert by_t[t][scope]["rps"].get(name, 0) == value, (scope, name, t)
        for name, points in chart_values(page, scope, "latency").items():
            assert all(by_t[t][scope][name] == value for t, value in points), (scope, name)
        (errors,) = chart_values(page, scope, "errors").values()
        for t, value in errors:
            rate = by_t[t][scope]["error_rate"]
            assert value == (None if rate is None else round(100 * rate, 2)), (scope, t)
    (drawn,) = {tuple(t for t, _ in points) for points in chart_values(page, "gateway", "rps").values()}
    assert sum(by_t[t]["gateway"]["requests"] for t in drawn) == status["requests"]["total"]


@pytest_twisted.ensureDeferred
async def test_charts_in_headless_chromium_for_a_quiet_and_a_bad_period(reactor, echo, gateway, monkeypatch, tmp_path):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    gw = await gateway(page_config(echo.url, f"http://127.0.0.1:{free_port()}"))
    history = gw.gateway.history
    port = admin_port(gw)
    url = f"http://127.0.0.1:{port}/#token={TOKEN}"

    # Without a token the page says how to give it one.
    bare = await deferToThread(chromium, "--dump-dom", f"http://127.0.0.1:{port}/", profile=tmp_path / "p0")
    assert "#token=YOUR_ADMIN_TOKEN" in bare.stdout and "/status answered 401" in bare.stdout

    # A quiet period: only 200s.
    for _ in range(3):
        assert [(await call(gw.port, "/api/users/1")).status for _ in range(10)] == [200] * 10
        history.sample()
    page = await dom(url, tmp_path / "p1")
    status = (await call(port, "/status", token=TOKEN)).json()
    check_against_the_api(page, (await call(port, "/status/history", token=TOKEN)).json(), status)
    rps = chart_values(page, "gateway", "rps")
    assert set(rps) == {"2xx"} and max(v for _, v in rps["2xx"]) > 0
    assert '<span class="up">up</span>' in page and '<span class="cls c2xx">2xx <b>30</b></span>' in page
    quiet = await shot(url, "status-page-quiet.png", tmp_path / "p2")

    # A bad period: the orders target refuses connections (502, then ejected: 503), the users
    # breaker is opened (503).
    codes = [(await call(gw.port, "/api/orders/1")).status for _ in range(4)]
    assert codes[:2] == [502, 502] and set(codes[2:]) <= {502, 503}, codes
    gw.gateway.breakers.trip("users")
    assert [(await call(gw.port, "/api/users/1")).status for _ in range(4)] == [503] * 4
    history.sample()
    page = await dom(url, tmp_path / "p3")
    status = (await call(port, "/status", token=TOKEN)).json()
    h = (await call(port, "/status/history", token=TOKEN)).json()
    check_against_the_api(page, h, status)
    assert max(v for _, v in chart_values(page, "gateway", "errors")["5xx %"] if v is not None) == 100.0
    assert {(e["kind"], e["upstream"]) for e in h["events"]} == {("breaker", "users"), ("ejected", "orders")}
    marks = re.findall(r'<line class="mark"[^>]*><title>([^<]*)</title>', page)
    assert any("breaker users: closed -&gt; open" in m for m in marks) and any("ejected http" in m for m in marks), marks
    assert re.search(r'<span class="ejected">ejected, back in (59|60) s</span>', page), page
    assert '<span class="open">up, but breaker open</span>' in page
    assert re.search(r"Connection refused[^<]* at \d\d:\d\d:\d\d <span class=\"when\">\(\d+ s ago\)</span>", page), page
    bad = await shot(url, "status-page-bad.png", tmp_path / "p4")
    assert quiet.read_bytes() != bad.read_bytes()
