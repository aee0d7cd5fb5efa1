"""HTTP/2 through the gateway, with real TLS handshakes and real clients.

A TLS listener whose `alpn` lists `h2` hands h2 connections to the gateway's HTTP/2 and the
others to the gateway's own HTTP/1.1 (txgateway/transport/h2.py). These tests prove that ALPN decides
exactly that, that one route answers the same over plain HTTP/1.1, HTTP/1.1 over TLS and
HTTP/2, that every filter (auth, limits, breakers, header rules, body limits, access log)
applies to HTTP/2 requests, and that responses stream under HTTP/2 flow control (delayed
pieces, 5 MiB, concurrent streams, a stream reset mid-response).

Clients: `openssl s_client`, `curl --http2`, Python's ssl module, and the `h2` library over
a Python ssl socket for precise control of streams; all run in threads (deferToThread) with
socket timeouts, so the reactor serves meanwhile and nothing waits unbounded. The certificate
is self-signed for localhost (SAN DNS:localhost, IP:127.0.0.1), made per test.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import socket
import ssl
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.events
import h2.exceptions
import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from tests.conftest import (
    ISSUER,
    Response,
    assert_envelope,
    free_port,
    listen,
    mint_token,
    parse_responses,
    quiet_site,
    raw,
)

WAIT = 10.0                         # every bounded wait in this file
LOOPBACK = "tcp:0:interface=127.0.0.1"
HSTS = "max-age=600"


# --- certificate ------------------------------------------------------------------------------

@dataclass
class Cert:
    cert: str
    key: str


@pytest.fixture
def cert(tmp_path: Path) -> Cert:
    """A self-signed certificate for localhost / 127.0.0.1 (it is its own trust anchor)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "localhost.pem", tmp_path / "localhost.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return Cert(str(cert_path), str(key_path))


# --- config -----------------------------------------------------------------------------------

def listeners(cert: Cert, *alpns: str | None) -> str:
    """A plain listener first (`gw.port`), then one TLS listener per alpn list (None: the default)."""
    out = f'listen:\n  - endpoint: "{LOOPBACK}"\n'
    for alpn in alpns:
        extra = f", alpn: {alpn}" if alpn is not None else ""
        out += (f'  - endpoint: "{LOOPBACK}"\n'
                f'    tls: {{certificates: [{{cert: {cert.cert}, key: {cert.key}}}], hsts_max_age: 600s{extra}}}\n')
    return out + 'access_log: "off"\n'


def routes(upstream_url: str, extra_routes: str = "", top: str = "", extra_upstreams: str = "") -> str:
    """/api/users -> users (/users) with response header rules, then `extra_routes`."""
    return top + f"""
upstreams:
  users: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 5s}}
{extra_upstreams}routes:
  - prefix: /api/users
    upstream: users
    rewrite_prefix: /users
    response_headers: {{set: {{X-Route: users}}, remove: [X-Powered-By]}}
{extra_routes}"""


async def port_of(gw: Any, index: int) -> int:
    return (await gw.gateway.listeners[index]._waitingForPort).getHost().port


async def wait_for(reactor: Any, predicate: Any, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await deferLater(reactor, 0.02, lambda: None)


# --- clients ----------------------------------------------------------------------------------

def s_client(port: int, *args: str) -> str:
    """`openssl s_client` to 127.0.0.1:port, stdin closed (handshake, then quit): its output."""
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT, check=False)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


def curl(port: int, path: str, cafile: str, *args: str) -> tuple[str, str]:
    """curl to https://localhost:port (resolved to 127.0.0.1): (http_version, body)."""
    proc = subprocess.run(["curl", "-sS", "--max-time", str(WAIT), "--cacert", cafile,
                           "--resolve", f"localhost:{port}:127.0.0.1", "-w", "\n%{http_version}", *args,
                           f"https://localhost:{port}{path}"],
                          capture_output=True, timeout=WAIT + 5, check=False)
    assert proc.returncode == 0, proc.stderr
    body, _, version = proc.stdout.decode().rpartition("\n")
    return version, body


