"""The real daemon: `twistd -n txgateway --config FILE` as systemd runs it.

Start, serve a request through to a real upstream, drain and stop on SIGTERM; refuse to start
(without binding anything) on an invalid config. Every wait is bounded; blocking socket and
process waits run in threads so the test reactor keeps serving the upstream meanwhile.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.conftest import free_port, listen, parse_responses, quiet_site, raw, raw_request
from tests.installed import TWISTD

START_TIMEOUT = 20.0
STOP_TIMEOUT = 20.0


def write_config(tmp_path: Path, port: int, upstream_url: str, extra: str = "") -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(textwrap.dedent(f"""\
        listen:
          - endpoint: "tcp:{port}:interface=127.0.0.1"
        access_log: "{tmp_path / 'access.log'}"
        drain_timeout: 5s
        upstreams:
          users: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 5s}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
        """) + extra)
    return path


class Daemon:
    """One `twistd -n --pidfile= txgateway --config … [options]` subprocess (without --config when
    `config` is None), run in `tmp_path` with its output to a file there."""

    def __init__(self, tmp_path: Path, config: Path | None, env: dict[str, str] | None = None,
                 options: Sequence[str] = ()) -> None:
        self.output_path = tmp_path / "twistd.out"
        self._out = open(self.output_path, "wb")
        self.proc = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "txgateway", *(["--config", str(config)] if config else []), *options],
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path,
            env={**os.environ, **env} if env else None)

    @property
    def output(self) -> str:
        self._out.flush()
        return self.output_path.read_text(errors="replace")

    def wait_for_port(self, port: int, timeout: float = START_TIMEOUT) -> None:
        """Block until `port` accepts connections; fail if the daemon exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited with {self.proc.returncode} before listening:\n{self.output}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"port {port} not accepting after {timeout}s:\n{self.output}")

    def wait(self, timeout: float = STOP_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Always called in `finally`: never leave the daemon behind."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._out.close()


def assert_port_free(port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine, a listener is not
    try:
        s.bind(("127.0.0.1", port))
        s.listen(1)
    finally:
        s.close()


def assert_clean_shutdown(daemon: Daemon, code: int) -> None:
    # SIGTERM drains, shuts the services down and exits 0 (not twistd's re-raised -15).
    out = daemon.output
    assert code == 0, (code, out)
    assert "SIGTERM: draining" in out
    assert "Main loop terminated." in out and "Server Shut Down." in out
    assert "Traceback" not in out and "Unhandled" not in out, out


def get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_serves_through_a_real_upstream_and_stops_on_sigterm(reactor, echo, tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, echo.url)
    daemon = Daemon(tmp_path, config)
    try:
        await deferToThread(daemon.wait_for_port, port)
        assert f"starting on {port}" in daemon.output

        (resp,) = parse_responses(await raw(port, get(b"/api/users/7?x=1"), read_timeout=10))
        assert resp.status == 200, resp.body
        body = resp.json()
        assert body["service"] == "echo"
        assert (body["method"], body["path"], body["query"]) == ("GET", "/users/7", "x=1")
        assert body["headers"]["X-Forwarded-For"] == "127.0.0.1"
        assert body["headers"]["X-Forwarded-Host"] == "api.test"
        assert len(echo.requests) == 1

        (resp,) = parse_responses(await raw(port, get(b"/nowhere"), read_timeout=10))
        assert resp.status == 404 and resp.json()["error"]["code"] == "NO_ROUTE"

        daemon.proc.send_signal(signal.SIGTERM)
        code = await deferToThread(daemon.wait)
        assert_clean_shutdown(daemon, code)
        assert_port_free(port)

        # The access log was flushed on the way out: one JSON record per request.
        records = [json.loads(line) for line in (tmp_path / "access.log").read_text().splitlines()]
        assert [(r["path"], r["status"], r["route"]) for r in records] == [
            ("/api/users/7", 200, "/api/users"), ("/nowhere", 404, None)]
    finally:
        daemon.kill()


class SlowResource(Resource):
    """Answers after `delay` seconds; records each arrival."""

    isLeaf = True

    def __init__(self, reactor: Any, delay: float, arrived: list[float]) -> None:
        super().__init__()
        self.reactor = reactor
        self.delay = delay
        self.arrived = arrived

    def render_GET(self, request: Any) -> Any:
        self.arrived.append(time.monotonic())

        def finish() -> None:
            if not request._disconnected:
                request.setHeader(b"Content-Type", b"text/plain")
                request.write(b"slow and steady")
                request.finish()

        self.reactor.callLater(self.delay, finish)
        return NOT_DONE_YET


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_the_request_in_flight(reactor, tmp_path):
    arrived: list[float] = []
    site = quiet_site(SlowResource(reactor, 1.0, arrived))
    upstream = await listen(reactor, site)
    port = free_port()
    config = write_config(tmp_path, port, f"http://127.0.0.1:{upstream.getHost().port}")
    daemon = Daemon(tmp_path, config)
    try:
        await deferToThread(daemon.wait_for_port, port)
        pending = deferToThread(raw_request, port, get(b"/api/users/slow"), read_timeout=10)
        for _ in range(200):                        # until the upstream holds the request
            if arrived:
                break
            await deferLater(reactor, 0.025, lambda: None)
        assert arrived, daemon.output
        daemon.proc.send_signal(signal.SIGTERM)

        (resp,) = parse_responses(await pending)
        assert resp.status == 200 and resp.body == b"slow and steady"
        code = await deferToThread(daemon.wait)
        assert_clean_shutdown(daemon, code)
        assert time.monotonic() - arrived[0] >= 0.9  # it waited for the upstream's answer
        assert_port_free(port)
    finally:
        daemon.kill()
        await upstream.stopListening()


def run_twistd(tmp_path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TWISTD), "-n", "--pidfile=", "txgateway", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)


def test_invalid_config_exits_without_binding(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, "http://127.0.0.1:9", extra=textwrap.dedent("""\
          - {prefix: /api/orders, upstream: orders}
        limits: {header_timeout: soon}
        """))
    result = run_twistd(tmp_path, config)
    # As check-config says it: no usage text (the command line was right), no start-up.
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        f'{config}:9: routes[1].upstream: no upstream named "orders" (defined: users)',
        f'{config}:10: limits.header_timeout: expected a duration like "250ms", "5s" or "1m", got "soon"',
        f"{config}: 2 error(s), configuration rejected",
    ]
    assert_port_free(port)
    assert not (tmp_path / "access.log").exists()


def test_config_that_is_not_yaml_exits_without_binding(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("listen: [\n")
    result = run_twistd(tmp_path, config)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{config}:2: invalid YAML: expected the node content, but found '<stream end>'",
                                          f"{config}: 1 error(s), configuration rejected"]


def test_missing_config_file(tmp_path):
    result = run_twistd(tmp_path, tmp_path / "nope.yaml")
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"{tmp_path / 'nope.yaml'}: cannot read config: No such file or directory",
                                          f"{tmp_path / 'nope.yaml'}: 1 error(s), configuration rejected"]
