"""TLS with real handshakes: listeners (SNI, minimum version, HSTS, redirect_to_https, reload,
bad input) and https upstreams (verification against a CA, the system's trust, the hostname;
verify: false; a client certificate).

Certificates are made per test with `cryptography` (tests/test_tls_config.py's CertAuthority);
clients are `openssl s_client` and Python's ssl module, run in threads (deferToThread) with
bounded timeouts so that the reactor serves meanwhile. Any traceback logged, by txgateway or by
Twisted's TLS code (the SNI callback logs under twisted.*), fails the test.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import re
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher

from tests.conftest import RecordingEcho, free_port, listen, parse_responses, quiet_site, raw, simple_config
from tests.test_tls_config import CertAuthority, Issued, listener_text, pair
from txgateway.config.schema import ConfigError, parse_config
from txgateway.service.gateway import Gateway

WAIT = 10.0                # every bounded wait in this file
LOOPBACK = "tcp:0:interface=127.0.0.1"


# --- certificates and config ----------------------------------------------------------------

@dataclass
class Certs:
    ca: CertAuthority
    ca_file: str
    a: Issued              # a.test (the default: first in the list)
    b: Issued              # b.test
    wild: Issued           # *.wild.test
    dir: Path


@pytest.fixture
def certs(tmp_path: Path) -> Certs:
    ca = CertAuthority()
    return Certs(ca, ca.write(tmp_path / "ca.pem"),
                 ca.issue(tmp_path, "a", "a.test", ("a.test",)),
                 ca.issue(tmp_path, "b", "b.test", ("b.test",), rsa_key=True),
                 ca.issue(tmp_path, "wild", "wildcard", ("*.wild.test",)),
                 tmp_path)


def tls_listener(*certificates: Issued, endpoint: str = LOOPBACK, settings: str = "") -> str:
    items = ", ".join(pair(c) for c in certificates)
    return f'  - endpoint: "{endpoint}"\n    tls: {{certificates: [{items}]{settings}}}\n'


def plain_listener(endpoint: str = LOOPBACK) -> str:
    return f'  - endpoint: "{endpoint}"\n'


def config(listeners: str, upstream_url: str, top: str = "", upstream_extra: str = "") -> str:
    """The listeners (the first is `gw.port`), no access log, /api/users -> users (/users)."""
    return "listen:\n" + listeners + 'access_log: "off"\n' + top + simple_config(upstream_url, upstream_extra=upstream_extra)


async def port_of(gw: Any, index: int) -> int:
    return (await gw.gateway.listeners[index]._waitingForPort).getHost().port


# --- log capture ------------------------------------------------------------------------------

@dataclass
class Events:
    lines: list[str]
    failures: list[str]

    def matching(self, fragment: str) -> list[str]:
        return [line for line in self.lines if fragment in line]


@pytest.fixture
def events() -> Any:
    """Every log line of the test (any namespace); a logged traceback fails it."""
    captured = Events([], [])

    def observe(event: dict[str, Any]) -> None:
        captured.lines.append(formatEvent(event))
        failure = event.get("log_failure") or (event.get("failure") if event.get("isError") else None)
        if failure is not None:
            captured.failures.append(formatEvent(event) + "\n" + failure.getTraceback())
    globalLogPublisher.addObserver(observe)
    yield captured
    globalLogPublisher.removeObserver(observe)
    assert not captured.failures, "\n".join(captured.failures)


# --- clients ----------------------------------------------------------------------------------

def s_client(port: int, *args: str) -> str:
    """`openssl s_client` to 127.0.0.1:port, stdin closed (handshake, then quit): its output."""
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", *args],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=WAIT, check=False)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")


async def served_cn(port: int, *args: str) -> str | None:
    """The subject CN of the certificate the server sent, None if there was none."""
    out = await deferToThread(s_client, port, *args)
    found = re.search(r"^subject=.*?CN ?= ?([^,/\n]+)", out, re.M)
    return found.group(1).strip() if found else None


def client_context(cafile: str) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=cafile)


def https_connection(port: int, sni: str, cafile: str) -> http.client.HTTPSConnection:
    """An open (handshaken) keep-alive connection to 127.0.0.1:port with SNI `sni`, verified
    against `cafile`; requests carry `Host: sni:port`."""
    context = client_context(cafile)
    conn = http.client.HTTPSConnection(sni, port, context=context, timeout=WAIT)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT), server_hostname=sni)
    return conn


@dataclass
class HttpsResult:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    peer_serial: int


def exchange(conn: http.client.HTTPSConnection, path: str, close: bool = False) -> HttpsResult:
    """One request on `conn` (kept open unless `close`)."""
    der = conn.sock.getpeercert(binary_form=True)
    conn.request("GET", path, headers={"Connection": "close"} if close else {})
    resp = conn.getresponse()
    body = resp.read()
    return HttpsResult(resp.status, resp.msg, body, x509.load_der_x509_certificate(der).serial_number)


def https_get(port: int, path: str, sni: str, cafile: str) -> HttpsResult:
    conn = https_connection(port, sni, cafile)
    try:
        return exchange(conn, path, close=True)
    finally:
        conn.close()


def closed_without_answer(port: int, data: bytes, read_timeout: float = 5.0) -> tuple[bool, bytes]:
    """Send `data`, then read: (closed by the server before read_timeout, bytes received)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        if data:
            s.sendall(data)
        received = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return True, received
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            return True, received
        except TimeoutError:
            return False, received


