"""--workers edges: a non-tcp listener is a one-line error, listener strings are read like
Twisted reads them (or refused, never guessed), and the parent stops accepting when the drain
begins."""
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.integration.test_workers import (
    SLOW,
    WAIT,
    get_slow,
    run_workers_on_a_unix_listener,
    two_workers,
)
from txgateway.service.workers import bind_listener


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