def tls_socket(port: int, cafile: str, alpn: list[str] | None,
               client_cert: tuple[str, str] | None = None, sni: bool = True) -> ssl.SSLSocket:
    """`client_cert`: (certificate file, key file) to present (mTLS listeners); `sni` False:
    no server name sent (the certificate is then checked without its host name)."""
    context = ssl.create_default_context(cafile=cafile)
    if client_cert is not None:
        context.load_cert_chain(*client_cert)
    if not sni:
        context.check_hostname = False
    if alpn is not None:
        context.set_alpn_protocols(alpn)
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    return context.wrap_socket(sock, server_hostname="localhost" if sni else None)


def h1_over_tls(port: int, cafile: str, request: bytes, alpn: list[str] | None = None) -> tuple[str | None, bytes]:
    """One HTTP/1.1 exchange over TLS (the request should say Connection: close): (ALPN, bytes)."""
    with tls_socket(port, cafile, alpn) as sock:
        chosen = sock.selected_alpn_protocol()
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ssl.SSLError, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return chosen, b"".join(chunks)


def h1_request(path: str, headers: Sequence[tuple[str, str]] = (), method: str = "GET", body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass
class H2Result:
    """What one HTTP/2 stream received."""

    status: int | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    chunks: list[tuple[float, bytes]] = field(default_factory=list)     # (monotonic time, data)
    ended: bool = False
    reset: int | None = None                                             # the RST_STREAM error code

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None

    @property
    def body(self) -> bytes:
        return b"".join(data for _, data in self.chunks)

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return ", ".join(values) if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    def as_response(self) -> Response:
        """In the shape of conftest's HTTP/1.1 responses (for assert_envelope)."""
        assert self.status is not None and self.ended, self
        return Response(self.status, [h for h in self.headers if not h[0].startswith(":")], self.body)


class H2Client:
    """An HTTP/2 client over a Python ssl socket (ALPN h2) driven by the `h2` library, used
    from a thread: `request()` opens streams, `wait()` reads until they are done."""

    def __init__(self, port: int, cafile: str, client_cert: tuple[str, str] | None = None) -> None:
        self.sock = tls_socket(port, cafile, ["h2"], client_cert)
        assert self.sock.selected_alpn_protocol() == "h2"
        self.conn = H2Connection(config=H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.results: dict[int, H2Result] = {}
        self.outgoing: dict[int, tuple[bytes, bool]] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._send()

    def __enter__(self) -> H2Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.conn.close_connection()
            self._send()
        except Exception:  # closing a connection the server may have dropped already
            pass
        self.sock.close()

    def request(self, path: str, method: str = "GET", headers: Sequence[tuple[str, str]] = (),
                body: bytes = b"", end: bool = True) -> int:
        """Open a stream; the body is sent as flow control allows (while `wait` reads)."""
        stream_id = self.conn.get_next_available_stream_id()
        self.results[stream_id] = H2Result()
        self.conn.send_headers(stream_id, [(":method", method), (":path", path), (":authority", "localhost"),
                                           (":scheme", "https"), *headers], end_stream=end and not body)
        if body:
            self.outgoing[stream_id] = (body, end)
        self._push_bodies()
        self._send()
        return stream_id

    def reset(self, stream_id: int) -> None:
        self.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
        self.outgoing.pop(stream_id, None)
        self._send()

    def get(self, path: str, headers: Sequence[tuple[str, str]] = ()) -> H2Result:
        return self.wait(self.request(path, headers=headers))[0]

    def wait(self, *stream_ids: int, until: Any = None, timeout: float = WAIT) -> list[H2Result]:
        """Read until every stream is done (or `until()` holds); bounded by `timeout`."""
        deadline = time.monotonic() + timeout
        results = [self.results[s] for s in stream_ids]
        while not (until() if until is not None else all(r.done for r in results)):
            assert not self.closed, f"the server closed the connection ({self.terminated})"
            left = deadline - time.monotonic()
            assert left > 0, f"no answer in {timeout}s: {results}"
            self.sock.settimeout(min(WAIT, max(left, 0.01)))
            self.pump()
        return results

    def pump(self) -> None:
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        if not data:
            self.closed = True
            return
        for event in self.conn.receive_data(data):
            self._event(event)
        self._push_bodies()
        self._send()

    def _event(self, event: Any) -> None:
        result = self.results.get(getattr(event, "stream_id", 0) or 0)
        if isinstance(event, h2.events.ResponseReceived) and result is not None:
            headers: list[Any] = list(event.headers)       # str pairs (header_encoding="utf-8")
            result.headers = headers
            result.status = int(dict(headers)[":status"])
        elif isinstance(event, h2.events.DataReceived):
            if result is not None:
                result.chunks.append((time.monotonic(), event.data))
            try:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            except h2.exceptions.StreamClosedError:
                pass
        elif isinstance(event, h2.events.StreamEnded) and result is not None:
            result.ended = True
        elif isinstance(event, h2.events.StreamReset) and result is not None:
            result.reset = event.error_code
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.terminated = event
            self.closed = True

    def _push_bodies(self) -> None:
        for stream_id, (data, end) in list(self.outgoing.items()):
            if self.results[stream_id].done:
                del self.outgoing[stream_id]
                continue
            while data:
                size = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                if size <= 0:
                    break
                self.conn.send_data(stream_id, data[:size])
                data = data[size:]
            if data:
                self.outgoing[stream_id] = (data, end)
            else:
                del self.outgoing[stream_id]
                if end:
                    self.conn.end_stream(stream_id)

    def _send(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)


async def h2_get(port: int, cafile: str, path: str, headers: Sequence[tuple[str, str]] = ()) -> H2Result:
    def run() -> H2Result:
        with H2Client(port, cafile) as client:
            return client.get(path, headers)
    return await deferToThread(run)


async def h2_requests(port: int, cafile: str, *requests: dict[str, Any]) -> list[H2Result]:
    """Each request (kwargs of H2Client.request) on one connection, one after the other."""
    def run() -> list[H2Result]:
        with H2Client(port, cafile) as client:
            return [client.wait(client.request(**kw))[0] for kw in requests]
    return await deferToThread(run)


# --- upstreams --------------------------------------------------------------------------------

BIG = b"".join(b"%08d" % i for i in range(5 * 2**20 // 8))       # 5 MiB, every 8 bytes numbered
PIECES = [b"piece-%d:" % i + b"x" * 1000 + b"\n" for i in range(5)]
PIECE_DELAY = 0.25


class Streaming(Resource):
    """An upstream answering in chunked encoding: `/slow` in delayed pieces, `/big` 5 MiB in
    64 KiB writes, `/endless` a piece every 50 ms until the client goes, `/late` nothing for
    a long time, `/pause` "done" after 2 s, `/truncated` a few pieces and then a closed connection (no last chunk),
    `/body` the request body (also kept in `bodies`).
    `written` has the time each `/slow` piece was written, `lost` the paths whose client went."""

    isLeaf = True

    def __init__(self, reactor: Any) -> None:
        super().__init__()
        self.reactor = reactor
        self.written: list[float] = []
        self.lost: list[bytes] = []
        self.started: list[bytes] = []
        self.bodies: list[bytes] = []

    def render(self, request: Any) -> Any:
        path = b"/" + request.path.rsplit(b"/", 1)[-1]
        self.started.append(request.path)
        finished = request.notifyFinish()
        finished.addErrback(lambda _: self.lost.append(path))
        gone = [False]
        finished.addBoth(lambda _: gone.__setitem__(0, True))
        request.setHeader(b"content-type", b"application/octet-stream")

        def later(delay: float, f: Any, *args: Any) -> None:
            self.reactor.callLater(delay, lambda: None if gone[0] else f(*args))

        if path == b"/slow":
            def piece(i: int) -> None:
                request.write(PIECES[i])
                self.written.append(time.monotonic())
                if i + 1 < len(PIECES):
                    later(PIECE_DELAY, piece, i + 1)
                else:
                    request.finish()
            piece(0)
        elif path == b"/big":
            def block(offset: int) -> None:
                request.write(BIG[offset:offset + 65536])
                if offset + 65536 < len(BIG):
                    later(0, block, offset + 65536)
                else:
                    request.finish()
            block(0)
        elif path == b"/endless":
            def tick() -> None:
                request.write(b"tick\n" * 100)
                later(0.05, tick)
            tick()
        elif path == b"/late":
            later(WAIT, request.finish)
        elif path == b"/truncated":
            request.write(PIECES[0])
            later(0.2, request.channel.transport.loseConnection)
        elif path == b"/pause":
            later(2.0, lambda: (request.write(b"done"), request.finish()))
        elif path == b"/body":
            self.bodies.append(request.content.read())
            request.write(self.bodies[-1])
            request.finish()
        return NOT_DONE_YET


@pytest_twisted.async_yield_fixture()
async def streaming(reactor: Any) -> Any:
    resource = Streaming(reactor)
    site = quiet_site(resource)
    port = await listen(reactor, site)
    resource.url = f"http://127.0.0.1:{port.getHost().port}"  # type: ignore[attr-defined]
    yield resource
    await port.stopListening()


# --- 1. ALPN ----------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_alpn_h2_is_negotiated_only_where_listed(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]", "[http/1.1]", None) + routes(echo.url))
    h2_port, h1_port, default_port = [await port_of(gw, i) for i in (1, 2, 3)]

    out = await deferToThread(s_client, h2_port, "-alpn", "h2,http/1.1")
    assert "ALPN protocol: h2" in out, out
    for port in (h1_port, default_port):
        out = await deferToThread(s_client, port, "-alpn", "h2")
        assert "ALPN protocol: h2" not in out and "No ALPN negotiated" in out, out
        out = await deferToThread(s_client, port, "-alpn", "h2,http/1.1")
        assert "ALPN protocol: http/1.1" in out, out
    out = await deferToThread(s_client, h2_port, "-alpn", "http/1.1")
    assert "ALPN protocol: http/1.1" in out, out

    # Real requests: only an h2 offer on an h2 listener gets HTTP/2; the others HTTP/1.1.
    version, body = await deferToThread(curl, h2_port, "/api/users/1?via=curl", cert.cert, "--http2")
    assert version == "2" and json.loads(body)["path"] == "/users/1"
    for port in (h1_port, default_port):
        version, body = await deferToThread(curl, port, "/api/users/2", cert.cert, "--http2")
        assert version == "1.1" and json.loads(body)["path"] == "/users/2"
    version, body = await deferToThread(curl, h2_port, "/api/users/3", cert.cert, "--http1.1")
    assert version == "1.1" and json.loads(body)["path"] == "/users/3"
    for alpn in (["http/1.1"], None):                    # http/1.1 only, or no ALPN at all
        chosen, data = await deferToThread(h1_over_tls, h2_port, cert.cert, h1_request("/api/users/4"), alpn)
        assert chosen == (alpn[0] if alpn else None)
        (r,) = parse_responses(data)
        assert r.status == 200 and r.json()["path"] == "/users/4"
    assert [r.uri for r in echo.requests] == [b"/users/1?via=curl", b"/users/2", b"/users/2", b"/users/3",
                                              b"/users/4", b"/users/4"]


# --- 2. one route, three ways -----------------------------------------------------------------

# Headers the echo upstream sees that differ per request (or per connection).
_PER_REQUEST = {"x-correlation-id", "traceparent", "x-forwarded-proto", "x-forwarded-port", "x-forwarded-for",
                "x-forwarded-host", "host", "x-request-start"}


@pytest_twisted.ensureDeferred
async def test_one_route_behaves_the_same_over_h1_h1_tls_and_h2(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]", "[http/1.1]") + routes(echo.url))
    plain, h2_port, tls_port = gw.port, await port_of(gw, 1), await port_of(gw, 2)
    cids = {way: f"cid-{way}-{uuid.uuid4().hex[:8]}" for way in ("h1", "tls", "tls-on-h2-listener", "h2")}
    path = "/api/users/7?q=a%20b&x=1"

    def headers(way: str) -> list[tuple[str, str]]:
        # Proxy-* headers belong to a client's hop to a proxy: taken out on every protocol.
        return [("x-correlation-id", cids[way]), ("accept", "application/json"),
                ("proxy-authorization", "Basic cHJveHk6c2VjcmV0"), ("proxy-x", "1")]

    answers: dict[str, Response] = {}
    (answers["h1"],) = parse_responses(await raw(plain, h1_request(path, headers("h1"))))
    _, data = await deferToThread(h1_over_tls, tls_port, cert.cert, h1_request(path, headers("tls")), ["http/1.1"])
    (answers["tls"],) = parse_responses(data)
    _, data = await deferToThread(h1_over_tls, h2_port, cert.cert, h1_request(path, headers("tls-on-h2-listener")),
                                  ["http/1.1"])
    (answers["tls-on-h2-listener"],) = parse_responses(data)
    answers["h2"] = (await h2_get(h2_port, cert.cert, path, headers("h2"))).as_response()

    seen = {}
    for way, r in answers.items():
        assert r.status == 200, (way, r.body)
        body = r.json()
        assert (body["service"], body["method"], body["path"], body["query"], body["body_bytes"]) == \
            ("echo", "GET", "/users/7", "q=a%20b&x=1", 0), way
        upstream_headers = {k.lower(): v for k, v in body["headers"].items()}
        seen[way] = upstream_headers
        assert upstream_headers["x-correlation-id"] == cids[way]
        assert upstream_headers["x-forwarded-proto"] == ("http" if way == "h1" else "https"), way
        assert upstream_headers["accept"] == "application/json"
        assert not any(name.startswith("proxy-") for name in upstream_headers), (way, upstream_headers)
        # gateway headers on the response
        assert r.header("x-correlation-id") == cids[way], way
        assert r.header("x-route") == "users", way                      # route rule: set
        assert r.header("x-powered-by") is None, way                    # route rule: remove
        assert r.header("x-internal-host") is None, way                 # X-Internal-* stripped
        assert r.header("content-type") == "application/json", way
        assert r.header("x-content-type-options") == "nosniff", way
        assert r.header("x-frame-options") is not None and r.header("referrer-policy") is not None, way
        assert r.header("strict-transport-security") == (None if way == "h1" else HSTS), way
    # The same request reached the upstream, whatever carried it.
    same = {way: {k: v for k, v in h.items() if k not in _PER_REQUEST} for way, h in seen.items()}
    assert same["h2"] == same["h1"] == same["tls"] == same["tls-on-h2-listener"], same
    # The same response headers (names and values) apart from the per-request and framing ones.
    def comparable(r: Response) -> dict[str, str]:
        return {k.lower(): v for k, v in r.headers
                if k.lower() not in {"x-correlation-id", "date", "content-length", "strict-transport-security",
                                     "connection", "transfer-encoding"}}
    assert comparable(answers["h2"]) == comparable(answers["tls"]) == comparable(answers["h1"])
    # One access-log line each, with the same route, upstream, status and path.
    await wait_for(reactor, lambda: len(gw.log) >= 4)
    by_cid = {record["correlation_id"]: record for record in gw.log}
    for way in answers:
        record = by_cid[cids[way]]
        assert (record["method"], record["path"], record["route"], record["upstream"], record["status"]) == \
            ("GET", "/api/users/7", "/api/users", "users", 200), (way, record)
        assert record["client_ip"] == "127.0.0.1" and record["error"] is None
    assert len(gw.log) == 4


# --- 3. every filter over h2 ------------------------------------------------------------------

def auth_config(secret_file: str) -> str:
    return f"""
auth:
  jwt: {{algorithms: [HS256], secret_file: {secret_file}, issuer: {ISSUER}, audience: api}}
limits: {{max_body_size: 1KiB}}
"""


FILTER_ROUTES = """  - {prefix: /api/private, upstream: users, rewrite_prefix: /private, auth: required}
  - {prefix: /api/limited, upstream: users, rate_limit: {key: ip, rate: 2/hour}}
  - {prefix: /api/guarded, upstream: guarded}
  - {prefix: /api/body, upstream: streamer, rewrite_prefix: /x/body}
  - {prefix: /api/down, upstream: down}
"""


@pytest_twisted.ensureDeferred
async def test_every_filter_applies_to_http2_requests(reactor, echo, streaming, gateway, cert, secret_file):
    gw = await gateway(listeners(cert, "[h2, http/1.1]")
                       + routes(echo.url, FILTER_ROUTES, top=auth_config(secret_file), extra_upstreams=(
                           f'  guarded: {{targets: ["{echo.url}"], circuit_breaker: {{consecutive_failures: 5}}}}\n'
                           f'  streamer: {{targets: ["{streaming.url}"]}}\n'
                           f'  down: {{targets: ["http://127.0.0.1:{free_port()}"]}}\n')))
    port = await port_of(gw, 1)
    gw.gateway.breakers.trip("guarded")
    body = bytes(range(256)) * 3 + b"end"                      # 771 bytes, every byte value
    results = await h2_requests(
        port, cert.cert,
        {"path": "/api/private/1"},                                                     # 0: no token
        {"path": "/api/private/1", "headers": [("authorization", f"Bearer {mint_token(sub='carol')}"),
                                               ("x-user-id", "forged")]},              # 1: token
        {"path": "/api/limited/a"}, {"path": "/api/limited/b"}, {"path": "/api/limited/c"},   # 2-4: burst 2
        {"path": "/api/guarded/x"},                                                     # 5: breaker open
        {"path": "/nowhere"},                                                           # 6: no route
        {"path": "/api/users/post?k=v", "method": "POST", "body": body,
         "headers": [("content-type", "application/octet-stream")]},                    # 7: body
        {"path": "/api/users/big", "method": "POST", "body": b"z" * 4096},              # 8: too large
        {"path": "/api/users/after"},                                                   # 9: still serving
        {"path": "/api/body", "method": "PUT", "body": body},                           # 10: body, byte for byte
        {"path": "/api/down/x"},                                                        # 11: upstream refuses
    )
    r = [x.as_response() for x in results]

    assert_envelope(r[0], 401, "UNAUTHORIZED")
    assert r[0].header("www-authenticate").startswith('Bearer realm="txgateway", error="invalid_request"')
    assert r[1].status == 200, r[1].body
    identity = {k.lower(): v for k, v in r[1].json()["headers"].items() if k.lower().startswith("x-user-")}
    assert identity["x-user-id"] == "carol"                    # the token's, never the client's
    assert r[1].json()["path"] == "/private/1"

    assert [x.status for x in r[2:5]] == [200, 200, 429]
    assert_envelope(r[4], 429, "RATE_LIMITED")
    assert int(r[4].header("retry-after")) >= 1
    assert r[4].header("x-ratelimit-limit") == "2" and r[4].header("x-ratelimit-remaining") == "0"
    assert r[4].header("ratelimit") is not None and r[4].header("ratelimit-policy") is not None
    assert r[2].header("x-ratelimit-remaining") == "1"

    assert_envelope(r[5], 503, "UPSTREAM_UNAVAILABLE")
    assert r[5].header("retry-after") is not None
    assert_envelope(r[6], 404, "NO_ROUTE")

    assert r[7].status == 200, r[7].body
    echoed = r[7].json()
    assert (echoed["method"], echoed["path"], echoed["query"], echoed["body_bytes"]) == ("POST", "/users/post", "k=v", 771)
    assert_envelope(r[8], 413, "PAYLOAD_TOO_LARGE")
    assert r[9].status == 200
    assert r[10].status == 200 and r[10].body == body and streaming.bodies == [body]
    assert_envelope(r[11], 502, "BAD_GATEWAY")

    paths = [req.uri for req in echo.requests]
    assert paths == [b"/private/1", b"/api/limited/a", b"/api/limited/b", b"/users/post?k=v", b"/users/after"]
    await wait_for(reactor, lambda: len(gw.log) == 12)
    assert [x["status"] for x in gw.log] == [401, 200, 200, 200, 429, 503, 404, 200, 413, 200, 200, 502]
    assert gw.log[0]["error"] == "UNAUTHORIZED" and gw.log[8]["error"] == "PAYLOAD_TOO_LARGE"
    assert gw.log[4]["rate_limit"] == "rejected" and gw.log[5]["breaker"] == "open"
    assert gw.log[1]["user_id"] == "carol"


# --- 4. streamed responses --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_streamed_responses_over_h2(reactor, streaming, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url))
    port = await port_of(gw, 1)

    slow, big = await h2_requests(port, cert.cert, {"path": "/api/users/slow"}, {"path": "/api/users/big"})
    assert streaming.started == [b"/users/slow", b"/users/big"]
    # Delayed pieces: all, in order, and each passed on before the next was written upstream.
    assert slow.status == 200 and slow.ended and slow.body == b"".join(PIECES)
    assert len(streaming.written) == len(PIECES)
    first_piece_at = next(t for t, data in slow.chunks if data)
    assert first_piece_at < streaming.written[-1] - PIECE_DELAY, "the response was not streamed"
    # 5 MiB: every byte, in order, through HTTP/2 flow control (the client's windows are 64 KiB).
    assert big.status == 200 and big.ended
    assert len(big.body) == len(BIG) and big.body == BIG
    assert big.header("content-length") is None                      # streamed, not buffered
    assert len(big.chunks) > 80
    await wait_for(reactor, lambda: len(gw.log) == 2)
    assert [(x["path"], x["status"]) for x in gw.log] == [("/api/users/slow", 200), ("/api/users/big", 200)]


@pytest_twisted.ensureDeferred
async def test_concurrent_streams_on_one_connection(reactor, streaming, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]")
                       + routes(echo.url, "  - {prefix: /stream, upstream: streamer}\n",
                                extra_upstreams=f'  streamer: {{targets: ["{streaming.url}"], timeout: 5s}}\n'))
    port = await port_of(gw, 1)

    def run() -> tuple[list[H2Result], list[H2Result]]:
        with H2Client(port, cert.cert) as client:
            streams = [client.request("/stream/big"), client.request("/stream/slow"), client.request("/stream/big")]
            echoes = [client.request(f"/api/users/{i}?n={i}") for i in range(10)]
            posts = [client.request(f"/api/users/p{i}", method="POST", body=b"%d" % i * 5000) for i in range(3)]
            return client.wait(*streams), client.wait(*echoes, *posts)

    streams, others = await deferToThread(run)
    assert [s.status for s in streams] == [200, 200, 200]
    assert streams[0].body == BIG and streams[2].body == BIG and streams[1].body == b"".join(PIECES)
    for i, r in enumerate(others[:10]):
        assert r.status == 200 and r.json()["path"] == f"/users/{i}" and r.json()["query"] == f"n={i}"
    for i, r in enumerate(others[10:]):
        assert r.status == 200 and r.json()["body_bytes"] == 5000 and r.json()["path"] == f"/users/p{i}"
    await wait_for(reactor, lambda: len(gw.log) == 16)
    assert all(x["status"] == 200 for x in gw.log)


# --- 5. a stream reset by the client ----------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_client_reset_mid_response_cancels_the_upstream_and_the_connection_goes_on(
        reactor, streaming, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]")
                       + routes(echo.url, "  - {prefix: /stream, upstream: streamer}\n",
                                extra_upstreams=f'  streamer: {{targets: ["{streaming.url}"], timeout: 5s}}\n'))
    port = await port_of(gw, 1)

    def run() -> tuple[H2Result, H2Result, list[H2Result]]:
        with H2Client(port, cert.cert) as client:
            endless = client.request("/stream/endless")
            late = client.request("/stream/late")
            client.wait(until=lambda: len(client.results[endless].chunks) >= 3)
            client.reset(endless)                               # mid-response
            client.reset(late)                                  # before the response started
            received = len(client.results[endless].body)
            time.sleep(0.3)                                     # frames already in flight may still come
            after = [client.request(f"/api/users/after{i}") for i in range(3)] + [client.request("/stream/slow")]
            results = client.wait(*after)
            assert len(client.results[endless].body) < received + 64 * 1024   # it stopped
            return client.results[endless], client.results[late], results

    endless, late, after = await deferToThread(run)
    assert endless.status == 200 and not endless.ended and late.status is None
    assert [r.status for r in after] == [200, 200, 200, 200]
    assert after[3].body == b"".join(PIECES)
    # The gateway let go of both upstream requests.
    await wait_for(reactor, lambda: set(streaming.lost) >= {b"/endless", b"/late"})
    await wait_for(reactor, lambda: len(gw.log) == 6)
    by_path = {x["path"]: x for x in gw.log}
    assert by_path["/stream/late"]["status"] == 499                 # the client went before the response
    assert by_path["/stream/endless"]["status"] in (200, 499)
    assert all(by_path[f"/api/users/after{i}"]["status"] == 200 for i in range(3))
    # Plain HTTP/1.1 and HTTP/1.1 over TLS are still served.
    (r,) = parse_responses(await raw(gw.port, h1_request("/api/users/h1")))
    assert r.status == 200 and r.json()["path"] == "/users/h1"
    _, data = await deferToThread(h1_over_tls, port, cert.cert, h1_request("/api/users/tls"), ["http/1.1"])
    (r,) = parse_responses(data)
    assert r.status == 200 and r.json()["path"] == "/users/tls"


# --- edges found while testing HTTP/2 -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_h2_access_log_counts_bytes_in_and_out(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url))
    port = await port_of(gw, 1)
    (h1,) = parse_responses(await raw(gw.port, h1_request("/api/users/1", method="POST", body=b"x" * 500)))
    (r,) = await h2_requests(port, cert.cert, {"path": "/api/users/1", "method": "POST", "body": b"x" * 500})
    assert h1.status == r.status == 200
    await wait_for(reactor, lambda: len(gw.log) == 2)
    assert (gw.log[0]["bytes_in"], gw.log[0]["bytes_out"]) == (500, len(h1.body))
    assert (gw.log[1]["bytes_in"], gw.log[1]["bytes_out"]) == (500, len(r.body))


@pytest_twisted.ensureDeferred
async def test_h2_upstream_dying_mid_body_resets_the_stream_not_ends_it(reactor, streaming, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url))
    port = await port_of(gw, 1)
    assert (await raw(gw.port, h1_request("/api/users/truncated"))).endswith(b"<RESET>")
    (r,) = await h2_requests(port, cert.cert, {"path": "/api/users/truncated"})
    assert r.status == 200 and r.body == PIECES[0]
    assert r.reset is not None and not r.ended, r