def client_hello(server_name: bytes) -> bytes:
    """A TLS 1.2 ClientHello (ECDHE + AES-GCM) whose SNI is `server_name`, whatever its length:
    clients refuse to send names over 255 bytes, so this one is written by hand."""
    def vector(data: bytes, size: int = 2) -> bytes:
        return len(data).to_bytes(size, "big") + data

    def extension(kind: int, data: bytes) -> bytes:
        return kind.to_bytes(2, "big") + vector(data)

    extensions = (extension(0, vector(b"\x00" + vector(server_name)))          # server_name
                  + extension(10, vector(bytes.fromhex("001d0017")))            # x25519, P-256
                  + extension(11, b"\x01\x00")                                  # uncompressed points
                  + extension(13, vector(bytes.fromhex("040308040401"))))       # signature algorithms
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + vector(bytes.fromhex("c02bc02fc02cc030"))
            + b"\x01\x00" + vector(extensions))
    handshake = b"\x01" + vector(body, 3)
    return b"\x16\x03\x01" + vector(handshake)


def one_request(path: str = "/api/users/1", host: str = "api.test") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()


async def wait_for(reactor: Any, predicate: Callable[[], Any], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for {what}"
        await deferLater(reactor, 0.02, lambda: None)


async def serves_over_tls(port: int, certs: Certs) -> None:
    result = await deferToThread(https_get, port, "/api/users/ok", "a.test", certs.ca_file)
    assert result.status == 200, result.body


# --- upstreams --------------------------------------------------------------------------------

@dataclass
class HttpsUpstream:
    port: int
    seen: list[Any]

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"


@pytest_twisted.async_yield_fixture()
async def https_upstream(reactor: Any) -> Any:
    """Factory: `await https_upstream(issued, client_ca=None)` -> an echo over TLS on
    127.0.0.1 with that certificate; with client_ca it requires a client certificate it signed."""
    ports: list[Any] = []

    async def start(issued: Issued, client_ca: CertAuthority | None = None) -> HttpsUpstream:
        with open(issued.cert, "rb") as c, open(issued.key, "rb") as k:
            identity = PrivateCertificate.loadPEM(c.read() + k.read())
        options = identity.options(Certificate.loadPEM(client_ca.pem)) if client_ca else identity.options()
        seen: list[Any] = []
        site = quiet_site(RecordingEcho("secure", seen))
        port = await SSL4ServerEndpoint(reactor, 0, options, interface="127.0.0.1").listen(site)
        ports.append(port)
        return HttpsUpstream(port.getHost().port, seen)

    yield start
    for port in ports:
        await port.stopListening()


def hsts_upstream_factory() -> Factory:
    """An upstream that sets its own Strict-Transport-Security (mixed case, as servers write it)."""
    class Answer(Protocol):
        buffer = b""

        def dataReceived(self, data: bytes) -> None:
            self.buffer += data
            if b"\r\n\r\n" in self.buffer:
                self.buffer = b""
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                     b"Strict-Transport-Security: max-age=60; includeSubDomains\r\n\r\nok")
    return Factory.forProtocol(Answer)


