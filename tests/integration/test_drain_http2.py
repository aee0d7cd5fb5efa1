"""SIGTERM drain of HTTP/2 connections in the real daemon.

`Gateway._stop` closes a listener's HTTP/2 connections (`factory.others`) with its HTTP/1.1
ones once the drain ends. Here a real `twistd -n txgateway` serves a TLS listener offering
h2 (ALPN), an `h2`-library client (test_http2.H2Client, blocking, bounded socket timeouts)
holds a stream open to a slow stdlib upstream, and the daemon gets SIGTERM: a stream that
ends within drain_timeout completes; one that does not is cut at drain_timeout, counted,
logged, and its connection closed, and the process still exits 0 in time.

Found here: `transport.loseConnection()` did nothing to an HTTP/2 connection (twisted.web's
H2Connection is the TLS transport's producer, and TLS waits for it to go), so it was only
dropped, without GOAWAY or close_notify, when the process exited, and a cut stream was never
logged. And a TLS close waits for the client's close_notify, so a cut HTTP/1.1-over-TLS
request was still open when the upstreams closed: logged 502 "upstream connection reset".
"""

from __future__ import annotations

import signal
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h2.events
import pytest
from h2.errors import ErrorCodes

from tests.conftest import free_port
from tests.integration.test_drain_and_systemd import (
    SLOW_BODY,
    STOP_TIMEOUT,
    Daemon,
    Upstream,
    access_records,
    refused,
    upstreams,
    wait_until,
    write_config,
)
from tests.integration.test_http2 import WAIT, Cert, H2Client, H2Result, cert, h1_request, tls_socket
from tests.integration.test_lifecycle import assert_clean_shutdown

__all__ = ["cert", "upstreams"]  # the fixtures


def tls_daemon(tmp_path: Path, cert: Cert, upstream: Upstream, drain_timeout: str) -> tuple[Daemon, int]:
    """A daemon with one TLS listener offering h2 then http/1.1, routing /api/users to `upstream`."""
    port = free_port()
    config = write_config(tmp_path, f"tcp:{port}:interface=127.0.0.1", upstream.url, f"drain_timeout: {drain_timeout}\n",
                          tls=f"{{certificates: [{{cert: {cert.cert}, key: {cert.key}}}], alpn: [h2, http/1.1]}}")
    daemon = Daemon(tmp_path, config)
    daemon.wait_for_port(port)
    return daemon, port


@dataclass
class Ending:
    """How the server ended an HTTP/2 connection, seen by the client."""

    at: float                                 # monotonic time of the first sign (GOAWAY or end)
    goaway: h2.events.ConnectionTerminated | None
    how: str            # "closed": TLS close_notify, the gateway closed it; else "reset (<error>)":
                        # a TCP reset, or an end without close_notify (the process exiting)
    after: bytes        # anything sent after the GOAWAY


def read_until_closed(client: H2Client, timeout: float) -> Ending:
    """Read (answering as a client does) until the server ends the connection: its GOAWAY if
    any, then the end of the TLS connection itself. Fails after `timeout`."""
    deadline = time.monotonic() + timeout
    client.sock.suppress_ragged_eofs = False     # an end without TLS close_notify: SSLEOFError

    def left() -> float:
        seconds = deadline - time.monotonic()
        assert seconds > 0, f"the server did not close the HTTP/2 connection within {timeout}s: {client.results}"
        return min(seconds, 0.5)

    at, after, how = None, b"", "closed"
    try:
        while not client.closed:
            client.sock.settimeout(left())
            client.pump()
        at = time.monotonic()
        while True:
            client.sock.settimeout(left())
            try:
                data = client.sock.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            after += data
    except (ssl.SSLError, ConnectionError) as e:
        how = f"reset ({type(e).__name__})"
    return Ending(at if at is not None else time.monotonic(), client.terminated, how, after)


@contextmanager
def h2_stream_then_sigterm(tmp_path: Path, cert: Cert, upstreams: list[Upstream], delay: float, drain: str,
                           path: str) -> Iterator[tuple[Daemon, Upstream, int, H2Client, int, float]]:
    """A TLS daemon, an HTTP/2 stream its upstream holds (`delay` s), then SIGTERM:
    (daemon, upstream, port, client, stream, monotonic time of the SIGTERM)."""
    upstream = Upstream(delay=delay)
    upstreams.append(upstream)
    daemon, port = tls_daemon(tmp_path, cert, upstream, drain)
    try:
        with H2Client(port, cert.cert) as client:
            stream = client.request(path)
            assert upstream.arrived.wait(WAIT), daemon.output    # the upstream holds the request now
            daemon.proc.send_signal(signal.SIGTERM)
            yield daemon, upstream, port, client, stream, time.monotonic()
    finally:
        daemon.kill()


