"""HTTP/2 abuse against a real gateway (txgateway/transport/h2.py), with the `h2` library as client.

The attacks of issue 18: a CONTINUATION flood (the header block is cut before it is stored, the
connection is aborted, and its objects are freed without a garbage collection), request bodies
sent before auth (the filters answer on HEADERS; `max_body_size` is enforced while the body
arrives), a header block left half-sent (`header_timeout`), `:method`/`:path` that cannot become
an HTTP/1.1 request line, CONNECT, and rapid resets with reconnects (budgeted per client address).
Each test also checks that a good request is served afterwards.
"""

from __future__ import annotations

import gc
import socket
import ssl
import time
from typing import Any

import h2.events
import h2.settings
import pytest_twisted
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame
from twisted.internet import tcp
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from tests.conftest import ISSUER, listen, mint_token
from tests.integration.test_http2 import (
    WAIT,
    H2Client,
    H2Result,
    cert,
    listeners,
    port_of,
    routes,
    wait_for,
)
from txgateway.transport.h2 import H2Server, H2Stream, ResetBudget
from txgateway.transport.h2frames import H2Frames
from txgateway.transport.tls import _TLSProtocol

__all__ = ["cert"]  # the fixture

REQUEST = [(":method", "GET"), (":path", "/api/users/1"), (":authority", "localhost"), (":scheme", "https")]


def h2_socket(port: int, cafile: str, source: str = "127.0.0.1") -> tuple[ssl.SSLSocket, H2Connection]:
    """A TLS socket with h2 negotiated (from `source`), and a client state machine whose
    preface is sent already."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])
    raw_sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT, source_address=(source, 0))
    sock = context.wrap_socket(raw_sock, server_hostname="localhost")
    conn = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8",
                                        validate_outbound_headers=False, normalize_outbound_headers=False))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    return sock, conn


def read_until_closed(sock: ssl.SSLSocket, timeout: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or `timeout` passes (False): (closed, what came)."""
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            break
        except (ssl.SSLError, OSError):
            return True, received
        if not data:
            return True, received
        received += data
    return False, received


def goaway_code(received: bytes) -> int | None:
    """The error code of the first GOAWAY frame among the server's frames (after its SETTINGS)."""
    i = 0
    while i + 9 <= len(received):
        length = int.from_bytes(received[i:i + 3], "big")
        if received[i + 3] == 7 and i + 9 + 8 <= len(received):
            return int.from_bytes(received[i + 13:i + 17], "big")
        i += 9 + length
    return None


def assert_only_the_good_request_arrived(good: Any, echo: Any) -> None:
    """After the bad input: the next good request (`/api/users/fine`) is served, and it is the
    only one the upstream saw."""
    assert good.status == 200
    assert [r.uri for r in echo.requests] == [b"/users/fine"]


def get_one(port: int, cafile: str, path: str) -> H2Result:
    with H2Client(port, cafile) as client:
        return client.get(path)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def live(*kinds: type) -> int:
    """Instances of `kinds` still tracked by the collector: unreachable cycles count too."""
    return sum(1 for o in gc.get_objects() if type(o) in kinds)


# --- CONTINUATION flood -----------------------------------------------------------------------

def continuation_flood(port: int, cafile: str, frames: int) -> tuple[int, float, bool, int | None]:
    """HEADERS without END_HEADERS, then up to `frames` 16 KiB CONTINUATION frames:
    (bytes sent, seconds until the connection was closed, closed, GOAWAY code)."""
    sock, conn = h2_socket(port, cafile)
    headers = HeadersFrame(1)
    headers.data = conn.encoder.encode(REQUEST)
    sock.sendall(headers.serialize())
    continuation = ContinuationFrame(1)
    continuation.data = b"\x40\x05x-pad\x7f" + b"a" * (16384 - 8)
    frame = continuation.serialize()
    sent = 0
    start = time.monotonic()
    with sock:
        for _ in range(frames):
            try:
                sock.sendall(frame)
            except (OSError, ssl.SSLError):
                break
            sent += len(frame)
        closed, received = read_until_closed(sock, WAIT)
        return sent, time.monotonic() - start, closed, goaway_code(received)