# --- SNI and versions -------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_sni_chooses_the_certificate_by_name_and_falls_back_to_the_first(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a, certs.b, certs.wild), echo.url))
    assert await served_cn(gw.port, "-servername", "a.test") == "a.test"
    assert await served_cn(gw.port, "-servername", "b.test") == "b.test"
    assert await served_cn(gw.port, "-servername", "B.TEST") == "b.test"
    assert await served_cn(gw.port, "-servername", "x.wild.test") == "wildcard"
    assert await served_cn(gw.port, "-servername", "zzz.test") == "a.test"
    assert await served_cn(gw.port, "-servername", "wild.test") == "a.test"      # *.wild.test is one label deep
    assert await served_cn(gw.port, "-noservername") == "a.test"
    long_name = ".".join(["x" * 62] * 4)                                         # 251 characters: valid, unknown
    assert await served_cn(gw.port, "-servername", long_name) == "a.test"
    out = await deferToThread(s_client, gw.port, "-servername", "b.test", "-alpn", "h2,http/1.1")
    assert "ALPN protocol: http/1.1" in out, out
    await serves_over_tls(gw.port, certs)


@pytest_twisted.ensureDeferred
async def test_old_protocol_versions_are_refused_in_the_handshake(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a) + tls_listener(certs.a, settings=', min_version: "1.3"'), echo.url))
    strict = await port_of(gw, 1)
    # The client could speak TLS 1.1 (SECLEVEL=0): the refusal is the server's protocol_version alert.
    refused = await deferToThread(s_client, gw.port, "-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0", "-servername", "a.test")
    assert "alert protocol version" in refused and "subject=" not in refused, refused
    accepted = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", "a.test", "-brief")
    assert "Protocol version: TLSv1.2" in accepted, accepted
    refused = await deferToThread(s_client, strict, "-tls1_2", "-servername", "a.test")
    assert "alert protocol version" in refused and "subject=" not in refused, refused
    accepted = await deferToThread(s_client, strict, "-tls1_3", "-servername", "a.test", "-brief")
    assert "Protocol version: TLSv1.3" in accepted, accepted
    await serves_over_tls(strict, certs)


@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_is_served_and_warned_about_at_start(events, echo, gateway, certs):
    old = certs.ca.issue(certs.dir, "old", "old.test", ("old.test",), expired=True)
    gw = await gateway(config(tls_listener(certs.a, old), echo.url))
    assert events.matching(f"tls: {old.cert} expired on ")
    assert await served_cn(gw.port, "-servername", "old.test") == "old.test"


# --- requests over TLS, HSTS --------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_request_over_tls_is_proxied_with_forwarded_proto_https_and_hsts(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a, settings=", hsts_max_age: 1d") + plain_listener(), echo.url))
    result = await deferToThread(https_get, gw.port, "/api/users/7?x=1", "a.test", certs.ca_file)
    assert result.status == 200, result.body
    assert result.peer_serial == certs.a.serial
    assert result.headers.get_all("Strict-Transport-Security") == ["max-age=86400"]
    (request,) = echo.requests
    assert request.uri == b"/users/7?x=1"
    assert request.getHeader(b"x-forwarded-proto") == b"https"
    # The gateway's own answers over TLS carry it too.
    missing = await deferToThread(https_get, gw.port, "/nowhere", "a.test", certs.ca_file)
    assert missing.status == 404
    assert missing.headers.get_all("Strict-Transport-Security") == ["max-age=86400"]
    # Plain HTTP on the other listener: no HSTS (RFC 6797 §7.2), X-Forwarded-Proto http.
    (plain,) = parse_responses(await raw(await port_of(gw, 1), one_request("/api/users/8")))
    assert plain.status == 200
    assert plain.header("strict-transport-security") is None
    assert echo.requests[-1].getHeader(b"x-forwarded-proto") == b"http"


