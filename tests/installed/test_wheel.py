"""What users install, run as they run it: the wheel in its own venv, from a directory that is
not the checkout (`make test-wheel`; see tests/installed/__init__.py).

`twistd -n txgateway --config FILE` proxies to a real upstream, guards a JWT route with a token
from `txgateway token`, reloads on SIGHUP and exits 0 on SIGTERM; `txgateway check-config`
validates; `twistd txgateway --demo` answers; both commands say txgateway's version. Run by
pytest directly, the same tests drive this checkout's venv (the wheel test then skips).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import textwrap
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import txgateway
from tests.conftest import SECRET, free_port, parse_responses, raw_request
from tests.installed import PYTHON, TWISTD, TXGATEWAY, WHEEL
from tests.integration.test_lifecycle import START_TIMEOUT, STOP_TIMEOUT, Daemon, assert_clean_shutdown
from tests.integration.test_workers import alive, children
from tests.stdlib_upstream import QuietHandler, StdlibUpstream
from tests.test_compiled import compiled_modules

ROOT = Path(__file__).resolve().parents[2]
DEMO_PORTS = (8080, 3001, 3002, 3003)
DEMO_BUSY_WAIT = 30.0        # someone else's `make demo`, or another suite's demo test, holds them


def run(argv: list[Path | str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL, check=False)


# --- the install itself ----------------------------------------------------------------------

INSPECT = """\
import importlib, json, sys, sysconfig
names = json.loads(sys.argv[1])
print(json.dumps({"prefix": sys.prefix, "site": sysconfig.get_paths()["platlib"],
                  "files": {name: importlib.import_module(name).__file__ for name in names}}))
"""


@pytest.mark.skipif(WHEEL is None, reason="no wheel under test: `make test-wheel` builds and installs one")
def test_the_install_is_the_wheel_not_the_checkout(tmp_path):
    """txgateway, its twistd plugin and its hot path come from the wheel's venv, and the hot path
    is the wheel's own compiled extensions, byte for byte (its .py files if built TXGATEWAY_PURE=1)."""
    assert WHEEL is not None
    hot = compiled_modules()
    names = ["txgateway", "txgateway.service.tap", "twisted.plugins.txgateway_plugin", *hot]
    result = run([PYTHON, "-c", INSPECT, json.dumps(names)], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["prefix"]).resolve() == PYTHON.parent.parent.resolve()
    site = Path(found["site"])
    files = {name: Path(file) for name, file in found["files"].items()}
    for name, file in files.items():
        assert file.is_relative_to(site), f"{name} imported from {file}, not from {site}"
        assert not file.resolve().is_relative_to(ROOT), f"{name} imported from the checkout: {file}"
    with zipfile.ZipFile(WHEEL) as wheel:
        extensions = {member for member in wheel.namelist() if member.endswith(".so")}
        if os.environ.get("TXGATEWAY_PURE"):
            assert extensions == set()
            assert all(files[name].suffix == ".py" for name in hot), files
            return
        assert any(member.startswith("txgateway__mypyc.") for member in extensions), extensions
        for name in hot:
            member = files[name].relative_to(site).as_posix()
            assert member in extensions, f"{name} is not compiled: {files[name]}"
            assert sha256(files[name].read_bytes()) == sha256(wheel.read(member)), member


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_txgateway_version(tmp_path):
    result = run([TXGATEWAY, "--version"], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"txgateway {txgateway.__version__}\n", "")


def test_twistd_txgateway_version(tmp_path):
    result = run([TWISTD, "txgateway", "--version"], cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, f"txgateway {txgateway.__version__}\n", "")


# --- a gateway from a config file ------------------------------------------------------------

class Echo(QuietHandler):
    """Answers JSON: the path it was asked for and the identity the gateway vouched for."""

    def do_GET(self) -> None:
        self.answer(json.dumps({"path": self.path, "user": self.headers.get("X-User-Id")}).encode(),
                    "application/json")


def gateway_config(port: int, upstream: str, secret_file: Path, extra_route: str = "") -> str:
    return textwrap.dedent(f"""\
        listen:
          - endpoint: "tcp:{port}:interface=127.0.0.1"
        access_log: "-"
        drain_timeout: 2s
        auth:
          jwt:
            algorithms: [HS256]
            secret_file: "{secret_file}"
        upstreams:
          echo: {{targets: ["{upstream}"], connect_timeout: 1s, timeout: 5s}}
        routes:
          - {{prefix: /api/public, upstream: echo, rewrite_prefix: /public}}
          - {{prefix: /api/private, upstream: echo, rewrite_prefix: /private, auth: required}}
        """) + extra_route


class Gateway:
    """A config file in a temporary directory and `twistd -n txgateway --config` serving it there."""

    def __init__(self, tmp_path: Path, upstream: str, *options: str) -> None:
        self.port = free_port()
        self.upstream = upstream
        self.secret_file = tmp_path / "jwt_secret"
        self.secret_file.write_bytes(SECRET)
        self.config = tmp_path / "gateway.yaml"
        self.write()
        self.daemon = Daemon(tmp_path, self.config, options=options)

    def write(self, extra_route: str = "") -> None:
        self.config.write_text(gateway_config(self.port, self.upstream, self.secret_file, extra_route))

    def get(self, path: str, *headers: str) -> tuple[int, dict[str, object]]:
        head = "".join(f"{header}\r\n" for header in headers)
        data = raw_request(self.port, f"GET {path} HTTP/1.1\r\nHost: api.test\r\n{head}Connection: close\r\n\r\n"
                           .encode(), read_timeout=10)
        (resp,) = parse_responses(data)
        return resp.status, resp.json()


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    with StdlibUpstream(Echo) as upstream:
        gw = Gateway(tmp_path, upstream.url)
        try:
            gw.daemon.wait_for_port(gw.port)
            yield gw
        finally:
            gw.daemon.kill()