@pytest_twisted.ensureDeferred
async def test_continuation_flood_is_cut_before_it_is_stored_and_freed_without_gc(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    before = await deferToThread(get_one, port, cert.cert, "/api/users/0")
    assert before.status == 200
    gc.collect()
    gc.disable()            # what a closed connection leaves must go by reference counting alone
    try:
        memory = rss()
        sent, seconds, closed, code = await deferToThread(continuation_flood, port, cert.cert, 20000)
        grown = rss() - memory
        # 20 000 frames are 328 MB: the gateway stopped reading after the first ones (the rest
        # is what the socket buffers took before the abort reached the client).
        assert closed and seconds < 5.0, (closed, seconds)
        assert code in (None, ErrorCodes.ENHANCE_YOUR_CALM), code
        assert sent < 32 * 2**20, sent
        assert grown < 32 * 2**20, grown

        after = await deferToThread(get_one, port, cert.cert, "/api/users/2")
        assert after.status == 200, after
        await wait_for(reactor, lambda: live(H2Server, H2Stream, H2Frames, _TLSProtocol) == 0, timeout=5.0)
    finally:
        gc.enable()


# --- bodies before auth, max_body_size per stream ----------------------------------------------

def auth_top(secret_file: str) -> str:
    return f"""auth:
  jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: {ISSUER}, audience: api}}
limits: {{max_body_size: 64KiB}}
"""


@pytest_twisted.ensureDeferred
async def test_auth_answers_on_headers_while_the_body_is_still_coming(reactor, raw_upstream, gateway, cert,
                                                                      secret_file):
    seen: list[bytes] = []

    def upstream(server: Any, data: bytes) -> None:
        seen.append(data)
        if b"end-of-body" in server.buffer:
            server.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    up = await raw_upstream(upstream)
    extra = "  - {prefix: /api/private, upstream: users, rewrite_prefix: /private, auth: required}\n"
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(up.url, extra, top=auth_top(secret_file)))
    port = await port_of(gw, 1)
    token = mint_token()

    def run() -> tuple[Any, Any, Any, int]:
        with H2Client(port, cert.cert) as client:
            # No token, a body that never ends: 401 at once, then the stream is closed.
            anonymous = [client.request("/api/private/x", method="POST", body=b"z" * 30000, end=False)
                         for _ in range(3)]
            denied = client.wait(*anonymous, timeout=5.0)
            # With a token: the body reaches the upstream while the client is still sending it.
            sid = client.request("/api/private/x", method="POST", headers=[("authorization", f"Bearer {token}")],
                                 body=b"a" * 20000, end=False)
            client.wait(until=lambda: sum(len(d) for d in seen) > 20000, timeout=5.0)
            upstream_before_end = sum(len(d) for d in seen)
            client.conn.send_data(sid, b"end-of-body", end_stream=True)
            client._send()
            (ok,) = client.wait(sid)
            return denied, ok, client.results, upstream_before_end

    denied, ok, _, before_end = await deferToThread(run)
    for r in denied:
        assert r.status == 401 and r.json()["error"]["code"] == "UNAUTHORIZED", r
    assert (ok.status, ok.body) == (200, b"ok")
    assert before_end > 20000
    heads = [d for d in seen if d.startswith(b"POST")]
    assert len(heads) == 1 and heads[0].startswith(b"POST /private/x HTTP/1.1\r\n"), heads


@pytest_twisted.ensureDeferred
async def test_body_over_max_body_size_is_refused_as_it_arrives(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url, top="limits: {max_body_size: 1KiB}\n"))
    port = await port_of(gw, 1)

    def run() -> tuple[Any, Any]:
        with H2Client(port, cert.cert) as client:
            # No content-length, the stream never ended: refused once 1 KiB is passed.
            (big,) = client.wait(client.request("/api/users/up", method="POST", body=b"y" * 4096, end=False),
                                 timeout=5.0)
            return big, client.get("/api/users/next")

    big, after = await deferToThread(run)
    assert big.status == 413 and big.json()["error"]["code"] == "PAYLOAD_TOO_LARGE", big
    assert after.status == 200 and after.json()["path"] == "/users/next"
    assert [r.uri for r in echo.requests] == [b"/users/next"]