@pytest_twisted.ensureDeferred
async def test_the_upstreams_own_hsts_is_kept_not_doubled(reactor, events, gateway, certs):
    upstream = await listen(reactor, hsts_upstream_factory())
    try:
        gw = await gateway(config(tls_listener(certs.a), f"http://127.0.0.1:{upstream.getHost().port}"))
        result = await deferToThread(https_get, gw.port, "/api/users/1", "a.test", certs.ca_file)
        assert result.status == 200 and result.body == b"ok"
        assert result.headers.get_all("Strict-Transport-Security") == ["max-age=60; includeSubDomains"]
    finally:
        await upstream.stopListening()


@pytest_twisted.ensureDeferred
async def test_hsts_max_age_zero_sends_none(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a, settings=", hsts_max_age: 0s"), echo.url))
    result = await deferToThread(https_get, gw.port, "/api/users/1", "a.test", certs.ca_file)
    assert result.status == 200
    assert result.headers.get_all("Strict-Transport-Security") is None


# --- redirect_to_https --------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_a_plain_listener_redirects_to_the_tls_port_with_308(events, echo, gateway, certs):
    tls_port = free_port()
    gw = await gateway(config(plain_listener() + tls_listener(certs.a, endpoint=f"tcp:{tls_port}:interface=127.0.0.1"),
                              echo.url, top="redirect_to_https: true\n"))
    # To a name the https listener's certificate is for (a.test): never to any name a Host says.
    (r,) = parse_responses(await raw(gw.port, one_request("/api/users/7?a=1&b=%20", host=f"a.test:{gw.port}")))
    assert r.status == 308
    assert r.header("location") == f"https://a.test:{tls_port}/api/users/7?a=1&b=%20"
    assert not echo.requests, "a redirect is not proxied"
    # Any path, any method: the same URL over https (308 keeps the method and the body).
    post = b"POST /other HTTP/1.1\r\nHost: a.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    (r,) = parse_responses(await raw(gw.port, post))
    assert (r.status, r.header("location")) == (308, f"https://a.test:{tls_port}/other")
    # The https side serves.
    await serves_over_tls(tls_port, certs)
    assert len(echo.requests) == 1


# --- upstream TLS ---------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_https_upstream_verified_against_the_configured_ca(events, https_upstream, gateway, certs):
    up = await https_upstream(certs.ca.issue(certs.dir, "localhost", "localhost", ("localhost",)))
    gw = await gateway(config(plain_listener(), up.url, upstream_extra=f", tls: {{ca: {certs.ca_file}}}"))
    (r,) = parse_responses(await raw(gw.port, one_request("/api/users/5")))
    assert r.status == 200, r.body
    assert r.json()["path"] == "/users/5"
    assert r.json()["headers"]["Host"] == f"localhost:{up.port}"


@pytest_twisted.ensureDeferred
async def test_an_https_upstream_with_an_unknown_ca_is_a_502_saying_why(events, https_upstream, gateway, certs):
    up = await https_upstream(certs.ca.issue(certs.dir, "localhost", "localhost", ("localhost",)))
    gw = await gateway(config(plain_listener(), up.url))                 # the system's trust store
    (r,) = parse_responses(await raw(gw.port, one_request()))
    assert r.status == 502, r.body
    assert not up.seen
    assert gw.log[-1]["status"] == 502
    assert events.matching("upstream TLS failed: certificate verify failed"), events.lines


@pytest_twisted.ensureDeferred
async def test_an_https_upstream_with_another_hostname_is_a_502(events, https_upstream, gateway, certs):
    up = await https_upstream(certs.ca.issue(certs.dir, "other", "other.test", ("other.test",)))
    gw = await gateway(config(plain_listener(), up.url, upstream_extra=f", tls: {{ca: {certs.ca_file}}}"))
    (r,) = parse_responses(await raw(gw.port, one_request()))
    assert r.status == 502, r.body
    assert not up.seen, "no request may be sent to a server that failed verification"


