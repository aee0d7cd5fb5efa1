"""Operating the real daemon as systemd does: SIGTERM drain, socket activation, the unit files.

Every test drives a real `twistd -n --pidfile= txgateway --config FILE` subprocess (or the
real `systemd-analyze`). The upstreams are stdlib `ThreadingHTTPServer`s in threads and the
clients are blocking sockets, so nothing here depends on the test reactor; every wait has a
deadline.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import free_port, parse_responses, raw_request
from tests.installed import TWISTD
from tests.integration.test_lifecycle import STOP_TIMEOUT, Daemon, assert_clean_shutdown
from tests.stdlib_upstream import QuietHandler, StdlibUpstream
from txgateway.config.units import parse_duration

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SHIPPED_TWISTD = "/opt/txgateway/.venv/bin/twistd"
SLOW_BODY = b"slow and steady"


# --- a stdlib upstream ---------------------------------------------------------------

class Upstream(StdlibUpstream):
    """A threaded HTTP/1.1 upstream on 127.0.0.1 answering after `delay` seconds with JSON
    about the request (or SLOW_BODY when delayed). `arrived` is set by each request."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.arrived = threading.Event()
        self.answered: list[float] = []
        upstream = self

        class Handler(QuietHandler):
            timeout = 15                          # an idle pooled connection ends, bounded

            def do_GET(self) -> None:
                upstream.arrived.set()
                if upstream.delay:
                    time.sleep(upstream.delay)
                    body = SLOW_BODY
                else:
                    body = json.dumps({"service": "stdlib", "path": self.path}).encode()
                try:
                    self.answer(body, "application/json" if not upstream.delay else "text/plain")
                    upstream.answered.append(time.monotonic())
                except OSError:                   # the gateway cut the request (drain timeout)
                    self.close_connection = True

        super().__init__(Handler)


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    started: list[Upstream] = []
    yield started
    for upstream in started:
        upstream.close()


def write_config(tmp_path: Path, listen: str, upstream_url: str, extra: str = "", tls: str = "") -> Path:
    """`tls`: the listener's `tls:` mapping (flow style), if it has one."""
    path = tmp_path / "gateway.yaml"
    tls_line = f"\n            tls: {tls}" if tls else ""
    path.write_text(textwrap.dedent(f"""\
        listen:
          - endpoint: "{listen}"{tls_line}
        access_log: "{tmp_path / 'access.log'}"
        upstreams:
          users: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 10s}}
        routes:
          - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
        """) + textwrap.dedent(extra))
    return path


def get(path: str, host: str = "api.test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


def readyz(admin_port: int) -> tuple[int, dict[str, object]]:
    (resp,) = parse_responses(raw_request(admin_port, get("/readyz", "127.0.0.1"), read_timeout=5))
    return resp.status, resp.json()


def refused(port: int) -> bool:
    """True if a connection to `port` is refused (or reset before it is usable)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def wait_until(predicate, timeout: float, what: str, interval: float = 0.01) -> float:
    """Poll `predicate` until true; return when (monotonic) it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"not within {timeout}s: {what}")


def access_records(tmp_path: Path) -> list[dict[str, object]]:
    path = tmp_path / "access.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# --- SIGTERM drain ---------------------------------------------------------------------

def test_sigterm_drains_in_flight_refuses_new_connections_and_readyz_turns_503(tmp_path, upstreams):
    slow = Upstream(delay=1.5)
    upstreams.append(slow)
    port, admin_port = free_port(), free_port()
    config = write_config(tmp_path, f"tcp:{port}:interface=127.0.0.1", slow.url, f"""\
        drain_timeout: 10s
        admin: {{endpoint: "tcp:{admin_port}:interface=127.0.0.1"}}
        """)
    daemon = Daemon(tmp_path, config)
    try:
        daemon.wait_for_port(port)
        daemon.wait_for_port(admin_port)
        assert readyz(admin_port)[0] == 200

        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(raw_request, port, get("/api/users/slow"), read_timeout=15)
            assert slow.arrived.wait(10), daemon.output   # the upstream holds the request now
            daemon.proc.send_signal(signal.SIGTERM)
            sigterm = time.monotonic()

            # Draining: /readyz (the admin listener stays up) says 503 and why ...
            not_ready: list[dict[str, object]] = []

            def draining() -> bool:
                status, body = readyz(admin_port)
                if status == 503:
                    not_ready.append(body)
                return status == 503
            wait_until(draining, 3, "/readyz 503 after SIGTERM")
            assert not_ready[0]["ready"] is False
            assert not_ready[0]["checks"]["draining"] == "yes"  # type: ignore[index]
            # ... and the public listener is closed: new connections are refused ...
            refused_at = wait_until(lambda: refused(port), 3, f"connections to {port} refused after SIGTERM")
            assert refused(port)
            # ... both while the slow request is still in flight.
            assert not pending.done() and not slow.answered, "the drain must be observed before the slow answer"
            assert refused_at - sigterm < 1.0

            (resp,) = parse_responses(pending.result(timeout=15))
        assert resp.status == 200 and resp.body == SLOW_BODY
        # The handler thread records its answer after sending it: the response can arrive first.
        wait_until(lambda: bool(slow.answered), 3, "the upstream to record its answer")
        assert slow.answered[0] - sigterm >= 1.0  # it really waited for the upstream

        code = daemon.wait(STOP_TIMEOUT)
        assert_clean_shutdown(daemon, code)
        assert refused(port) and refused(admin_port)
        records = access_records(tmp_path)
        assert [(r["path"], r["status"]) for r in records] == [("/api/users/slow", 200)]
    finally:
        daemon.kill()