# --- header_timeout -----------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_half_a_header_block_then_silence_is_closed_after_header_timeout(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url, top="limits: {header_timeout: 1s}\n"))
    port = await port_of(gw, 1)

    def run() -> tuple[bool, float, int | None]:
        sock, conn = h2_socket(port, cert.cert)
        with sock:
            frame = HeadersFrame(1)
            frame.data = conn.encoder.encode(REQUEST)[:10]      # no END_HEADERS, and nothing more
            sock.sendall(frame.serialize())
            start = time.monotonic()
            closed, received = read_until_closed(sock, 5.0)
            return closed, time.monotonic() - start, goaway_code(received)

    closed, seconds, code = await deferToThread(run)
    assert closed and 0.8 < seconds < 3.0, (closed, seconds)
    assert code == ErrorCodes.PROTOCOL_ERROR
    r = await deferToThread(get_one, port, cert.cert, "/api/users/1")
    assert r.status == 200


# --- request line, CONNECT ----------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_invalid_method_or_path_is_400_and_never_forwarded(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    bad = [("GET", "/api/users/a b"), ("GET", "/api/users/a\tb"), ("GET", "/api/users/\x7f"),
           ("GET", "/api/users/\xe9"), ("G ET", "/api/users/1"), ("GET", "api/users/1"), ("GE\x01T", "/api/users/1")]

    def run() -> list[Any]:
        with H2Client(port, cert.cert) as client:
            client.conn.config.validate_outbound_headers = False
            client.conn.config.normalize_outbound_headers = False
            out = []
            for method, path in bad:
                (r,) = client.wait(client.request(path, method=method))
                out.append(r)
            out.append(client.get("/api/users/fine"))
            return out

    *answers, good = await deferToThread(run)
    for (method, path), r in zip(bad, answers, strict=True):
        assert r.status == 400 and r.json()["error"]["code"] == "BAD_REQUEST", (method, path, r)
    assert_only_the_good_request_arrived(good, echo)


@pytest_twisted.ensureDeferred
async def test_connect_over_h2_is_405(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)

    def run() -> tuple[Any, Any]:
        with H2Client(port, cert.cert) as client:
            sid = client.conn.get_next_available_stream_id()
            client.results[sid] = H2Result()
            client.conn.send_headers(sid, [(":method", "CONNECT"), (":authority", "example.test:443")],
                                     end_stream=True)
            client._send()
            (connect,) = client.wait(sid)
            return connect, client.get("/api/users/after")

    connect, after = await deferToThread(run)
    assert connect.status == 405 and connect.json()["error"]["code"] == "METHOD_NOT_ALLOWED", connect
    assert after.status == 200


# --- rapid reset with reconnects ----------------------------------------------------------------

def reset_storm(port: int, cafile: str, connections: int, streams: int) -> tuple[int, list[int | None], int]:
    """From 127.0.0.2: `connections` connections one after the other, each opening and resetting
    `streams` streams: (connections that completed their storm, GOAWAY codes, refused handshakes)."""
    completed, codes, refused = 0, [], 0
    for _ in range(connections):
        try:
            sock, conn = h2_socket(port, cafile, source="127.0.0.2")
        except (OSError, ssl.SSLError):
            refused += 1
            continue
        with sock:
            try:
                for _ in range(streams):
                    sid = conn.get_next_available_stream_id()
                    conn.send_headers(sid, REQUEST, end_stream=True)
                    conn.reset_stream(sid, ErrorCodes.CANCEL)
                sock.sendall(conn.data_to_send())
            except (OSError, ssl.SSLError):
                pass
            _, received = read_until_closed(sock, 0.5)
            codes.append(goaway_code(received))
            if codes[-1] != ErrorCodes.ENHANCE_YOUR_CALM:
                completed += 1
    return completed, codes, refused