@pytest_twisted.ensureDeferred
async def test_verify_false_reaches_any_server_and_is_warned_about_at_start(events, https_upstream, gateway, certs):
    stranger = CertAuthority("someone else's CA")
    up = await https_upstream(stranger.issue(certs.dir, "other", "other.test", ("other.test",)))
    gw = await gateway(config(plain_listener(), up.url, upstream_extra=", tls: {verify: false}"))
    assert events.matching("upstream users: TLS certificates are NOT verified (tls.verify: false)")
    (r,) = parse_responses(await raw(gw.port, one_request()))
    assert r.status == 200, r.body


@pytest_twisted.ensureDeferred
async def test_a_client_certificate_for_an_upstream_that_requires_one(events, https_upstream, gateway, certs):
    up = await https_upstream(certs.ca.issue(certs.dir, "localhost", "localhost", ("localhost",)), client_ca=certs.ca)
    client = certs.ca.issue(certs.dir, "client", "gateway.test")
    with_cert = f", tls: {{ca: {certs.ca_file}, cert: {client.cert}, key: {client.key}}}"
    gw = await gateway(config(plain_listener(), up.url, upstream_extra=with_cert))
    (r,) = parse_responses(await raw(gw.port, one_request()))
    assert r.status == 200, r.body
    peer = up.seen[0].transport.getPeerCertificate()
    assert peer.get_subject().commonName == "gateway.test"
    gw2 = await gateway(config(plain_listener(), up.url, upstream_extra=f", tls: {{ca: {certs.ca_file}}}"))
    (r,) = parse_responses(await raw(gw2.port, one_request()))
    assert r.status == 502, r.body
    assert len(up.seen) == 1


# --- reload ---------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_reload_serves_new_certificates_to_new_handshakes_and_keeps_open_connections(
        events, echo, gateway, certs):
    text = config(tls_listener(certs.a, certs.b), echo.url)
    gw = await gateway(text)
    path = certs.dir / "gateway.yaml"
    path.write_text(text)
    gw.gateway.config = dataclasses.replace(gw.gateway.config, file=str(path))
    old = await deferToThread(https_connection, gw.port, "a.test", certs.ca_file)
    try:
        first = await deferToThread(exchange, old, "/api/users/1")
        assert (first.status, first.peer_serial) == (200, certs.a.serial)

        renewed = certs.ca.issue(certs.dir, "a", "a-renewed.test", ("a.test",), serial=certs.a.serial + 1)
        assert renewed.cert == certs.a.cert and renewed.key == certs.a.key      # the same files, rewritten
        assert gw.gateway.reload() == []

        assert await served_cn(gw.port, "-servername", "a.test") == "a-renewed.test"
        assert await served_cn(gw.port, "-noservername") == "a-renewed.test"
        assert await served_cn(gw.port, "-servername", "b.test") == "b.test"
        fresh = await deferToThread(https_get, gw.port, "/api/users/2", "a.test", certs.ca_file)
        assert (fresh.status, fresh.peer_serial) == (200, renewed.serial)

        second = await deferToThread(exchange, old, "/api/users/3", True)     # keep-alive, after the reload
        assert (second.status, second.peer_serial) == (200, certs.a.serial)
    finally:
        old.close()
    assert [r.uri for r in echo.requests] == [b"/users/1", b"/users/2", b"/users/3"]


# --- bad input --------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_garbage_and_plain_http_on_the_tls_port_are_closed(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a), echo.url))
    for data in (b"\x00\xff garbage \x16\x03" * 50, os.urandom(4096), one_request()):
        closed, received = await deferToThread(closed_without_answer, gw.port, data)
        assert closed, data[:20]
        assert b"HTTP/" not in received
    assert not echo.requests
    await serves_over_tls(gw.port, certs)


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_handshakes_is_dropped_at_header_timeout(reactor, events, echo, gateway, certs):
    clock = Clock()
    gw = await gateway(config(tls_listener(certs.a), echo.url, top="limits: {header_timeout: 1s}\n"), clock=clock)
    tls_factory = gw.gateway.factories[1]
    pending = deferToThread(closed_without_answer, gw.port, b"", 5.0)
    await wait_for(reactor, lambda: tls_factory.connections, "the TLS connection")
    clock.advance(0.5)
    await deferLater(reactor, 0.1, lambda: None)
    assert not pending.called, "dropped too early"
    clock.advance(0.7)
    closed, received = await pending
    assert closed and received == b""
    await wait_for(reactor, lambda: not tls_factory.connections, "the connection to be forgotten")