def test_check_config(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_config(free_port(), "http://127.0.0.1:9", tmp_path / "no-such-secret"))
    result = run([TXGATEWAY, "check-config", config], cwd=tmp_path)
    assert result.returncode == 1, result.stdout
    assert result.stderr.splitlines()[-1] == f"{config}: 1 error(s), configuration rejected"
    (tmp_path / "no-such-secret").write_bytes(SECRET)
    result = run([TXGATEWAY, "check-config", config], cwd=tmp_path)
    assert (result.returncode, result.stdout) == (0, f"{config}: OK (2 routes, 1 upstreams, 1 listeners)\n")


def test_twistd_proxies_a_request_to_a_real_upstream(gateway):
    assert gateway.get("/api/public/7?x=1") == (200, {"path": "/public/7?x=1", "user": None})
    status, body = gateway.get("/nowhere")
    assert status == 404 and body["error"]["code"] == "NO_ROUTE"


def test_a_jwt_route_takes_a_token_from_txgateway_token(gateway, tmp_path):
    status, body = gateway.get("/api/private/1")
    assert status == 401 and body["error"]["code"] == "UNAUTHORIZED", body
    minted = run([TXGATEWAY, "token", "--config", gateway.config, "--sub", "alice"], cwd=tmp_path)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert gateway.get("/api/private/1", f"Authorization: Bearer {token}") == (
        200, {"path": "/private/1", "user": "alice"})


def test_sighup_reloads_the_config(gateway):
    assert gateway.get("/api/public/1")[0] == 200     # serving: the SIGHUP handler is in place
    assert gateway.get("/api/added/1")[0] == 404
    gateway.write("  - {prefix: /api/added, upstream: echo, rewrite_prefix: /added}\n")
    gateway.daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + START_TIMEOUT
    while " applied: " not in gateway.daemon.output:
        assert time.monotonic() < deadline, gateway.daemon.output
        time.sleep(0.05)
    assert gateway.get("/api/added/1") == (200, {"path": "/added/1", "user": None})


def test_sigterm_drains_and_exits_0(gateway):
    assert gateway.get("/api/public/1")[0] == 200
    gateway.daemon.proc.send_signal(signal.SIGTERM)
    assert_clean_shutdown(gateway.daemon, gateway.daemon.wait(STOP_TIMEOUT))


def test_workers_run_the_installed_txgateway_not_one_in_the_working_directory(tmp_path):
    """A worker is a new interpreter: started with the working directory on its sys.path, it
    would import a `txgateway` found there (a checkout, say) instead of the parent's."""
    (tmp_path / "txgateway").mkdir()
    (tmp_path / "txgateway" / "__init__.py").write_text('raise ImportError("the txgateway in the working directory")\n')
    with StdlibUpstream(Echo) as upstream:
        gw = Gateway(tmp_path, upstream.url, "--workers", "2")
        try:
            gw.daemon.wait_for_port(gw.port)
            assert gw.get("/api/public/1") == (200, {"path": "/public/1", "user": None}), gw.daemon.output
            assert "died" not in gw.daemon.output, gw.daemon.output
            workers = children(gw.daemon.proc.pid)
        finally:
            gw.daemon.kill()
        # Killed with its parent (SIGKILL: no drain), even one still starting: no orphan serves on.
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [pid for pid in workers if alive(pid)], gw.daemon.output


# --- the demo --------------------------------------------------------------------------------

def start_demo(tmp_path: Path) -> Daemon:
    """`twistd -n txgateway --demo`, once its fixed ports are free (or skip: they are held)."""
    deadline = time.monotonic() + DEMO_BUSY_WAIT
    while True:
        daemon = Daemon(tmp_path, None, options=["--demo"])
        while "starting on 8080" not in daemon.output and daemon.proc.poll() is None:
            assert time.monotonic() < deadline + START_TIMEOUT, daemon.output
            time.sleep(0.05)
        if daemon.proc.poll() is None:
            return daemon
        output = daemon.output
        daemon.kill()
        assert "already in use" in output, output
        if time.monotonic() > deadline:
            pytest.skip(f"the demo's ports {DEMO_PORTS} stayed in use by another process for {DEMO_BUSY_WAIT:g}s")
        time.sleep(0.5)


def test_the_demo_answers(tmp_path):
    daemon = start_demo(tmp_path)
    try:
        data = raw_request(8080, b"GET /api/search?q=x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
                           read_timeout=10)
        (resp,) = parse_responses(data)
        assert resp.status == 200, resp.body
        assert (resp.json()["service"], resp.json()["path"], resp.json()["query"]) == ("search", "/search", "q=x")
        token = run([TXGATEWAY, "token", "--demo", "--sub", "alice"], cwd=tmp_path).stdout.strip()
        data = raw_request(8080, f"GET /api/users/7 HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n"
                                 "Connection: close\r\n\r\n".encode(), read_timeout=10)
        (resp,) = parse_responses(data)
        assert resp.status == 200, resp.body
        assert resp.json()["headers"]["X-User-Id"] == "alice"
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait(STOP_TIMEOUT) == 0, daemon.output
    finally:
        daemon.kill()
