"""`twistd -n txgateway --config FILE --workers 2`: a supervising parent and two real workers.

Which worker serves a client connection is read from the kernel, not from the gateway: the
ESTABLISHED sockets in /proc/net/tcp{,6} whose local port is the listen port are matched by
inode against the /proc/<pid>/fd links of the parent's children. The upstream is a stdlib
ThreadingHTTPServer (HTTP/1.1 keep-alive) in a daemon thread; clients are blocking
http.client connections, in threads where several must run at once. Every wait is bounded,
and every process started here (the parent and its workers) is killed by PID at the end.
"""

from __future__ import annotations

import contextlib
import glob
import http.client
import json
import os
import re
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.installed import TWISTD
from tests.integration.test_lifecycle import (
    START_TIMEOUT,
    STOP_TIMEOUT,
    Daemon,
    assert_clean_shutdown,
    assert_port_free,
    write_config,
)
from tests.stdlib_upstream import QuietHandler, StdlibUpstream

HOST = "127.0.0.1"
WAIT = 5.0                    # bound on any single client network wait
SLOW = 1.0                    # seconds the upstream takes for /users/slow
MAX_CONNS = 200               # bound on the connections opened to see both workers serve


# --- the upstream: stdlib, keep-alive, 200 at once (or after SLOW s for /users/slow) -------------

class _Ok(QuietHandler):
    slow_arrived: threading.Event

    def do_GET(self) -> None:
        if self.path.startswith("/users/slow"):
            self.slow_arrived.set()
            time.sleep(SLOW)
        self.answer(b"ok\n")


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024   # socketserver's 5 drops the SYNs of a burst of pooled connections (1 s retry: 504)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass        # a killed worker resets its pooled upstream connections: expected, not news


class Upstream:
    def __init__(self, url: str, slow_arrived: threading.Event) -> None:
        self.url = url
        self.slow_arrived = slow_arrived


@contextlib.contextmanager
def upstream() -> Iterator[Upstream]:
    arrived = threading.Event()
    handler = type("Handler", (_Ok,), {"slow_arrived": arrived})
    with StdlibUpstream(handler, _Server) as server:
        yield Upstream(server.url, arrived)


class TwoWorkers(NamedTuple):
    up: Upstream
    daemon: Supervised
    port: int
    config: Path


@contextlib.contextmanager
def two_workers(tmp_path: Path, extra: str = "") -> Iterator[TwoWorkers]:
    """An upstream, and `twistd ... --workers 2` proxying /api/users to it on a free port
    (write_config's config, then `extra`). The daemon is killed at the end regardless; nothing
    waits for it."""
    with upstream() as up:
        port = free_port()
        config = write_config(tmp_path, port, up.url, extra)
        daemon = Supervised(tmp_path, config, "--workers", "2")
        try:
            yield TwoWorkers(up, daemon, port, config)
        finally:
            daemon.kill()


# --- the daemon: test_lifecycle's Daemon with extra arguments, and its workers --------------------

class Supervised(Daemon):
    """`twistd -n --pidfile= txgateway --config FILE *extra`, output to twistd.out."""

    def __init__(self, tmp_path: Path, config: Path, *extra: str) -> None:
        super().__init__(tmp_path, config, options=extra)
        self.seen_workers: set[int] = set()

    def workers(self) -> list[int]:
        """PIDs of the parent's children (the workers), sorted."""
        pids = children(self.proc.pid)
        self.seen_workers.update(pids)
        return pids

    def wait_until(self, what: str, check: Callable[[], Any], timeout: float = START_TIMEOUT) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            if self.proc.poll() is not None:
                raise AssertionError(f"twistd exited with {self.proc.returncode} while waiting for {what}:\n"
                                     f"{self.output}")
            time.sleep(0.05)
        raise AssertionError(f"no {what} after {timeout}s:\n{self.output}")

    def wait_ready(self, port: int, count: int = 2, started: int = 2) -> list[int]:
        """Until `started` workers have adopted the listener (each logs "starting on PORT") and
        `count` children run; their PIDs."""
        self.wait_until(f"{started} workers listening",
                        lambda: self.output.count(f"starting on {port}") >= started)
        return self.wait_until(f"{count} workers", lambda: len(pids := self.workers()) == count and pids)

    def worker_index(self) -> dict[int, int]:
        """pid -> worker index, from the parent's "worker N started (pid P)" lines."""
        return {int(pid): int(index) for index, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.output)}

    def kill(self) -> None:
        """The parent first (so it restarts nothing), then every worker it ever had."""
        with contextlib.suppress(OSError):
            self.workers()
        super().kill()
        for pid in self.seen_workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    """Child PIDs of `pid`: /proc/PID/task/*/children, or a scan of /proc/*/stat for the ppid."""
    files = glob.glob(f"/proc/{pid}/task/*/children")
    if files:
        out: set[int] = set()
        for name in files:
            with contextlib.suppress(OSError), open(name) as f:
                out.update(int(x) for x in f.read().split())
        return sorted(out)
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError), open(stat) as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.split("/")[2]))
    return sorted(found)


