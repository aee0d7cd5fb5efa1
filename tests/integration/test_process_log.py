"""Logs an operator can keep: the daemon's log and its access log, as real `twistd` processes
write them.

Daemonised twistd (its --logfile and --pidfile in the test's directory), `twistd -n` with its
stdout in a file (standing in for the journal by naming that file in JOURNAL_STREAM, as systemd
does), a `--workers` parent and its workers; files renamed as logrotate renames them and real
signals. The upstream is a stdlib server in a thread; every wait is bounded and every process
started here is killed at the end.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import fail
from twisted.internet.task import deferLater
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import assert_envelope, free_port, parse_responses, raw, with_defaults
from tests.integration.test_drain_and_systemd import wait_until
from tests.integration.test_hybrid_processes import upstream
from tests.integration.test_lifecycle import TWISTD, Daemon, assert_clean_shutdown, assert_port_free, write_config
from tests.integration.test_workers import two_workers
from txgateway.config.schema import parse_config
from txgateway.service.gateway import Gateway

WAIT = 10.0                # bound on waiting for a line in a log


def get(port: int, path: str = "/api/users/1") -> str:
    """One request on its own connection, answered 200; its correlation id."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        return resp.getheader("x-correlation-id") or ""
    finally:
        conn.close()


def logged_ids(path: Path) -> list[str]:
    """The correlation ids of the JSON access lines in `path`, in order."""
    if not path.exists():
        return []
    return [json.loads(line)["correlation_id"] for line in path.read_text().splitlines()]


def stdout_access_log(config: Path) -> Path:
    """write_config's config, with `access_log: "-"` instead of its file."""
    text = re.sub(r'access_log: ".*"', 'access_log: "-"', config.read_text())
    config.write_text(text)
    return config


# --- daemonised twistd ------------------------------------------------------------------------

@contextlib.contextmanager
def daemonised(tmp_path: Path, config: Path, *extra: str) -> Iterator[subprocess.CompletedProcess[str]]:
    """`twistd --logfile=twistd.log --pidfile=twistd.pid txgateway --config CONFIG *extra`, which
    returns once the daemon is up (or has failed). Whatever daemon it left is killed at the end."""
    pidfile = tmp_path / "twistd.pid"
    result = subprocess.run([str(TWISTD), f"--logfile={tmp_path / 'twistd.log'}", f"--pidfile={pidfile}",
                             "txgateway", "--config", str(config), *extra],
                            capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL,
                            check=False)
    try:
        yield result
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)   # a --workers parent's workers follow it


def stop_daemon(pidfile: Path) -> None:
    """SIGTERM to the daemon in `pidfile`; wait for it to be gone."""
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGTERM)

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_until(gone, WAIT, f"the daemon (pid {pid}) to exit")


def test_daemonised_the_access_log_on_stdout_goes_to_twistds_log_file(tmp_path):
    with upstream() as url:
        port = free_port()
        config = stdout_access_log(write_config(tmp_path, port, url))
        with daemonised(tmp_path, config) as started:
            assert started.returncode == 0, started.stdout + started.stderr
            ids = [get(port) for _ in range(3)]
            log = tmp_path / "twistd.log"
            wait_until(lambda: all(i in log.read_text() for i in ids), WAIT, "the access lines in twistd.log")
            lines = [line for line in log.read_text().splitlines() if "[txgateway.access#info] " in line]
            records = [json.loads(line.split("[txgateway.access#info] ", 1)[1]) for line in lines]
            assert [r["correlation_id"] for r in records] == ids
            assert {(r["path"], r["status"], r["upstream"]) for r in records} == {("/api/users/1", 200, "users")}
            stop_daemon(tmp_path / "twistd.pid")
        out = log.read_text()
        assert "SIGTERM: draining" in out and "Server Shut Down." in out and "Traceback" not in out, out