@dataclass
class CutAtDrainTimeout:
    daemon: Daemon
    hanging: Upstream       # the upstream, answering after 3 s
    port: int
    code: int               # the daemon's exit status
    stopped: float          # seconds from SIGTERM to the exit
    cut: bytes              # what the client got (raw_request: b"<RESET>" for a reset)


@contextlib.contextmanager
def request_cut_at_drain_timeout(tmp_path: Path, upstreams: list[Upstream]) -> Iterator[CutAtDrainTimeout]:
    """A daemon with drain_timeout 1s gets SIGTERM while its one request waits for a 3 s
    upstream; yields what happened once it exited. The daemon is killed at the end regardless."""
    hanging = Upstream(delay=3.0)
    upstreams.append(hanging)
    port = free_port()
    config = write_config(tmp_path, f"tcp:{port}:interface=127.0.0.1", hanging.url, "drain_timeout: 1s\n")
    daemon = Daemon(tmp_path, config)
    try:
        daemon.wait_for_port(port)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(raw_request, port, get("/api/users/hang"), read_timeout=15)
            assert hanging.arrived.wait(10), daemon.output
            daemon.proc.send_signal(signal.SIGTERM)
            sigterm = time.monotonic()
            code = daemon.wait(STOP_TIMEOUT)
            stopped = time.monotonic() - sigterm
            cut = pending.result(timeout=5)
        yield CutAtDrainTimeout(daemon, hanging, port, code, stopped, cut)
    finally:
        daemon.kill()


def test_a_request_still_running_at_drain_timeout_is_cut_and_the_exit_is_0(tmp_path, upstreams):
    with request_cut_at_drain_timeout(tmp_path, upstreams) as run:
        assert_clean_shutdown(run.daemon, run.code)
        # It waited drain_timeout (1s), then gave up well before the upstream's 3 s answer.
        assert 0.9 <= run.stopped < 2.5, run.stopped
        assert not run.hanging.answered
        # The client got no response at all: its connection was closed (or reset).
        assert run.cut in (b"", b"<RESET>"), run.cut
        assert refused(run.port)


# --- socket activation -----------------------------------------------------------------

# What systemd does between fork and exec: the listening socket becomes fd 3 (SD_LISTEN_FDS_START),
# LISTEN_PID is the PID that is about to exec twistd (exec keeps it), LISTEN_FDNAMES carries
# the socket unit's FileDescriptorName=.
LAUNCHER = textwrap.dedent("""\
    import os, sys
    fd, names, argv = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if fd != 3:
        os.dup2(fd, 3)            # inheritable by default
        os.close(fd)
    os.environ["LISTEN_FDS"] = "1"
    os.environ["LISTEN_PID"] = str(os.getpid())
    if names:
        os.environ["LISTEN_FDNAMES"] = names
    os.execv(argv[0], argv)
    """)


class ActivatedDaemon(Daemon):
    """twistd started like systemd starts a socket-activated service: it inherits a bound,
    listening socket as fd 3 and never binds the port itself."""

    def __init__(self, tmp_path: Path, config: Path, listening: socket.socket, names: str = "http") -> None:
        self.output_path = tmp_path / "twistd.out"
        self._out = open(self.output_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
        argv = [str(TWISTD), "-n", "--pidfile=", "txgateway", "--config", str(config)]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER, str(listening.fileno()), names, *argv],
            pass_fds=(listening.fileno(),), env=env,
            stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=tmp_path)


def socket_unit_endpoint() -> str:
    """The listen endpoint that txgateway.socket tells users to put in their config."""
    found = re.findall(r'endpoint: "(systemd:[^"]+)"', (UNITS / "txgateway.socket").read_text())
    assert found, "txgateway.socket documents the systemd: endpoint to use"
    return found[0]


def listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def test_socket_activation_serves_on_the_inherited_socket_by_name(tmp_path, upstreams):
    echo = Upstream()
    upstreams.append(echo)
    endpoint = socket_unit_endpoint()
    assert endpoint == "systemd:domain=INET:name=http"
    config = write_config(tmp_path, endpoint, echo.url)
    sock = listening_socket()
    port = sock.getsockname()[1]
    try:
        daemon = ActivatedDaemon(tmp_path, config, sock)
    finally:
        sock.close()                  # only twistd holds the socket now
    try:
        # Sent at once, before twistd has even imported Twisted: the connection waits in the
        # inherited socket's accept queue, as it would behind systemd.
        (resp,) = parse_responses(raw_request(port, get("/api/users/7?x=1"), read_timeout=20))
        assert resp.status == 200, (resp.body, daemon.output)
        assert resp.json() == {"service": "stdlib", "path": "/users/7?x=1"}
        assert daemon.proc.poll() is None
        assert f"starting on {port}" in daemon.output    # Twisted adopted fd 3; nothing bound anew

        daemon.proc.send_signal(signal.SIGTERM)
        code = daemon.wait(STOP_TIMEOUT)
        assert_clean_shutdown(daemon, code)
        assert refused(port)          # it closed the adopted socket on the way out
        assert [r["status"] for r in access_records(tmp_path)] == [200]
    finally:
        daemon.kill()


# --- the unit files --------------------------------------------------------------------

def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze is missing: `make system-deps` installs Debian's systemd package"
    return path


def directives(unit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def verify(*units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([systemd_analyze(), "verify", "--man=no", *map(str, units)],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)


def test_systemd_analyze_verify_passes_on_both_units(tmp_path):
    """`systemd-analyze verify` checks syntax, unknown keys and sections, the socket's
    Service= and that ExecStart/ExecReload name executable files. It does not check that
    User= exists (so the absent txgateway user is no problem). It exits 0 even for unknown
    or misspelt keys, so "passes" here means: no output at all.

    The units are meant for /opt/txgateway/.venv, which does not exist on a test machine,
    so two runs:
    1. the shipped files, byte for byte: the only complaint allowed is that
       /opt/txgateway/.venv/bin/twistd is not executable (none once it is installed);
    2. a temp copy differing only in that path, pointed at this checkout's twistd: verify
       must print nothing and exit 0.
    `--man=no` because Documentation= lookups are not what is being tested.
    """
    service, sock = UNITS / "txgateway.service", UNITS / "txgateway.socket"
    shipped = verify(sock, service)
    complaints = [line for line in (shipped.stdout + shipped.stderr).splitlines() if line.strip()]
    missing = f"txgateway.service: Command {SHIPPED_TWISTD} is not executable: No such file or directory"
    if os.access(SHIPPED_TWISTD, os.X_OK):
        assert shipped.returncode == 0 and complaints == [], complaints
    else:
        assert complaints == [missing], complaints

    copy = tmp_path / "units"
    copy.mkdir()
    text = service.read_text()
    assert text.count(SHIPPED_TWISTD) == 1
    (copy / "txgateway.service").write_text(text.replace(SHIPPED_TWISTD, str(TWISTD)))
    shutil.copy(sock, copy / "txgateway.socket")
    local = verify(copy / "txgateway.socket", copy / "txgateway.service")
    assert (local.returncode, local.stdout, local.stderr) == (0, "", "")

    # Sandboxing as `systemd-analyze security` scores it (0 best, 10 worst; "OK" is < 4.5).
    security = subprocess.run(
        [systemd_analyze(), "security", "--offline=yes", "--no-pager", str(copy / "txgateway.service")],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False)
    score = re.search(r"Overall exposure level for txgateway\.service: ([0-9.]+)", security.stdout)
    assert score, security.stdout + security.stderr
    assert float(score.group(1)) <= 4.0, security.stdout


def test_units_say_what_the_gateway_needs():
    s = directives(UNITS / "txgateway.service")
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]   # READY=1 once listening
    (exec_start,) = s["ExecStart"]
    assert exec_start.split() == [SHIPPED_TWISTD, "-n", "--pidfile=", "txgateway",
                                  "--config", "/etc/txgateway/txgateway.yaml"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["User"] == ["txgateway"] and s["Group"] == ["txgateway"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes", "NoNewPrivileges": "yes",
                       "PrivateTmp": "yes", "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
                       "AmbientCapabilities": "CAP_NET_BIND_SERVICE", "StateDirectory": "txgateway",
                       "ConfigurationDirectory": "txgateway", "Restart": "on-failure"}.items():
        assert s[key] == [value], key
    # systemd must not SIGKILL a gateway that is still draining: the stop timeout leaves
    # room above the example config's drain_timeout.
    example = re.findall(r"^drain_timeout: (\S+)", (REPO / "etc" / "txgateway.yaml").read_text(), re.M)
    drain_timeout = max([parse_duration(value) for value in example] + [10.0])   # 10s: the default
    assert parse_duration(s["TimeoutStopSec"][0]) >= 2 * drain_timeout

    k = directives(UNITS / "txgateway.socket")
    assert k["FileDescriptorName"] == ["http"] and k["Service"] == ["txgateway.service"]
    assert k["ListenStream"] == ["0.0.0.0:80"]      # IPv4, hence domain=INET in the endpoint
    assert socket_unit_endpoint() == "systemd:domain=INET:name=http"
