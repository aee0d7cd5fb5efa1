"""The access-log fields operators search by, over real sockets (issue 17, part 3).

The query string (secrets in it redacted), user agent, referer, host, HTTP version,
request_id, the upstream's address and own status, retries, the reason of the gateway's own
error answers (`detail`), the verified identity on a 403, and `access_log_fields:` picking
and ordering a line's fields. Each bad request gets its exact status and envelope, and the
next good request is served.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from tests.conftest import ISSUER, assert_envelope, free_port, mint_token, parse_responses, raw, running_gateways
from tests.integration.test_filter_contract import Probe, pipelined
from tests.integration.test_filter_contract import start as start_probed
from txgateway.ops.accesslog import FIELDS


def request(path: str, headers: list[tuple[str, str]] | None = None, version: str = "1.1") -> bytes:
    lines = [f"GET {path} HTTP/{version}", "Host: api.test", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers or []]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def get(gw: Any, path: str, headers: list[tuple[str, str]] | None = None, version: str = "1.1") -> Any:
    (r,) = parse_responses(await raw(gw.port, request(path, headers, version)))
    return r


def lines_of(gw: Any) -> list[dict[str, Any]]:
    """The access log as the writer would write it: each JSON line, parsed in order."""
    lines: list[dict[str, Any]] = []
    gw.gateway.access_log.observer = lambda event: lines.append(
        json.loads(event["access"].json_line(), object_pairs_hook=lambda pairs: pairs))
    return lines


PLAIN = """
upstreams:
  users: {{targets: ["{url}"], timeout: 2s}}
routes:
  - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