def test_a_daemonised_workers_parent_is_refused_in_one_line(tmp_path):
    port = free_port()
    config = write_config(tmp_path, port, "http://127.0.0.1:9")
    with daemonised(tmp_path, config, "--workers", "2") as result:
        assert result.returncode != 0
        assert result.stdout == ""
        assert result.stderr == ("txgateway: --workers needs twistd -n (as systemd runs it): the workers log to "
                                 "the parent's stdout, which a daemonised twistd closes\n"), result.stderr
        assert not (tmp_path / "twistd.pid").exists()
        assert_port_free(port)


# --- reopening the access log (logrotate) -------------------------------------------------------

@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGHUP])
def test_an_access_log_renamed_away_is_reopened_on_the_signal(tmp_path, signum):
    with upstream() as url:
        port = free_port()
        daemon = Daemon(tmp_path, write_config(tmp_path, port, url))
        try:
            daemon.wait_for_port(port)
            before = [get(port) for _ in range(3)]       # buffered: written out at the reopen
            access = tmp_path / "access.log"
            access.rename(tmp_path / "access.log.1")
            daemon.proc.send_signal(signum)
            wait_until(lambda: f"access log {access} reopened" in daemon.output, WAIT, "the reopen")
            after = [get(port) for _ in range(3)]
            wait_until(lambda: len(logged_ids(access)) == 3, WAIT, "three lines in the new access.log")
            assert logged_ids(tmp_path / "access.log.1") == before
            assert logged_ids(access) == after
            daemon.proc.send_signal(signal.SIGTERM)
            assert_clean_shutdown(daemon, daemon.wait())
        finally:
            daemon.kill()


def test_an_access_log_that_cannot_be_reopened_is_said_once_and_the_old_file_kept(tmp_path):
    with upstream() as url:
        port = free_port()
        config = write_config(tmp_path, port, url)
        logs = tmp_path / "logs"
        logs.mkdir()
        config.write_text(config.read_text().replace(str(tmp_path / "access.log"), str(logs / "access.log")))
        daemon = Daemon(tmp_path, config)
        try:
            daemon.wait_for_port(port)
            before = get(port)
            logs.rename(tmp_path / "old-logs")              # the directory is gone: nowhere to reopen
            daemon.proc.send_signal(signal.SIGUSR1)
            message = (f"access log {logs / 'access.log'}: cannot reopen it (No such file or directory); "
                       "still writing to the file open before")
            wait_until(lambda: message in daemon.output, WAIT, "the failed reopen")
            after = get(port)
            old = tmp_path / "old-logs" / "access.log"
            wait_until(lambda: len(logged_ids(old)) == 2, WAIT, "both lines in the file still open")
            assert logged_ids(old) == [before, after]
            assert daemon.output.count(message) == 1 and "reopened" not in daemon.output, daemon.output
            assert re.search(r"\[txgateway#error\] " + re.escape(message), daemon.output), daemon.output
        finally:
            daemon.kill()


def test_a_workers_parent_passes_sigusr1_on_and_every_worker_reopens(tmp_path):
    with two_workers(tmp_path) as (_, daemon, port, _):
        workers = daemon.wait_ready(port)
        before = [get(port) for _ in range(6)]
        access = tmp_path / "access.log"
        access.rename(tmp_path / "access.log.1")
        daemon.proc.send_signal(signal.SIGUSR1)
        for index in (0, 1):
            wait_until(lambda i=index: re.search(rf"\[worker {i}\] .*access log {access} reopened", daemon.output),
                       WAIT, f"worker {index} reopening")
        after = [get(port) for _ in range(20)]
        wait_until(lambda: len(logged_ids(access)) == 20, WAIT, "twenty lines in the new access.log")
        assert sorted(logged_ids(tmp_path / "access.log.1")) == sorted(before)
        assert sorted(logged_ids(access)) == sorted(after)
        assert daemon.workers() == workers and daemon.proc.poll() is None      # nobody died of SIGUSR1
        assert "died" not in daemon.output and "Traceback" not in daemon.output, daemon.output


