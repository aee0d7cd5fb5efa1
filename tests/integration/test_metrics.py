"""The metrics that answer the usual questions, scraped from a live admin listener (issue 17, part 4).

Per-target requests and latency, retries, bytes, rate-limit decisions, health-check results
and target state, reloads, certificate expiry, JWKS freshness, build info; OpenMetrics with
trace ids as exemplars on the request-duration histogram; and the Grafana dashboard, whose
every query must name a metric this gateway exports. Real sockets and the real reactor clock
(health checks run at start; nothing here waits for an interval).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest_twisted
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

from tests.conftest import ISSUER, free_port, mint_token, parse_config, with_defaults
from tests.integration.test_admin import admin_port, call, labels, named, poll, scrape
from tests.integration.test_auth import jwks_server, rsa_keys  # noqa: F401  (fixtures)
from tests.integration.test_http2 import cert  # noqa: F401  (fixture)
from txgateway import __version__

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "txgateway.json"
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def config(echo_url: str, dead_url: str, certificate: Any, jwks_url: str, secret_file: str) -> str:
    return f"""
listen:
  - {{endpoint: "tcp:0:interface=127.0.0.1"}}
  - {{endpoint: "tcp:0:interface=127.0.0.1", tls: {{certificates: [{{cert: {certificate.cert}, key: {certificate.key}}}]}}}}
access_log: "off"
admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
auth:
  jwt: {{algorithms: [RS256, HS256], jwks_url: "{jwks_url}", secret_file: {secret_file}, issuer: {ISSUER}, audience: api}}
rate_limits: {{backend: local, tiers: {{free: {{rate: 100/hour}}}}, default_tier: free}}
upstreams:
  users: {{targets: ["{dead_url}", "{echo_url}"], balance: round_robin, retries: 1, connect_timeout: 1s, timeout: 5s,
           circuit_breaker: {{consecutive_failures: 50, open_for: 5m}},
           health_check: {{path: /healthz, interval: 5m, unhealthy_threshold: 2}},
           passive_health: {{consecutive_failures: 1, eject_for: 5m}}}}
routes:
  - {{prefix: /api/users, upstream: users}}
  - {{prefix: /api/limited, upstream: users, rate_limit: {{key: ip, rate: 1/hour}}}}
  - {{prefix: /api/private, upstream: users, auth: required}}