"""


@pytest_twisted.ensureDeferred
async def test_a_line_has_the_query_with_secrets_redacted_user_agent_referer_host_version_and_request_id(
        reactor, echo, gateway):
    gw = await gateway(PLAIN.format(url=echo.url))
    lines = lines_of(gw)
    r = await get(gw, "/api/users/1?page=2&token=s3cret&API%5FKEY=k&q=a%20b",
                  [("User-Agent", 'curl/8 "quoted"'), ("Referer", "https://app.test/x")], version="1.0")
    assert r.status == 200
    assert echo.requests[-1].uri.endswith(b"?page=2&token=s3cret&API%5FKEY=k&q=a%20b")   # the upstream gets it as sent
    line = dict(lines[-1])
    assert [name for name, _ in lines[-1]] == list(FIELDS)             # every field, in the default order
    assert line["query"] == "page=2&token=REDACTED&API%5FKEY=REDACTED&q=a%20b"
    assert (line["user_agent"], line["referer"], line["host"], line["http_version"]) == (
        'curl/8 "quoted"', "https://app.test/x", "api.test", "1.0")
    assert line["request_id"] == line["correlation_id"] == r.header("x-correlation-id")
    assert line["upstream_addr"] == f"127.0.0.1:{echo.port}"
    assert (line["retries"], line["upstream_status"], line["detail"]) == (0, None, None)   # the status is the upstream's
    r = await get(gw, "/api/users/2")
    assert r.status == 200
    assert (dict(lines[-1])["query"], dict(lines[-1])["user_agent"], dict(lines[-1])["referer"]) == (None, None, None)


@pytest_twisted.ensureDeferred
async def test_access_log_redact_names_the_parameters_to_hide(reactor, echo, gateway):
    gw = await gateway("access_log_redact: [session]\n" + PLAIN.format(url=echo.url))
    await get(gw, "/api/users/1?token=t&Session=s")
    assert gw.log[-1]["query"] == "token=t&Session=REDACTED"


@pytest_twisted.ensureDeferred
async def test_access_log_fields_picks_and_orders_the_fields_of_a_line(reactor, echo, gateway):
    gw = await gateway("access_log_fields: [status, path, user_agent, request_id]\n" + PLAIN.format(url=echo.url))
    lines = lines_of(gw)
    r = await get(gw, "/api/users/1", [("User-Agent", "ua")])
    assert lines[-1] == [("status", 200), ("path", "/api/users/1"), ("user_agent", "ua"),
                         ("request_id", r.header("x-correlation-id"))]


@pytest_twisted.ensureDeferred
async def test_a_401_logs_its_reason_and_a_403_the_identity_it_verified(reactor, echo, gateway, secret_file):
    from tests.integration.test_auth import hs_config
    gw = await gateway(hs_config(echo.url, secret_file))
    r = await get(gw, "/api/users/1", [("Authorization", "Bearer garbage")])
    assert_envelope(r, 401, "UNAUTHORIZED")
    assert (gw.log[-1]["error"], gw.log[-1]["detail"], gw.log[-1]["user_id"]) == (
        "UNAUTHORIZED", "the token is malformed", None)
    r = await get(gw, "/api/orders/1", [("Authorization", f"Bearer {mint_token(sub='bob', role='user')}")])
    assert_envelope(r, 403, "FORBIDDEN")
    assert (gw.log[-1]["user_id"], gw.log[-1]["detail"]) == ("bob", "this identity lacks the role this route requires")
    assert len(echo.requests) == 0
    r = await get(gw, "/api/users/1", [("Authorization", f"Bearer {mint_token(sub='carol')}")])
    assert r.status == 200 and gw.log[-1]["user_id"] == "carol" and gw.log[-1]["detail"] is None


@pytest_twisted.ensureDeferred
async def test_a_429_logs_the_caller_and_the_reason(reactor, echo, gateway, secret_file):
    gw = await gateway(f"""
    auth: {{jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: {ISSUER}, audience: api}}}}
    upstreams:
      users: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api/users, upstream: users, auth: required, rate_limit: {{key: user, rate: 1/hour}}}}
    """)
    headers = [("Authorization", f"Bearer {mint_token(sub='alice')}")]
    assert (await get(gw, "/api/users/1", headers)).status == 200
    assert_envelope(await get(gw, "/api/users/1", headers), 429, "RATE_LIMITED")
    assert (gw.log[-1]["user_id"], gw.log[-1]["error"]) == ("alice", "RATE_LIMITED")
    assert gw.log[-1]["detail"]
    assert (await get(gw, "/api/users/1", [("Authorization", f"Bearer {mint_token(sub='bob')}")])).status == 200


@pytest_twisted.ensureDeferred
async def test_a_retry_is_counted_and_the_address_is_the_target_that_answered(reactor, echo, gateway):
    dead = free_port()
    gw = await gateway(f"""
    upstreams:
      users: {{targets: ["http://127.0.0.1:{dead}", "{echo.url}"], balance: round_robin, retries: 1}}
    routes:
      - {{prefix: /api/users, upstream: users}}
    """)
    statuses = [(await get(gw, f"/api/users/{i}")).status for i in range(2)]
    assert statuses == [200, 200]
    retried = [line for line in gw.log if line["retries"] == 1]
    assert len(retried) == 1, gw.log
    assert retried[0]["upstream_addr"] == f"127.0.0.1:{echo.port}"
    assert retried[0]["detail"].startswith("retried after: ")


@pytest_twisted.ensureDeferred
async def test_upstream_status_shows_what_the_upstream_said_when_the_gateway_answered_otherwise(reactor, echo):
    async with running_gateways(reactor) as runner:
        gw, port = await start_probed(runner, echo.url, Probe("head"))
        records: list[dict[str, Any]] = []
        gw.access_log.observer = lambda event: records.append(event["access"].as_dict())
        rs = parse_responses(await raw(port, pipelined("/api/users/boom", "/api/users/2")))
        assert [r.status for r in rs] == [500, 200]
        assert_envelope(rs[0], 500, "INTERNAL")
        assert [(x["status"], x["upstream_status"]) for x in records] == [(500, 200), (200, None)]
        runner.crashes.clear()          # the probe's bug, logged as it should be


def test_fields_are_unique() -> None:
    assert len(set(FIELDS)) == len(FIELDS)