def test_sigterm_lets_an_http2_stream_in_flight_finish_then_exits_0(tmp_path, cert, upstreams):
    with h2_stream_then_sigterm(tmp_path, cert, upstreams, 1.5, "10s", "/api/users/slow") as (
            daemon, slow, port, client, stream, sigterm):
        # Draining: new connections are refused while the stream is still waiting.
        wait_until(lambda: refused(port), 3, f"connections to {port} refused after SIGTERM")
        assert not slow.answered and not client.results[stream].done

        (result,) = client.wait(stream, timeout=WAIT)
        assert (result.status, result.body, result.ended, result.reset) == (200, SLOW_BODY, True, None), result
        wait_until(lambda: bool(slow.answered), 3, "the upstream to record its answer (after sending it)")
        assert slow.answered[0] - sigterm >= 1.0               # it really waited for the upstream
        ending = read_until_closed(client, STOP_TIMEOUT)
        # Then the drain is over: a GOAWAY (no error, stream 1 was the last) and a clean TLS close.
        assert ending.goaway is not None and ending.goaway.error_code == ErrorCodes.NO_ERROR, ending
        assert ending.goaway.last_stream_id == stream and (ending.how, ending.after) == ("closed", b""), ending
        assert_clean_shutdown(daemon, daemon.wait(STOP_TIMEOUT))
        assert refused(port)
        assert [(r["path"], r["status"], r["tls"]) for r in access_records(tmp_path)] == \
            [("/api/users/slow", 200, "TLSv1.3 h2")]


@dataclass
class H2Cut:
    daemon: Daemon
    hanging: Upstream
    port: int
    result: H2Result    # what the cut stream received
    ending: Ending      # how the connection ended
    sigterm: float
    code: int           # the daemon's exit status
    stopped: float      # seconds from SIGTERM to the exit


@pytest.fixture
def h2_request_cut_at_drain_timeout(tmp_path, cert, upstreams) -> Iterator[H2Cut]:
    """The HTTP/2 twin of test_drain_and_systemd.request_cut_at_drain_timeout: drain_timeout
    1s, SIGTERM while one stream waits for a 3 s upstream; the client holds its connection
    (reading) until the daemon has exited."""
    with h2_stream_then_sigterm(tmp_path, cert, upstreams, 3.0, "1s", "/api/users/hang") as (
            daemon, hanging, port, client, stream, sigterm):
        ending = read_until_closed(client, STOP_TIMEOUT)
        code = daemon.wait(STOP_TIMEOUT)
        stopped = time.monotonic() - sigterm
        yield H2Cut(daemon, hanging, port, client.results[stream], ending, sigterm, code, stopped)


def test_an_http2_stream_still_running_at_drain_timeout_is_cut_and_the_exit_is_0(h2_request_cut_at_drain_timeout):
    run = h2_request_cut_at_drain_timeout
    assert_clean_shutdown(run.daemon, run.code)
    # It waited drain_timeout (1s), then closed the connection well before the upstream's 3 s answer.
    assert 0.9 <= run.ending.at - run.sigterm < 2.5, run.ending
    assert 0.9 <= run.stopped < 2.5, run.stopped
    assert not run.hanging.answered
    # The stream got nothing: no response head, no end, no reset. The connection was ended under
    # it: GOAWAY (no error; stream 1 was the last one taken), then a clean TLS close.
    assert (run.result.status, run.result.chunks, run.result.ended, run.result.reset) == (None, [], False, None), \
        run.result
    assert run.ending.goaway is not None and run.ending.goaway.error_code == ErrorCodes.NO_ERROR, run.ending
    assert run.ending.goaway.last_stream_id == 1 and (run.ending.how, run.ending.after) == ("closed", b""), run.ending
    assert "drain_timeout (1s) reached: cutting 1 request(s) still in flight" in run.daemon.output
    assert refused(run.port)


def test_an_http2_stream_cut_at_drain_timeout_is_in_the_access_log(tmp_path, h2_request_cut_at_drain_timeout):
    """One access-log record per request; a cut one is 499 (the client never got an answer)."""
    assert_clean_shutdown(h2_request_cut_at_drain_timeout.daemon, h2_request_cut_at_drain_timeout.code)
    assert [(r["path"], r["status"], r["tls"]) for r in access_records(tmp_path)] == \
        [("/api/users/hang", 499, "TLSv1.3 h2")]


def test_an_http1_request_over_tls_cut_at_drain_timeout_is_499_in_the_access_log(tmp_path, cert, upstreams):
    """The same listener, ALPN http/1.1, a client that does not answer close_notify: its cut
    request is 499, as over plain HTTP/1.1 (it was 502 "upstream connection reset", or 499 only
    when the reactor's teardown won the race)."""
    hanging = Upstream(delay=3.0)
    upstreams.append(hanging)
    daemon, port = tls_daemon(tmp_path, cert, hanging, "1s")
    try:
        with tls_socket(port, cert.cert, ["http/1.1"]) as sock:
            sock.sendall(h1_request("/api/users/hang"))
            assert hanging.arrived.wait(WAIT), daemon.output
            daemon.proc.send_signal(signal.SIGTERM)
            sock.settimeout(STOP_TIMEOUT)
            sock.suppress_ragged_eofs = False
            assert sock.recv(65536) == b""                     # no response, a clean TLS close
            code = daemon.wait(STOP_TIMEOUT)                   # while the client holds its end
        assert_clean_shutdown(daemon, code)
        assert "cutting 1 request(s)" in daemon.output
        assert [(r["path"], r["status"], r["error"], r["tls"]) for r in access_records(tmp_path)] == \
            [("/api/users/hang", 499, None, "TLSv1.3 http/1.1")]
    finally:
        daemon.kill()