@pytest_twisted.ensureDeferred
async def test_rapid_reset_budget_is_per_client_address_across_connections(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    # The default budget (200, then 100/s) with a slower refill, so that a slow machine's
    # storm cannot be refilled as it goes.
    alpn = gw.gateway.listeners[1].factory.wrappedFactory
    assert isinstance(alpn.resets, ResetBudget)
    alpn.resets = ResetBudget(reactor, per_second=5.0, burst=200)
    # 8 x 90 resets: each connection stays under the budget, their sum does not.
    completed, codes, refused = await deferToThread(reset_storm, port, cert.cert, 8, 90)
    assert ErrorCodes.ENHANCE_YOUR_CALM in codes, codes
    assert completed == 2 and refused >= 1, (completed, codes, refused)
    # Another address is served as usual.
    r = await deferToThread(get_one, port, cert.cert, "/api/users/1")
    assert r.status == 200


# --- a client that sends and never reads ---------------------------------------------------------

def ping_flood(port: int, cafile: str, frames: int) -> tuple[int, bool]:
    """PING frames without ever reading the answers: (bytes sent, whether sending blocked)."""
    sock, _ = h2_socket(port, cafile)
    ping = PingFrame(0)
    ping.opaque_data = b"12345678"
    batch = ping.serialize() * 1000
    sent = 0
    with sock:
        sock.settimeout(2.0)
        try:
            for _ in range(frames // 1000):
                sock.sendall(batch)
                sent += len(batch)
        except TimeoutError:
            return sent, True
    return sent, False


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_is_not_read_either(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    # 2 million PINGs (34 MB) would each have their ACK queued for a client that reads none.
    sent, blocked = await deferToThread(ping_flood, port, cert.cert, 2_000_000)
    assert blocked and sent < 24 * 2**20, (sent, blocked)
    r = await deferToThread(get_one, port, cert.cert, "/api/users/1")
    assert r.status == 200


class InformedClient(H2Client):
    """An H2Client that also keeps the informational (1xx) statuses each stream got."""

    def __init__(self, port: int, cafile: str) -> None:
        self.informational: dict[int, list[str]] = {}
        super().__init__(port, cafile)

    def _event(self, event: Any) -> None:
        if isinstance(event, h2.events.InformationalResponseReceived):
            self.informational.setdefault(event.stream_id, []).append(dict(event.headers)[":status"])
        super()._event(event)


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_is_answered_when_the_upstream_reads_the_body(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)

    def run() -> tuple[list[str], Any]:
        with InformedClient(port, cert.cert) as client:
            sid = client.request("/api/users/up", method="POST", end=False,
                                 headers=[("expect", "100-continue"), ("content-length", "5")])
            client.wait(until=lambda: sid in client.informational, timeout=5.0)
            client.conn.send_data(sid, b"hello", end_stream=True)
            client._send()
            (r,) = client.wait(sid)
            return client.informational[sid], r

    informational, r = await deferToThread(run)
    assert informational == ["100"] and r.status == 200, (informational, r)
    assert r.json()["body_bytes"] == 5


class Deaf(Protocol):
    """An upstream that accepts a connection and never reads from it."""

    def connectionMade(self) -> None:
        self.transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.pauseProducing()


@pytest_twisted.ensureDeferred
async def test_an_upload_to_an_upstream_that_does_not_read_is_held_by_flow_control(reactor, gateway, cert):
    port_up = await listen(reactor, Factory.forProtocol(Deaf))
    url = f"http://127.0.0.1:{port_up.getHost().port}"
    try:
        gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(url, top="limits: {max_body_size: 1GiB}\n"))
        port = await port_of(gw, 1)
        body = 64 * 2**20

        def run() -> tuple[int, ssl.SSLSocket]:
            """Send as fast as the windows allow for 4 s (memoryview: no copies of the body)."""
            sock, conn = h2_socket(port, cert.cert)
            sid = conn.get_next_available_stream_id()
            conn.send_headers(sid, [(":method", "POST"), (":path", "/api/users/up"), (":authority", "localhost"),
                                    (":scheme", "https")])
            data, sent = memoryview(b"u" * body), 0
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, body - sent)
                while room > 0:
                    conn.send_data(sid, data[sent:sent + room].tobytes())
                    sent += room
                    room = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size, body - sent)
                sock.sendall(conn.data_to_send())
                sock.settimeout(0.05)
                try:
                    conn.receive_data(sock.recv(65536))
                except TimeoutError:
                    pass
            return sent, sock

        sent, sock = await deferToThread(run)
        try:
            # What the gateway holds for the upstream beyond the kernel's socket buffers: the
            # upstream paused the body, so the client's windows stayed shut.
            held = sum(len(c.dataBuffer) - c.offset + c._tempDataLen
                       for c in gc.get_objects() if type(c) is tcp.Client)
            assert sent > 2**20 and held < 2**20, (sent, held)
        finally:
            sock.close()
    finally:
        await port_up.stopListening()