# --- what the lines say -------------------------------------------------------------------------

def test_a_workers_lines_carry_its_number(tmp_path):
    with two_workers(tmp_path) as (_, daemon, port, _):
        workers = daemon.wait_ready(port)
        out = daemon.output
        for index in (0, 1):
            assert re.search(rf"^\S+ \[worker {index}\] \[-\] HTTP1Factory starting on {port}$", out, re.M), out
        # the parent's own lines are not a worker's
        started = re.findall(r"^\S+ (.*)worker \d started \(pid (\d+)\)$", out, re.M)
        assert sorted(int(pid) for _, pid in started) == workers and {tag for tag, _ in started} == {
            "[txgateway.service.workers#info] "}, out


def with_dead_upstream(config: Path, health_check: str = "") -> None:
    """Adds the upstream `dead` (a target refusing connections, then `health_check`) and the
    route /api/dead to it."""
    dead = f"http://127.0.0.1:{free_port()}"
    config.write_text(config.read_text().replace("routes:\n", f'  dead: {{targets: ["{dead}"]{health_check}}}\n'
                                                             "routes:\n  - {prefix: /api/dead, upstream: dead}\n"))


def test_health_checks_do_not_fill_the_log_with_factory_lines(tmp_path):
    with upstream() as url:
        port = free_port()
        config = write_config(tmp_path, port, url)
        with_dead_upstream(config, ", health_check: {path: /, interval: 100ms, timeout: 50ms}")
        daemon = Daemon(tmp_path, config)
        try:
            daemon.wait_for_port(port)
            wait_until(lambda: "down (3 health checks failed" in daemon.output, WAIT, "the dead target going down")
            time.sleep(0.5)                                  # five more rounds of checks
            out = daemon.output
            assert "Starting factory" not in out and "Stopping factory" not in out, out
            assert "_HTTP11ClientFactory" not in out, out
        finally:
            daemon.kill()


def run_with_journal_stream(tmp_path: Path, journal: str) -> tuple[int, str]:
    """`twistd -n` writing to twistd.out, with JOURNAL_STREAM naming the device and inode of the
    file `journal` in tmp_path ("twistd.out": its stdout stands for the journal). It logs a
    warning (an upstream failed: 502) and errors (a reload refused), then stops. -> (port, output)"""
    (tmp_path / "twistd.out").touch()            # Daemon opens it again ("wb": the same inode)
    (tmp_path / journal).touch()
    st = os.stat(tmp_path / journal)
    with upstream() as url:
        port = free_port()
        config = write_config(tmp_path, port, url)
        with_dead_upstream(config)
        daemon = Daemon(tmp_path, config, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        try:
            daemon.wait_for_port(port)
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT)
            conn.request("GET", "/api/dead/1")
            assert conn.getresponse().status == 502
            conn.close()
            config.write_text(config.read_text() + "bogus: 1\n")
            daemon.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "reload refused" in daemon.output, WAIT, "the refused reload")
            daemon.proc.send_signal(signal.SIGTERM)
            assert_clean_shutdown(daemon, daemon.wait())
            return port, daemon.output
        finally:
            daemon.kill()


PRIORITY = {"info": "6", "warn": "4", "error": "3", "critical": "3"}


def test_under_the_journal_every_line_says_its_priority(tmp_path):
    port, out = run_with_journal_stream(tmp_path, "twistd.out")
    lines = []
    for line in out.splitlines():
        match = re.match(r"<(\d)>(\S+ \[([^\]]*)\] .*)$", line)
        assert match, f"no priority prefix: {line!r}"
        level = match[3].rpartition("#")[2] if "#" in match[3] else "info"    # [-]: Twisted's info
        assert match[1] == PRIORITY[level], line
        lines.append((match[1], match[2]))
    assert any(p == "4" and "] upstream dead (" in text for p, text in lines), lines
    assert any(p == "3" and "] reload refused" in text for p, text in lines), lines
    assert any(p == "6" and f"] HTTP1Factory starting on {port}" in text for p, text in lines), lines


