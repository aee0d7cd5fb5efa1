"""--workers edges: a non-tcp listener is a one-line error, listener strings are read like
Twisted reads them (or refused, never guessed), and the parent stops accepting when the drain
begins."""
import os
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import free_port
from tests.installed import TWISTD
from tests.integration.test_workers import (
    SLOW,
    WAIT,
    get_slow,
    run_workers_on_a_unix_listener,
    two_workers,
    write_config,
)
from txgateway.service.workers import WORKERS_PARENT, bind_listener


def test_non_tcp_listener_is_a_usage_error_without_traceback(tmp_path):
    code, out, _ = run_workers_on_a_unix_listener(tmp_path)
    assert code != 0
    assert "--workers shares tcp: and tcp6: listeners only" in out
    assert "Traceback" not in out, out                  # like every other config problem
    assert "starting up" not in out, out                # refused by the options, before twistd starts


def test_unescaped_ipv6_interface_is_refused_not_bound_to_every_interface():
    # Twisted refuses this string (TypeError: multiple values for 'interface'); bind_listener
    # binds "::" (every interface) instead of the loopback the operator meant.
    with pytest.raises(ValueError):
        sock = bind_listener("tcp6:0:interface=::1")
        try:
            print(sock.getsockname())
        finally:
            sock.close()


def test_port_keyword_form_is_accepted_like_twisted():
    sock = bind_listener("tcp:port=0:interface=127.0.0.1")
    try:
        assert sock.getsockname()[0] == "127.0.0.1"
    finally:
        sock.close()


def refused(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except (ConnectionRefusedError, ConnectionResetError):
        return True
    return False


def test_new_connections_are_refused_while_the_workers_drain(tmp_path):
    import signal
    with two_workers(tmp_path) as (up, daemon, port, _):
        daemon.wait_ready(port)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(get_slow, port)
            assert up.slow_arrived.wait(WAIT)
            daemon.proc.send_signal(signal.SIGTERM)
            daemon.wait_until("both workers closed the port",
                              lambda: daemon.output.count(f"(TCP Port {port} Closed)") >= 2, timeout=SLOW)
            assert not pending.done()
            assert refused(port), "accepted into the parent's backlog while the workers drain"
            assert pending.result(timeout=WAIT + SLOW) == 200


def test_a_worker_whose_parent_died_while_it_started_stops_instead_of_serving_as_an_orphan(tmp_path):
    """The parent-death signal is asked for while the worker starts: a parent killed before
    then (the worker still importing) never sends it. The worker checks its parent is the one
    that spawned it (pid 1 here is not) and stops."""
    config = write_config(tmp_path, free_port(), "http://127.0.0.1:9")
    result = subprocess.run([str(TWISTD), "-n", "--pidfile=", "txgateway", "--config", str(config), "--worker", "1"],
                            env={**os.environ, WORKERS_PARENT: "1"}, capture_output=True, text=True, timeout=30,
                            cwd=tmp_path, stdin=subprocess.DEVNULL, check=False)
    assert result.returncode == 1
    assert "txgateway: the --workers parent (pid 1) is gone; this worker stops" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
