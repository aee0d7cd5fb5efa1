"""Active health checks of an https upstream speak TLS with the target's own settings (here
`tls: {ca: ...}`, a private CA), as the proxy does.

Before, the checks used treq's default policy (the system's trust store): every check of a
target the proxy reached fine failed with "certificate verify failed", the target was taken
out of rotation, and every request got 503.

The check interval runs on a Clock (each round is one `advance`); the TLS handshakes and the
requests are real, on the test reactor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.ssl import PrivateCertificate
from twisted.internet.task import Clock, deferLater

from tests.conftest import RecordingEcho, parse_responses, quiet_site, raw
from tests.test_tls_config import CertAuthority

WAIT = 10.0
ROUNDS = 4           # with unhealthy_threshold 2, two failed rounds would already take it down


async def until(reactor: Any, condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {WAIT}s waiting for {what}"
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture()
async def private_https_echo(reactor: Any, tmp_path: Path) -> Any:
    """(port, seen requests, CA file): an echo over TLS for "localhost", signed by a private CA."""
    ca = CertAuthority()
    issued = ca.issue(tmp_path, "localhost", "localhost", ("localhost",))
    with open(issued.cert, "rb") as c, open(issued.key, "rb") as k:
        identity = PrivateCertificate.loadPEM(c.read() + k.read())
    seen: list[Any] = []
    site = quiet_site(RecordingEcho("secure", seen))
    port = await SSL4ServerEndpoint(reactor, 0, identity.options(), interface="127.0.0.1").listen(site)
    yield port.getHost().port, seen, ca.write(tmp_path / "ca.pem")
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_an_https_target_behind_a_private_ca_passes_its_checks_and_serves(
        reactor, gateway, private_https_echo):
    port, seen, ca_file = private_https_echo
    clock = Clock()
    gw = await gateway(f"""
        upstreams:
          u:
            targets: ["https://localhost:{port}"]
            tls: {{ca: {ca_file}}}
            health_check: {{path: /healthz, interval: 5s, timeout: 2s, unhealthy_threshold: 2}}
        routes:
          - {{prefix: /api, upstream: u}}
        """, clock=clock)
    group = gw.gateway.proxy.groups["u"]
    checker, (member,) = group.health, group.balancer.members

    for n in range(1, ROUNDS + 1):          # the first round runs at start
        if n > 1:
            clock.advance(5)
        await until(reactor, lambda n=n: checker.passes[member] + checker.fails[member] == n,
                    f"round {n} of health checks")
        assert checker.passes[member] == n, member.last_error
        assert not member.down, member.last_error
    checks = [r for r in seen if r.path == b"/healthz"]
    assert len(checks) == ROUNDS
    assert checks[-1].getHeader("user-agent") == "txgateway-health"

    for i in range(3):
        (resp,) = parse_responses(await raw(gw.port, f"GET /api/{i} HTTP/1.1\r\nHost: api.test\r\n"
                                                       "Connection: close\r\n\r\n".encode(), read_timeout=WAIT))
        assert resp.status == 200, resp.body
        assert resp.json()["path"] == f"/api/{i}"
    assert not member.down and checker.fails[member] == 0