@pytest_twisted.ensureDeferred
async def test_an_sni_name_of_300_characters_is_refused_cleanly(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a, certs.b), echo.url))
    closed, received = await deferToThread(closed_without_answer, gw.port, client_hello(b"x" * 300))
    # Either a fatal alert (record type 21) or a ServerHello with the default certificate.
    if received[:1] == b"\x15":
        assert closed
    else:
        assert received[:1] == b"\x16" and certs.a.der in received, received[:64]
    # A valid but unknown 255-byte name gets the default certificate.
    closed, received = await deferToThread(closed_without_answer, gw.port,
                                           client_hello(b".".join([b"y" * 63] * 4)), 1.0)
    assert received[:1] == b"\x16" and certs.a.der in received, received[:64]
    await serves_over_tls(gw.port, certs)


# --- stop --------------------------------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_an_idle_tls_connection_is_closed_when_the_gateway_stops(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a), echo.url))
    conn = await deferToThread(https_connection, gw.port, "a.test", certs.ca_file)
    try:
        assert (await deferToThread(exchange, conn, "/api/users/1")).status == 200      # kept alive
        gw.gateway.config = dataclasses.replace(gw.gateway.config, drain_timeout=0.0)
        await gw.gateway.stopService()
        assert await deferToThread(conn.sock.recv, 1) == b"", "closed (TLS close_notify, then EOF)"
    finally:
        conn.close()


# --- edges found while testing TLS -------------------------------------------------------------
@pytest_twisted.ensureDeferred
async def test_bug_hostname_mismatch_is_logged_as_a_tls_failure(events, https_upstream, gateway, certs):
    up = await https_upstream(certs.ca.issue(certs.dir, "other", "other.test", ("other.test",)))
    gw = await gateway(config(plain_listener(), up.url, upstream_extra=f", tls: {{ca: {certs.ca_file}}}"))
    (r,) = parse_responses(await raw(gw.port, one_request()))
    assert r.status == 502
    assert gw.log[-1]["detail"].startswith("upstream TLS failed:"), gw.log[-1]["detail"]


@pytest_twisted.ensureDeferred
async def test_a_min_version_change_waits_for_a_restart_and_says_so(events, echo, gateway, certs):
    """The version range is fixed in the listener's TLS options when it starts: a reload keeps
    the running value and warns, rather than seeming to apply it."""
    text = config(tls_listener(certs.a), echo.url)
    gw = await gateway(text)
    path = certs.dir / "gateway.yaml"
    path.write_text(text.replace("]}\n", '], min_version: "1.3"}\n', 1))
    gw.gateway.config = dataclasses.replace(gw.gateway.config, file=str(path))
    assert gw.gateway.reload() == []
    assert gw.gateway.config.listen[0].tls.min_version == "1.2"
    assert events.matching("reload: listen[0].tls.min_version changed; that needs a restart")
    out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", "a.test")
    assert "alert protocol version" not in out, out


@pytest_twisted.ensureDeferred
async def test_bug_hsts_max_age_change_applies_on_reload(events, echo, gateway, certs):
    text = config(tls_listener(certs.a, settings=", hsts_max_age: 1d"), echo.url)
    gw = await gateway(text)
    path = certs.dir / "gateway.yaml"
    path.write_text(text.replace("hsts_max_age: 1d", "hsts_max_age: 2d"))
    gw.gateway.config = dataclasses.replace(gw.gateway.config, file=str(path))
    assert gw.gateway.reload() == []
    result = await deferToThread(https_get, gw.port, "/api/users/1", "a.test", certs.ca_file)
    assert result.headers.get_all("Strict-Transport-Security") == ["max-age=172800"]


def _open_after_308(port):
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 308")
    return s


def _closed_within(s, seconds):
    s.settimeout(seconds)
    try:
        return s.recv(65536) == b""
    except TimeoutError:
        return False
    finally:
        s.close()