def alive(pid: int) -> bool:
    """Running (a zombie or a vanished PID is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def established(port: int) -> dict[str, int]:
    """Socket inode -> remote (client) port of every ESTABLISHED TCP socket whose local port is `port`."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "01" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                    out[cols[9]] = int(cols[2].rsplit(":", 1)[1], 16)
    return out


def connections_by_process(port: int, pids: list[int]) -> dict[int, set[int]]:
    """pid -> the client ports of the connections to `port` that process holds (processes holding
    none are left out)."""
    inodes = established(port)
    out: dict[int, set[int]] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:[") and link[8:-1] in inodes:
                out.setdefault(pid, set()).add(inodes[link[8:-1]])
    return out


def get(conn: http.client.HTTPConnection, path: str = "/api/users/1") -> int:
    conn.request("GET", path, headers={"Host": "api.test"})
    response = conn.getresponse()
    response.read()
    return response.status


def get_slow(port: int) -> int:
    """GET /api/users/slow (the upstream answers after SLOW s) on a connection of its own -> status."""
    conn = connect(port)
    try:
        return get(conn, "/api/users/slow")
    finally:
        conn.close()


def connect(port: int) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(HOST, port, timeout=WAIT)
    conn.connect()
    return conn


def client_port(conn: http.client.HTTPConnection) -> int:
    assert conn.sock is not None
    return conn.sock.getsockname()[1]


def both_serve(port: int, workers: list[int], parent: int) -> tuple[dict[int, set[int]], list[int]]:
    """Open keep-alive connections (10 at once, each sending 3 requests, all kept open) until
    every worker holds at least one and there are at least 20, at most MAX_CONNS; then every
    connection sends one more request. (pid -> client ports held, statuses)."""
    conns: list[http.client.HTTPConnection] = []
    statuses: list[int] = []

    def open_one(_: int) -> tuple[http.client.HTTPConnection, list[int]]:
        conn = connect(port)
        return conn, [get(conn) for _ in range(3)]

    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            while len(conns) < MAX_CONNS:
                for conn, got in pool.map(open_one, range(10)):
                    conns.append(conn)
                    statuses += got
                held = connections_by_process(port, [*workers, parent])
                if len(conns) >= 20 and all(held.get(pid) for pid in workers):
                    break
            statuses += pool.map(get, conns)
            held = connections_by_process(port, [*workers, parent])
            # every open client connection is held by exactly one process, none by the parent
            assert sorted(p for ports in held.values() for p in ports) == sorted(client_port(c) for c in conns)
            return held, statuses
    finally:
        for conn in conns:
            conn.close()


# --- 1. both workers serve -----------------------------------------------------------------------

def test_both_workers_serve(tmp_path):
    with two_workers(tmp_path) as (_, daemon, port, _):
        workers = daemon.wait_ready(port)
        assert len(workers) == 2 and daemon.proc.pid not in workers
        held, statuses = both_serve(port, workers, daemon.proc.pid)
        assert statuses and set(statuses) == {200}, statuses
        assert set(held) == set(workers), (held, workers)      # two distinct worker PIDs, not the parent
        print(f"\n{len(statuses)} requests over {sum(map(len, held.values()))} connections: "
              + ", ".join(f"worker pid {pid} holds {len(ports)}" for pid, ports in sorted(held.items())))
        assert "Traceback" not in daemon.output and "died" not in daemon.output, daemon.output


# --- /metrics and /status count every worker ---------------------------------------------------

def scrape(admin: int) -> tuple[float, dict[str, Any]] | None:
    """(txgateway_requests_total summed over its series, /status) from worker 0's admin
    listener; None while nothing listens there (worker 0 restarting)."""
    try:
        conn = http.client.HTTPConnection(HOST, admin, timeout=WAIT)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.request("GET", "/status")
        status = json.loads(conn.getresponse().read())
        conn.close()
    except OSError:
        return None
    total = sum(sample.value for family in text_string_to_metric_families(text) if family.name == "txgateway_requests"
                for sample in family.samples if sample.name == "txgateway_requests_total")
    return total, status


def history(admin: int) -> int | None:
    """The requests the status page's charts (/status/history) counted, all samples summed."""
    try:
        conn = http.client.HTTPConnection(HOST, admin, timeout=WAIT)
        conn.request("GET", "/status/history")
        samples = json.loads(conn.getresponse().read())["samples"]
        conn.close()
    except OSError:
        return None
    return sum(sample["series"]["gateway"]["requests"] for sample in samples)


def test_metrics_and_status_count_the_requests_of_every_worker_and_survive_a_restart(tmp_path):
    admin = free_port()
    with two_workers(tmp_path, f'admin: {{endpoint: "tcp:{admin}:interface=127.0.0.1"}}\n') as (_, daemon, port, _):
        workers = daemon.wait_ready(port)
        _, first = both_serve(port, workers, daemon.proc.pid)   # both workers hold connections and serve

        def load(_: int) -> list[int]:
            conn = connect(port)
            try:
                return [get(conn) for _ in range(100)]
            finally:
                conn.close()

        with ThreadPoolExecutor(max_workers=10) as pool:
            statuses = [s for got in pool.map(load, range(10)) for s in got]
        assert statuses == [200] * 1000
        sent = len(first) + 1000
        total, status = daemon.wait_until("every request counted", lambda: (got := scrape(admin)) and got[0] == sent and got)
        assert status["requests"]["total"] == sent
        assert [w["worker"] for w in status["workers"]] == [0, 1]
        assert all(w["upstreams"]["users"]["targets"] for w in status["workers"])
        served = [sum(t["requests"] for t in w["upstreams"]["users"]["targets"]) for w in status["workers"]]
        assert sum(served) == sent and all(served), served     # the count came from both
        charted = daemon.wait_until("every request in the status page's charts", lambda: (
            got := history(admin)) is not None and got == sent and got)
        assert charted == sent

        index = {i: pid for pid, i in daemon.worker_index().items()}
        os.kill(index[0], signal.SIGKILL)                     # the worker with the admin listener
        daemon.wait_until("worker 0 restarted", lambda: daemon.output.count("worker 0 started") == 2)
        again = daemon.wait_until("the admin listener back", lambda: scrape(admin))
        assert again[0] == total                               # counted on from its last file, not from 0
        assert get(connect(port)) == 200
        daemon.wait_until("the next request counted", lambda: (got := scrape(admin)) and got[0] == total + 1)


# --- 2. SIGKILL one worker under load ----------------------------------------------------------

LOAD_SECONDS = 4.0
KILL_AT = 1.5
LOAD_CONNS = 8


class Client(threading.Thread):
    """Sequential requests on one keep-alive connection until `until`; on any error the request
    counts as failed and the connection is replaced."""

    def __init__(self, port: int, until: float) -> None:
        super().__init__(daemon=True)
        self.port, self.until = port, until
        self.ok = 0
        self.failures: list[str] = []
        self.ok_after: list[float] = []
        self.local_port: int | None = None

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while time.monotonic() < self.until:
            try:
                if conn is None:
                    conn = connect(self.port)
                    self.local_port = client_port(conn)
                status = get(conn)
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
                continue
            if status == 200:
                self.ok += 1
                self.ok_after.append(time.monotonic())
            else:
                self.failures.append(f"status {status}")
        if conn is not None:
            conn.close()


def test_killing_a_worker_loses_only_its_in_flight_requests_and_it_is_restarted(tmp_path):
    with two_workers(tmp_path) as (_, daemon, port, _):
        workers = daemon.wait_ready(port)
        start = time.monotonic()
        clients = [Client(port, start + LOAD_SECONDS) for _ in range(LOAD_CONNS)]
        for client in clients:
            client.start()
        time.sleep(KILL_AT)
        held = connections_by_process(port, workers)
        victim = max(workers, key=lambda pid: len(held.get(pid, ())))
        attached = [c for c in clients if c.local_port in held.get(victim, set())]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for client in clients:
            client.join(LOAD_SECONDS + 2 * WAIT)
        assert not any(c.is_alive() for c in clients)

        failures = sum(len(c.failures) for c in clients)
        ok = sum(c.ok for c in clients)
        print(f"\n{ok} ok, {failures} failed; {len(attached)} of {LOAD_CONNS} connections were on the "
              f"killed worker {victim}: " + "; ".join(f for c in clients for f in c.failures))
        assert attached, held
        assert failures <= len(attached), [c.failures for c in clients]
        for client in clients:                      # at most the one in flight, on the victim only
            assert len(client.failures) <= (1 if client in attached else 0), client.failures
            assert any(t > killed_at for t in client.ok_after), "a connection stopped being served"
        assert ok > 100

        # The parent restarts it: a new child within ~3 s, the log says why.
        index = daemon.worker_index()[victim]
        new = daemon.wait_until("restarted worker", lambda: set(daemon.workers()) - set(workers),
                                timeout=max(0.5, killed_at + 3.0 - time.monotonic()))
        assert re.search(rf"worker {index} died \(signal 9\); restarting in 1s", daemon.output), daemon.output
        assert daemon.worker_index()[next(iter(new))] == index
        # ... and it serves, next to the survivor.
        survivor = next(pid for pid in workers if pid != victim)
        workers = daemon.wait_ready(port, started=3)
        assert set(workers) == {survivor, *new}, (workers, survivor, new)
        held, statuses = both_serve(port, workers, daemon.proc.pid)
        assert set(statuses) == {200} and set(held) == set(workers), (held, workers)


# --- 3. SIGHUP is forwarded ---------------------------------------------------------------------

def test_sighup_to_the_parent_reloads_every_worker(tmp_path):
    with two_workers(tmp_path) as (_, daemon, port, config):
        workers = daemon.wait_ready(port)
        config.write_text(config.read_text()
                          + "  - {prefix: /api/added, upstream: users, rewrite_prefix: /users}\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_until("2 reloads", lambda: len(re.findall(r"reload: .* applied", daemon.output)) >= 2,
                          timeout=10)
        time.sleep(0.3)
        assert len(re.findall(r"reload: .* applied", daemon.output)) == 2, daemon.output   # one per worker
        # the new route answers on whichever worker takes the connection
        for _ in range(20):
            conn = connect(port)
            try:
                assert get(conn, "/api/added/1") == 200
            finally:
                conn.close()
        assert daemon.workers() == workers and daemon.proc.poll() is None   # nobody died of SIGHUP
        assert "died" not in daemon.output and "Traceback" not in daemon.output, daemon.output


# --- 4. SIGTERM drains ----------------------------------------------------------------------------

def test_sigterm_drains_the_workers_and_everything_exits_0(tmp_path):
    with two_workers(tmp_path) as (up, daemon, port, _):
        workers = daemon.wait_ready(port)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(get_slow, port)
            assert up.slow_arrived.wait(WAIT), daemon.output
            sent_at = time.monotonic()
            daemon.proc.send_signal(signal.SIGTERM)
            assert pending.result(timeout=WAIT + SLOW) == 200     # the in-flight request finished
        code = daemon.wait(STOP_TIMEOUT)
        assert time.monotonic() - sent_at >= SLOW * 0.8
        assert_clean_shutdown(daemon, code)
        out = daemon.output
        index = daemon.worker_index()
        for pid in workers:
            assert f"worker {index[pid]} stopped (exit 0)" in out, out
            assert not alive(pid), pid
        assert out.count("SIGTERM: draining") == 3, out    # the parent and both workers
        assert out.count("Server Shut Down.") == 3, out
        assert "died" not in out, out
        assert_port_free(port)


# --- 5. refusals --------------------------------------------------------------------------------

def run_twistd(tmp_path: Path, config: Path, *extra: str) -> tuple[int, str]:
    result = subprocess.run([str(TWISTD), "-n", "--pidfile=", "txgateway", "--config", str(config), *extra],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            check=False)
    return result.returncode, result.stdout + result.stderr


def run_workers_on_a_unix_listener(tmp_path: Path) -> tuple[int, str, Path]:
    """`twistd ... --workers 2` with a config listening on unix:SOCK -> (exit code, output, SOCK)."""
    sock = tmp_path / "gw.sock"
    config = tmp_path / "gateway.yaml"
    config.write_text(textwrap.dedent(f"""\
        listen:
          - endpoint: "unix:{sock}"
        access_log: "off"
        upstreams:
          users: {{targets: ["http://127.0.0.1:9"]}}
        routes:
          - {{prefix: /api/users, upstream: users}}
        """))
    code, out = run_twistd(tmp_path, config, "--workers", "2")
    return code, out, sock


def test_workers_with_a_non_tcp_listener_fails_to_start(tmp_path):
    code, out, sock = run_workers_on_a_unix_listener(tmp_path)
    assert code != 0, out
    assert "--workers shares tcp: and tcp6: listeners only" in out and f"'unix:{sock}'" in out, out
    assert "worker 0 started" not in out and "starting on" not in out, out
    assert not sock.exists()


@pytest.mark.parametrize("value", ["0", "abc", "65", "-1", "2.5"])
def test_workers_option_refuses_what_is_not_a_count(tmp_path, value):
    port = free_port()
    config = write_config(tmp_path, port, "http://127.0.0.1:9")
    code, out = run_twistd(tmp_path, config, "--workers", value)
    assert code != 0, out
    assert f"--workers expects a number from 1 to 64, got '{value}'" in out, out
    assert "Traceback" not in out and "starting up" not in out, out   # a usage error, before binding
    assert_port_free(port)
    assert not (tmp_path / "access.log").exists()


def test_workers_option_refuses_the_demo(tmp_path):
    result = subprocess.run([str(TWISTD), "-n", "--pidfile=", "txgateway", "--demo", "--workers", "2"],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            check=False)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out
    assert "--workers runs a --config; the demo is one process" in out, out
    assert "starting up" not in out, out