@pytest_twisted.ensureDeferred
async def test_h2_body_over_max_body_size_is_refused_before_it_is_all_buffered(reactor, echo, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url, top="limits: {max_body_size: 1KiB}\n"))
    port = await port_of(gw, 1)
    big = [("content-length", str(50 * 2**20))]
    (h1,) = parse_responses(await raw(gw.port, h1_request("/api/users/up", big, method="POST")))
    assert h1.status == 413

    def run(end: bool, size: int) -> H2Result | str:
        declared = [("content-length", str(size))] if end else big
        with H2Client(port, cert.cert) as client:
            stream = client.request("/api/users/up", method="POST", headers=declared, body=b"y" * size, end=end)
            try:
                client.wait(stream, timeout=5.0)
            except AssertionError:
                return "connection closed"
            return client.results[stream]
    # Ended: answered 413 (nothing of the body was kept). Not ended: answered 413 as soon as the
    # limit is passed, and the rest of the body is refused (RST_STREAM).
    ended = await deferToThread(run, True, 2**19)
    assert not isinstance(ended, str) and ended.status == 413, ended
    r = await deferToThread(run, False, 3 * 2**20)
    assert r == "connection closed" or (not isinstance(r, str) and r.reset is not None), r


@pytest_twisted.ensureDeferred
async def test_h2_request_waiting_for_its_upstream_outlives_idle_timeout(reactor, streaming, gateway, cert):
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(streaming.url, top="limits: {idle_timeout: 1s}\n"))
    port = await port_of(gw, 1)
    (h1,) = parse_responses(await raw(gw.port, h1_request("/api/users/pause")))
    assert (h1.status, h1.body) == (200, b"done")
    (r,) = await h2_requests(port, cert.cert, {"path": "/api/users/pause"})
    assert (r.status, r.body) == (200, b"done")


@pytest_twisted.ensureDeferred
async def test_the_cache_fields_of_a_miss_and_a_hit_over_h2(reactor, echo, gateway, cert):
    # A miss's Cache-Status and X-Cache go after the other fields (PreparedFields): once each, on h2 too.
    gw = await gateway(listeners(cert, "[h2, http/1.1]") + routes(echo.url, """  - prefix: /api/cached
    upstream: users
    cache: {ttl: 1m}
"""))
    h2_port = await port_of(gw, 1)
    miss, hit = await h2_requests(h2_port, cert.cert, {"path": "/api/cached/1"}, {"path": "/api/cached/1"})
    for answer, verdict, status in ((miss, "MISS", "txgateway; fwd=uri-miss; fwd-status=200; stored"),
                                    (hit, "HIT", "txgateway; hit; ttl=")):
        r = answer.as_response()
        assert r.status == 200
        assert [v for k, v in r.headers if k.lower() == "x-cache"] == [verdict]
        [line] = [v for k, v in r.headers if k.lower() == "cache-status"]
        assert line.startswith(status), line
        assert r.header("x-content-type-options") == "nosniff"