# --- malformed header blocks -------------------------------------------------------------------

MALFORMED = {
    "upper case name": [*REQUEST, ("X-Up", "1")],
    "CR in a value": [*REQUEST, ("x-a", "a\rb")],
    "LF in a value": [*REQUEST, ("x-a", "a\nx-injected: 1")],
    "NUL in a value": [*REQUEST, ("x-a", "a\0b")],
    "value with surrounding space": [*REQUEST, ("x-a", " a")],
    "colon inside a name": [*REQUEST, ("x:a", "1")],
    "space in a name": [*REQUEST, ("x a", "1")],
    "connection header": [*REQUEST, ("connection", "keep-alive")],
    "transfer-encoding": [*REQUEST, ("transfer-encoding", "chunked")],
    "te other than trailers": [*REQUEST, ("te", "gzip")],
    "pseudo-header after a regular one": [*REQUEST[:3], ("x-a", "1"), REQUEST[3]],
    "unknown pseudo-header": [*REQUEST, (":foo", "1")],
    "repeated pseudo-header": [*REQUEST, (":path", "/api/users/2")],
    ":status in a request": [*REQUEST, (":status", "200")],
    "no :scheme": REQUEST[:3],
    "no :method": REQUEST[1:],
    "empty :path": [REQUEST[0], (":path", ""), *REQUEST[2:]],
    ":authority and host differ": [*REQUEST, ("host", "elsewhere")],
    "two hosts": [*REQUEST[:2], REQUEST[3], ("host", "localhost"), ("host", "localhost")],
}


def send_block(port: int, cafile: str, headers: list[tuple[str, str]]) -> tuple[bool, int | None]:
    """One request with `headers` as they are (no client-side checks): (closed, GOAWAY code)."""
    sock, conn = h2_socket(port, cafile)
    with sock:
        conn.send_headers(1, headers, end_stream=True)
        sock.sendall(conn.data_to_send())
        closed, received = read_until_closed(sock, WAIT)
        return closed, goaway_code(received)


@pytest_twisted.ensureDeferred
async def test_malformed_header_blocks_end_the_connection_and_are_never_forwarded(reactor, echo, gateway, cert):
    """What h2's inbound validation refused is refused by our own single pass (h2.py turns
    h2's off): GOAWAY PROTOCOL_ERROR, nothing reaches the upstream."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)

    def run() -> tuple[dict[str, tuple[bool, int | None]], H2Result]:
        outcomes = {why: send_block(port, cert.cert, headers) for why, headers in MALFORMED.items()}
        return outcomes, get_one(port, cert.cert, "/api/users/fine")

    outcomes, good = await deferToThread(run)
    assert {why: o for why, o in outcomes.items() if o != (True, ErrorCodes.PROTOCOL_ERROR)} == {}
    assert_only_the_good_request_arrived(good, echo)


@pytest_twisted.ensureDeferred
async def test_a_client_that_shrinks_its_header_table_still_decodes_every_response(reactor, echo, gateway, cert):
    """Responses are encoded without the dynamic table (h2headers.ResponseEncoder), but a
    client lowering SETTINGS_HEADER_TABLE_SIZE must still be told (RFC 7541 4.2): h2's decoder
    refuses the next block otherwise."""
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)

    def run() -> list[H2Result]:
        with H2Client(port, cert.cert) as client:
            first = client.get("/api/users/1")
            client.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
            client._send()
            return [first] + [client.get(f"/api/users/{i}") for i in range(2, 5)]

    answers = await deferToThread(run)
    assert [r.status for r in answers] == [200] * 4
    assert all(dict(r.headers)["content-type"] for r in answers)