@pytest_twisted.ensureDeferred
async def test_bug_redirect_connections_are_closed_at_stop(reactor, events, echo, gateway, certs):
    from tests.conftest import free_port
    gw = await gateway(config(plain_listener() + tls_listener(certs.a, endpoint=f"tcp:{free_port()}:interface=127.0.0.1"),
                              echo.url, top="redirect_to_https: true\n"))
    s = await deferToThread(_open_after_308, gw.port)
    gw.gateway.config = dataclasses.replace(gw.gateway.config, drain_timeout=0.0)
    await gw.gateway.stopService()
    assert await deferToThread(_closed_within, s, 3.0), "the keep-alive connection of the redirecting listener stays open"


@pytest.mark.parametrize("endpoint", ["tcp:port=8443:interface=127.0.0.1", "tcp:0:interface=127.0.0.1"])
@pytest_twisted.ensureDeferred
async def test_bug_redirect_location_port_for_keyword_and_ephemeral_endpoints(events, echo, gateway, certs, endpoint):
    gw = await gateway(config(plain_listener() + tls_listener(certs.a, endpoint=endpoint),
                              echo.url, top="redirect_to_https: true\n"))
    tls_port = (await gw.gateway.listeners[1]._waitingForPort).getHost().port
    (r,) = parse_responses(await raw(gw.port, one_request("/x", host="a.test")))
    assert r.header("location") == f"https://a.test:{tls_port}/x"


def test_bug_unquoted_min_version_is_refused_with_a_nonsense_message(tmp_path):
    good = CertAuthority().issue(tmp_path, "g", "g.test", ("g.test",))
    tls = parse_config(listener_text(f"certificates: [{pair(good)}]\nmin_version: 1.3\n"), "c.yaml").listen[0].tls
    assert tls.min_version == "1.3"


def test_bug_a_san_label_over_63_characters_crashes_the_gateway(tmp_path):
    from twisted.internet import reactor
    long = CertAuthority().issue(tmp_path, "long", "long", ("x" * 64 + ".test", "ok.test"))
    config_ = parse_config(listener_text(f"certificates: [{pair(long)}]\n").replace('"tcp:8443"', '"tcp:0"'), "c.yaml")
    Gateway(config_, reactor)      # UnicodeError from txgateway/transport/tls.py:81


@pytest.mark.parametrize("what", ["junk cert", "mismatched key", "junk ca"])
def test_bug_upstream_client_certificate_and_ca_are_not_checked_at_load(tmp_path, what):
    ca = CertAuthority()
    client, other = ca.issue(tmp_path, "client", "client"), ca.issue(tmp_path, "other", "other")
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    tls = {"junk cert": f"cert: {junk}, key: {client.key}", "mismatched key": f"cert: {client.cert}, key: {other.key}",
           "junk ca": f"ca: {junk}"}[what]
    text = ('listen:\n  - endpoint: "tcp:0"\nupstreams:\n'
            f'  u: {{targets: ["https://localhost:1"], tls: {{{tls}}}}}\nroutes:\n  - {{prefix: /, upstream: u}}\n')
    with pytest.raises(ConfigError):
        parse_config(text, "c.yaml")


def _open_after_any(port):
    import socket
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 ")
    return s


@pytest_twisted.ensureDeferred
async def test_control_plain_connections_are_closed_at_stop(reactor, events, echo, gateway, certs):
    gw = await gateway(config(plain_listener() + tls_listener(certs.a), echo.url))
    s = await deferToThread(_open_after_any, gw.port)
    gw.gateway.config = dataclasses.replace(gw.gateway.config, drain_timeout=0.0)
    await gw.gateway.stopService()
    assert await deferToThread(_closed_within, s, 3.0)


# --- the lean TLS transport (tls._TLSProtocol) ------------------------------------------------

def records_in_one_write(port: int, cafile: str, requests: list[bytes]) -> bytes:
    """Each request encrypted as its own TLS record, all records sent in one `sendall` (so the
    gateway reads them in one piece), then everything the gateway sends until it closes."""
    context = client_context(cafile)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="a.test")
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as s:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outgoing.read())
                incoming.write(s.recv(65536))
        s.sendall(outgoing.read())
        for request in requests:
            tls.write(request)                 # a record each
        s.sendall(outgoing.read())
        received = b""
        while True:
            data = s.recv(65536)
            if not data:
                incoming.write_eof()
            else:
                incoming.write(data)
            try:
                while chunk := tls.read(65536):
                    received += chunk
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                pass
            return received             # the server's close_notify, or its EOF