def test_stdout_that_is_not_the_journal_gets_no_prefixes(tmp_path):
    _, out = run_with_journal_stream(tmp_path, "stderr-is-the-journal")
    assert "upstream dead (" in out and "reload refused" in out, out
    assert not re.search(r"^<\d>", out, re.M), out


# --- messages: methods and paths as text ----------------------------------------------------

@contextlib.contextmanager
def log_lines(namespace: str) -> Iterator[list[str]]:
    """The formatted events of `namespace` logged meanwhile."""
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == namespace:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        yield lines
    finally:
        globalLogPublisher.removeObserver(observe)


@pytest_twisted.ensureDeferred
async def test_a_retry_is_logged_with_its_method_and_path_as_text(reactor, echo, gateway):
    refused = f"http://127.0.0.1:{free_port()}"
    gw = await gateway(f"""
        upstreams:
          users: {{targets: ["{echo.url}", "{refused}"], retries: 1}}   # round robin tries {refused} first
        routes:
          - {{prefix: /api, upstream: users}}
        """)
    with log_lines("txgateway.upstream.proxy") as lines:
        (r,) = parse_responses(await raw(gw.port, b"GET /api/x?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert r.status == 200
    cid = r.header("x-correlation-id")
    (retry,) = [line for line in lines if line.startswith("retrying")]
    assert retry.startswith(f"retrying GET /api/x for {cid} on {echo.url} after: connect failed"), retry


class _Broken:
    """A filter with a bug: its request hook fails."""

    name = "broken"
    on_response_head = on_response_body = on_finished = None

    def on_request(self, ctx: Any) -> Any:
        return fail(RuntimeError("a bug"))


@pytest_twisted.ensureDeferred
async def test_a_failing_filter_is_logged_with_the_method_and_path_as_text(reactor, echo):
    from txgateway.testing import with_filter
    config = parse_config(with_defaults(f"""
        upstreams:
          users: {{targets: ["{echo.url}"]}}
        routes:
          - {{prefix: /api, upstream: users}}
        """), "test.yaml")
    gw = Gateway(config, reactor)
    gw.switch.pipeline = with_filter(gw.pipeline, _Broken())
    gw.startService()
    try:
        port = (await gw.listeners[0]._waitingForPort).getHost().port
        with log_lines("txgateway.core.pipeline") as lines:
            (r,) = parse_responses(await raw(port, b"POST /api/x?q=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"))
    finally:
        await gw.stopService()
    assert_envelope(r, 500, "INTERNAL")
    (line,) = lines
    assert line == f"filter broken failed in its request phase on route /api for POST /api/x ({r.json()['error']['correlation_id']})"


@pytest_twisted.ensureDeferred
async def test_a_health_check_timing_out_while_connecting_says_so(reactor, echo, gateway):
    # A listener that never accepts, its one-connection queue taken: connecting hangs (SYNs dropped).
    with socket.socket() as full, socket.socket() as queued:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        queued.connect(full.getsockname())
        target = "http://127.0.0.1:%d" % full.getsockname()[1]
        with log_lines("txgateway.upstream.balance") as lines:
            gw = await gateway(f"""
                upstreams:
                  users:
                    targets: ["{echo.url}", "{target}"]
                    health_check: {{path: /, interval: 200ms, timeout: 50ms, unhealthy_threshold: 2}}
                routes:
                  - {{prefix: /api, upstream: users}}
                """)
            member = gw.gateway.upstreams["users"].balancer.members[1]
            deadline = time.monotonic() + WAIT
            while not member.down and time.monotonic() < deadline:
                await deferLater(reactor, 0.05, lambda: None)
    assert lines == [f"upstream users: target {target} down (2 health checks failed, last: no answer within 0.05s)"]
