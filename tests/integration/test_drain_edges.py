"""Edges of the daemon's life found by the drain and systemd tests: a request cut at drain_timeout
still gets its access-log line, a socket-activated listener without its socket is a clear error
(no traceback), and systemd hears READY=1 / STOPPING=1."""
import signal

from tests.conftest import free_port
from tests.integration.test_drain_and_systemd import (
    STOP_TIMEOUT,
    ActivatedDaemon,
    Daemon,
    Upstream,
    access_records,
    listening_socket,
    request_cut_at_drain_timeout,
    upstreams,
    write_config,
)
from tests.integration.test_lifecycle import assert_clean_shutdown

__all__ = ["upstreams"]  # the fixture


def test_a_request_cut_at_drain_timeout_is_in_the_access_log(tmp_path, upstreams):
    """One access-log record per request. A request cut by drain_timeout leaves none."""
    with request_cut_at_drain_timeout(tmp_path, upstreams) as run:
        assert run.cut == b""
        assert_clean_shutdown(run.daemon, run.code)
        assert [r["path"] for r in access_records(tmp_path)] == ["/api/users/hang"]   # FAILS: []


def test_missing_inherited_socket_is_a_clear_error_not_a_traceback(tmp_path, upstreams):
    """A socket unit without FileDescriptorName=http (or a launcher without LISTEN_FDNAMES)
    makes twistd die with `KeyError: 'http'` and a traceback instead of a config error."""
    echo = Upstream()
    upstreams.append(echo)
    config = write_config(tmp_path, "systemd:domain=INET:name=http", echo.url)
    sock = listening_socket()
    try:
        daemon = ActivatedDaemon(tmp_path, config, sock, names="")   # no LISTEN_FDNAMES
    finally:
        sock.close()
    try:
        code = daemon.wait(STOP_TIMEOUT)
        out = daemon.output
        assert code != 0
        assert "Traceback" not in out, out                            # FAILS: KeyError: 'http'
        assert "http" in out and "LISTEN_FDNAMES" in out, out
    finally:
        daemon.kill()


def test_ready_is_sent_to_systemd_once_listening_and_stopping_on_sigterm(tmp_path, upstreams):
    """Type=notify: READY=1 after the listeners are bound (so systemd holds a reload issued
    during start-up until then), STOPPING=1 when the drain begins."""
    import socket as socketlib
    echo = Upstream()
    upstreams.append(echo)
    port = free_port()
    config = write_config(tmp_path, f"tcp:{port}:interface=127.0.0.1", echo.url)
    notify_path = str(tmp_path / "notify.sock")
    listener = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_DGRAM)
    listener.bind(notify_path)
    listener.settimeout(15)
    daemon = Daemon(tmp_path, config, env={"NOTIFY_SOCKET": notify_path})
    try:
        assert listener.recv(256) == b"READY=1"
        with socketlib.create_connection(("127.0.0.1", port), timeout=5):
            pass                                                    # bound when READY=1 arrives
        daemon.proc.send_signal(signal.SIGTERM)
        assert listener.recv(256) == b"STOPPING=1"
        assert_clean_shutdown(daemon, daemon.wait(STOP_TIMEOUT))
    finally:
        daemon.kill()
        listener.close()