@pytest_twisted.ensureDeferred
async def test_records_that_arrive_together_are_all_read(events, echo, gateway, certs):
    # One read from the socket holds three records: each must reach HTTP/1.1, not only the first.
    gw = await gateway(config(tls_listener(certs.a), echo.url))
    requests = [f"GET /api/users/{n} HTTP/1.1\r\nHost: a.test\r\n\r\n".encode() for n in (1, 2)] + [one_request("/api/users/3")]
    answers = parse_responses(await deferToThread(records_in_one_write, gw.port, certs.ca_file, requests))
    assert [a.status for a in answers] == [200, 200, 200]
    assert [r.uri for r in echo.requests] == [b"/users/1", b"/users/2", b"/users/3"]


@pytest_twisted.ensureDeferred
async def test_a_response_larger_than_a_record_arrives_whole(events, raw_upstream, gateway, certs):
    body = bytes(range(256)) * 1200       # 300 KiB: many records, more than a socket takes at once
    upstream = await raw_upstream(lambda peer, data: peer.transport.write(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)) if b"\r\n\r\n" in data else None)
    gw = await gateway(config(tls_listener(certs.a), upstream.url))
    result = await deferToThread(https_get, gw.port, "/api/users/big", "a.test", certs.ca_file)
    assert result.status == 200
    assert result.body == body


def keep_alive_then_close_notify(port: int, cafile: str, paths: list[str], alpn: list[str]) -> tuple[list[int], bytes]:
    """Requests on one connection offering `alpn`, then the client's close_notify: the statuses,
    and what the socket gives after the gateway's close_notify (b"": its TCP close)."""
    context = client_context(cafile)
    context.set_alpn_protocols(alpn)
    conn = http.client.HTTPSConnection("a.test", port, context=context, timeout=WAIT)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=WAIT), server_hostname="a.test")
    statuses = [exchange(conn, path).status for path in paths]
    plain = conn.sock.unwrap()        # sends close_notify, returns once the gateway's came back
    try:
        return statuses, plain.recv(100)
    finally:
        plain.close()


@pytest_twisted.ensureDeferred
async def test_keep_alive_after_alpn_then_close_notify_is_answered_and_closed(events, echo, gateway, certs):
    # After the handshake the compiled data path (tlsbio.DataPath) carries the requests, to the
    # HTTP/1.1 protocol ALPN put in place after the first one; the client's close_notify goes
    # back to Twisted's TLS code, which answers it and closes.
    gw = await gateway(config(tls_listener(certs.a, settings=", alpn: [h2, http/1.1]"), echo.url))
    paths = [f"/api/users/{n}" for n in (1, 2, 3)]
    statuses, after = await deferToThread(keep_alive_then_close_notify, gw.port, certs.ca_file, paths, ["http/1.1"])
    assert statuses == [200, 200, 200]
    assert [r.uri for r in echo.requests] == [b"/users/1", b"/users/2", b"/users/3"]
    assert after == b""


def renegotiate_tls12(port: int, cafile: str) -> tuple[str, float]:
    """`openssl s_client -tls1_2` asking to renegotiate (its `R` command) on an established
    connection: its output, and the seconds until it ended."""
    started = time.monotonic()
    proc = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-tls1_2", "-servername", "a.test",
                           "-CAfile", cafile], input=b"R\n", capture_output=True, timeout=WAIT, check=False)
    return proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace"), time.monotonic() - started


@pytest_twisted.ensureDeferred
async def test_a_tls12_renegotiation_is_refused_at_once(events, echo, gateway, certs):
    # Refused (OP_NO_RENEGOTIATION) and said at once: the refusal OpenSSL writes while the data
    # path reads is sent then, not left for a response that never comes.
    gw = await gateway(config(tls_listener(certs.a), echo.url))
    out, seconds = await deferToThread(renegotiate_tls12, gw.port, certs.ca_file)
    assert "RENEGOTIATING" in out
    assert "no renegotiation" in out
    assert seconds < WAIT / 2
