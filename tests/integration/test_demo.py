"""`twistd -n txgateway --demo`, as a newcomer runs it: the banner it prints, the gateway and
the admin listener it names. TXGATEWAY_DEMO_PORTS moves every port to a free one, so this runs
next to anyone's `make demo` on 8080/8081."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from tests.conftest import free_port, parse_responses, raw_request
from tests.integration.test_drain_and_systemd import wait_until
from tests.integration.test_lifecycle import START_TIMEOUT, TWISTD, Daemon
from txgateway.service.demo import DemoPorts, demo_config

NAMES = ("gateway", "admin", "users", "search", "orders")


class Demo(Daemon):
    """`twistd -n --pidfile= txgateway --demo` with TXGATEWAY_DEMO_PORTS=`ports`."""

    def __init__(self, tmp_path: Path, ports: dict[str, int]) -> None:
        self.output_path = tmp_path / "twistd.out"
        self._out = open(self.output_path, "wb")
        env = {"TXGATEWAY_DEMO_PORTS": ",".join(f"{name}={port}" for name, port in ports.items())}
        self.proc = subprocess.Popen([str(TWISTD), "-n", "--pidfile=", "txgateway", "--demo"], stdout=self._out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
                                     env={**os.environ, **env})


def get(port: int, path: str, headers: str = "") -> tuple[int, dict[str, str], bytes]:
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}Connection: close\r\n\r\n".encode()
    (r,) = parse_responses(raw_request(port, request, read_timeout=5))
    return r.status, {k.lower(): v for k, v in r.headers}, r.body


def test_the_demo_prints_its_banner_and_serves_the_admin_listener_it_names(tmp_path):
    ports = {name: free_port() for name in NAMES}
    g, a = ports["gateway"], ports["admin"]
    demo = Demo(tmp_path, ports)
    try:
        demo.wait_for_port(g)
        demo.wait_for_port(a)
        wait_until(lambda: "Status page:" in demo.output, START_TIMEOUT, "the banner")
        # As printed: twistd's prefix on the first line, a tab before each line that follows.
        assert f"""[txgateway.service.demo#info] txgateway demo on http://127.0.0.1:{g} - try:
\t  curl -s 'localhost:{g}/api/search?q=x'                  # public
\t  curl -si localhost:{g}/api/users/7                       # 401: auth required
\t  TOKEN=$(.venv/bin/txgateway token --demo --sub alice --role admin --tier pro)
\t  curl -s localhost:{g}/api/users/7 -H "Authorization: Bearer $TOKEN"
\t  curl -si localhost:{g}/api/orders/1 -H "Authorization: Bearer $TOKEN" -H 'Cookie: dropped=1'
\t  curl -si localhost:{g}/api/orders/1 -H "Authorization: Bearer $(.venv/bin/txgateway token --demo --sub bob)"  # 403
\t  curl -s localhost:{g}/api/profile/7 -H "Authorization: Bearer $TOKEN"   # users and orders, one JSON answer
\t  curl -si localhost:{g}/nowhere
\t  for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}} ' 'localhost:{g}/api/search?fail=1'; done
\t  curl -si 'localhost:{g}/api/search?q=x'                 # 503: the breaker is open for 10s
\tStatus page: http://127.0.0.1:{a}/ (also /status, /metrics, /healthz, /readyz)
""" in demo.output, demo.output
        assert "Unable to format" not in demo.output, demo.output

        status, _, body = get(g, "/api/search?q=x")
        assert status == 200 and json.loads(body)["service"] == "search"
        status, _, _ = get(g, "/api/profile/7")
        assert status == 401                 # the users upstream's data: as protected as /api/users
        token = subprocess.run([str(TWISTD.parent / "txgateway"), "token", "--demo", "--sub", "alice"],
                               capture_output=True, text=True, check=True).stdout.strip()   # as the banner says
        status, headers, body = get(g, "/api/profile/7", f"Authorization: Bearer {token}\r\n")
        profile = json.loads(body)
        assert status == 200 and headers["x-gateway-completed"] == "true", (status, body)
        assert (profile["user"]["path"], profile["orders"]["path"], profile["orders"]["query"]) == (
            "/users/7", "/orders", "user=7")
        status, headers, body = get(a, "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain"), headers
        assert 'txgateway_requests_total{method="GET",route="/api/search",status="200"} 1.0' in body.decode()
        status, headers, body = get(a, "/status")
        assert status == 200 and json.loads(body)["listeners"] == [f"tcp:{g}:interface=127.0.0.1"]
        status, headers, _ = get(a, "/")
        assert status == 200 and headers["content-type"].startswith("text/html"), headers
    finally:
        demo.kill()


def test_ports_that_do_not_parse_stop_the_demo_in_one_line(tmp_path):
    result = subprocess.run([str(TWISTD), "-n", "--pidfile=", "txgateway", "--demo"], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False,
                            env={**os.environ, "TXGATEWAY_DEMO_PORTS": "gateway=18080,proxy=1"})
    assert result.returncode != 0
    assert result.stdout + result.stderr == (
        "txgateway: TXGATEWAY_DEMO_PORTS: expected NAME=PORT[,NAME=PORT...] with NAME one of gateway, admin, "
        "users, search, orders and PORT from 1 to 65535, got 'proxy=1'\n")


def test_without_the_variable_the_demo_keeps_its_usual_ports():
    assert DemoPorts.from_environ({}) == DemoPorts(gateway=8080, admin=8081, users=3001, search=3002, orders=3003)
    assert DemoPorts.from_environ({"TXGATEWAY_DEMO_PORTS": "admin=9000"}) == DemoPorts(admin=9000)
    config = demo_config()
    assert [listener.endpoint for listener in config.listen] == ["tcp:8080:interface=127.0.0.1"]
    assert config.admin is not None and config.admin.endpoint == "tcp:8081:interface=127.0.0.1"
    assert {name: tuple(t.url for t in u.targets) for name, u in config.upstreams.items()} == {
        "users": ("http://127.0.0.1:3001",), "search": ("http://127.0.0.1:3002",), "orders": ("http://127.0.0.1:3003",)}