"""


async def start(gateway: Any, echo: Any, certificate: Any, jwks: Any, secret_file: str, tmp_path: Path) -> Any:
    _, _, url = await jwks("k1")
    path = tmp_path / "gateway.yaml"
    path.write_text(with_defaults(config(echo.url, f"http://127.0.0.1:{free_port()}", certificate, url, secret_file)))
    gw = await gateway(path.read_text())
    gw.gateway.config = parse_config(path.read_text(), str(path))      # reload() reads this file
    return gw


async def get(gw: Any, path: str, headers: list[tuple[str, str]] | None = None) -> int:
    return (await call(gw.port, path, headers=headers)).status


@pytest_twisted.ensureDeferred
async def test_the_usual_questions_are_answered_by_metrics(
        reactor, echo, gateway, cert, jwks_server, secret_file, tmp_path):  # noqa: F811
    gw = await start(gateway, echo, cert, jwks_server, secret_file, tmp_path)
    admin = admin_port(gw)
    gateway_object = gw.gateway
    await poll(reactor, lambda: gateway_object.jwks.fetched_at is not None
               and all(m.checks_passed + m.checks_failed for m in gateway_object.proxy.groups["users"].balancer.members),
               "the JWKS fetch and a health check of each target")
    dead, live = (m.url for m in gateway_object.proxy.groups["users"].balancer.members)
    assert [await get(gw, f"/api/users/{i}") for i in range(4)] == [200] * 4
    assert [await get(gw, "/api/limited/1") for _ in range(2)] == [200, 429]
    assert await get(gw, "/api/private/1", [("Authorization", f"Bearer {mint_token()}")]) == 200
    assert gateway_object.reload() == []
    m = await scrape(admin)

    assert named(m, "txgateway_build_info") == {labels(version=__version__): 1.0}
    # 4 + 1 + 1 reached the upstream (the second /api/limited was the limiter's 429), all answered by the live target
    assert named(m, "txgateway_upstream_target_requests_total") == {labels(upstream="users", target=live, **{"class": "2xx"}): 6.0}
    assert named(m, "txgateway_upstream_target_duration_seconds_count") == {labels(upstream="users", target=live): 6.0}
    assert named(m, "txgateway_upstream_duration_seconds_count") == {labels(upstream="users"): 6.0}
    retried = sum(record["retries"] for record in gw.log)
    assert retried >= 1 and named(m, "txgateway_upstream_retries_total") == {labels(upstream="users"): retried}
    assert named(m, "txgateway_response_bytes_total")[labels(route="/api/users")] > 0
    assert named(m, "txgateway_request_bytes_total")[labels(route="/api/users")] == 0
    assert named(m, "txgateway_ratelimit_decisions_total") == {
        labels(route="/api/limited", outcome="allowed"): 1.0, labels(route="/api/limited", outcome="rejected"): 1.0}
    assert named(m, "txgateway_health_checks_total") == {
        labels(upstream="users", target=dead, result="pass"): 0.0, labels(upstream="users", target=dead, result="fail"): 1.0,
        labels(upstream="users", target=live, result="pass"): 1.0, labels(upstream="users", target=live, result="fail"): 0.0}
    states = {k for k, v in named(m, "txgateway_upstream_target_state").items() if v == 1}
    assert labels(upstream="users", target=live, state="up") in states and len(states) == 2   # one state each
    assert labels(upstream="users", target=dead, state="ejected") in states            # its live failures
    assert named(m, "txgateway_reloads_total") == {labels(result="success"): 1.0, labels(result="failure"): 0.0}
    (last_reload,) = named(m, "txgateway_reload_last_success_timestamp_seconds").values()
    assert abs(last_reload - time.time()) < 60
    listener = gateway_object.config.listen[1].endpoint
    expiry = named(m, "txgateway_tls_certificate_expiry_seconds")[labels(listener=listener, certificate=cert.cert)]
    assert 86000 < expiry <= 86400                 # the fixture's certificate is valid for a day
    assert named(m, "txgateway_jwks_keys") == {frozenset(): 1.0}
    (fetched,) = named(m, "txgateway_jwks_last_success_timestamp_seconds").values()
    assert abs(fetched - time.time()) < 60

    Path(gateway_object.config.file).write_text("listen: [")          # a broken file: the reload fails
    assert gateway_object.reload() != []
    m = await scrape(admin)
    assert named(m, "txgateway_reloads_total") == {labels(result="success"): 1.0, labels(result="failure"): 1.0}
    assert await get(gw, "/api/users/9") == 200                         # still serving


@pytest_twisted.ensureDeferred
async def test_openmetrics_output_carries_the_trace_id_as_an_exemplar(reactor, echo, gateway):
    gw = await gateway(f"""
    admin: {{endpoint: "tcp:0:interface=127.0.0.1"}}
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users}}
    """)
    assert await get(gw, "/api/users/1", [("traceparent", f"00-{TRACE}-00f067aa0ba902b7-01")]) == 200
    sent = echo.requests[-1].getHeader("traceparent")
    assert sent.startswith(f"00-{TRACE}-") and sent != f"00-{TRACE}-00f067aa0ba902b7-01"   # continued, new span
    r = await call(admin_port(gw), "/metrics", headers=[("Accept", "application/openmetrics-text; version=1.0.0")])
    assert r.status == 200 and r.header("content-type").startswith("application/openmetrics-text")
    exemplars = [s.exemplar for family in openmetrics_families(r.body.decode())
                 if family.name == "txgateway_request_duration_seconds"
                 for s in family.samples if s.exemplar is not None]
    assert [e.labels for e in exemplars] == [{"trace_id": TRACE}]
    plain = await call(admin_port(gw), "/metrics")                    # the classic text format still the default
    assert plain.header("content-type").startswith("text/plain") and b"trace_id" not in plain.body


def dashboard_metrics() -> set[str]:
    """Every metric name a query of the dashboard names."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert exprs, "the dashboard has no queries"
    exprs += [variable["query"] for variable in dashboard["templating"]["list"] if variable["type"] == "query"]
    return {name for expr in exprs for name in re.findall(r"\btxgateway_[a-z_]+", expr)}


@pytest_twisted.ensureDeferred
async def test_every_query_of_the_grafana_dashboard_names_an_exported_metric(
        reactor, echo, gateway, cert, jwks_server, secret_file, tmp_path):  # noqa: F811
    gw = await start(gateway, echo, cert, jwks_server, secret_file, tmp_path)
    assert await get(gw, "/api/users/1") == 200
    assert [await get(gw, "/api/limited/1") for _ in range(2)] == [200, 429]
    exported = {name for name, _ in await scrape(admin_port(gw))}
    missing = sorted(dashboard_metrics() - exported)
    assert not missing, f"the dashboard queries metrics the gateway does not export: {missing}"
