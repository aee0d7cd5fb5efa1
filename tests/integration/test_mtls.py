"""Client certificates (mTLS) on a TLS listener, through real TLS handshakes over HTTP/1.1 and
HTTP/2: a valid certificate is an identity (roles, rate limits, X-User-*) and its fingerprint
goes upstream in the configured header; an expired one, one from another CA, and none on a
required listener never get a request through. The CAs and certificates are made per test
with the `cryptography` package; clients are Python's ssl module and the h2 library, in
threads with socket timeouts."""

from __future__ import annotations

import dataclasses
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from twisted.internet.threads import deferToThread

from tests.conftest import assert_envelope, parse_responses, raw
from tests.integration.test_http2 import (  # noqa: F401 (cert: a fixture)
    WAIT,
    H2Client,
    cert,
    h1_request,
    port_of,
    tls_socket,
)
from tests.test_tls_config import DAY, NOW, CertAuthority


@dataclass
class ClientCert:
    cert: str
    key: str
    fingerprint: str       # SHA-256 of the DER, lower-case hex

    @property
    def pair(self) -> tuple[str, str]:
        return self.cert, self.key


def client_cert(ca: CertAuthority, directory: Path, stem: str, cn: str | None, uri: str | None = None,
                expired: bool = False) -> ClientCert:
    """A client certificate (clientAuth) from `ca`: subject CN, optional URI SAN."""
    key = ec.generate_private_key(ec.SECP256R1())
    not_before, not_after = (NOW - 10 * DAY, NOW - 2 * DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else []))
               .issuer_name(ca.cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False))
    if uri is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                                        critical=False)
    signed = builder.sign(ca.key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert_path.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return ClientCert(str(cert_path), str(key_path),
                      hashlib.sha256(signed.public_bytes(serialization.Encoding.DER)).hexdigest())


@dataclass
class Setup:
    ca: str                                  # the client CA bundle the gateway trusts
    alice: ClientCert                        # URI SAN, listed as admin / pro
    bob: ClientCert                          # CN only, not listed: no role, no tier
    expired: ClientCert
    stranger: ClientCert                     # from another CA
    identities: str


@pytest.fixture
def clients(tmp_path: Path) -> Setup:
    ca, other = CertAuthority("clients CA"), CertAuthority("someone else's CA")
    identities = tmp_path / "client-identities.yaml"
    identities.write_text('- {id: "spiffe://example.test/alice", role: admin, tier: pro}\n')
    return Setup(ca=ca.write(tmp_path / "clients-ca.pem"),
                 alice=client_cert(ca, tmp_path, "alice", "alice.example.test", "spiffe://example.test/alice"),
                 bob=client_cert(ca, tmp_path, "bob", "bob"),
                 expired=client_cert(ca, tmp_path, "old", "old", expired=True),
                 stranger=client_cert(other, tmp_path, "mallory", "mallory"),
                 identities=str(identities))


def config(server: Any, setup: Setup, upstream_url: str) -> str:
    """listeners[1]: mTLS required (h2 and http/1.1); listeners[2]: optional."""
    tls = (f"cert: {server.cert}, key: {server.key}}}], alpn: [h2, http/1.1], client_ca: {setup.ca}, "
           f"client_cert_header: X-Client-Cert-SHA256")
    return f"""
listen:
  - endpoint: "tcp:0:interface=127.0.0.1"
  - endpoint: "tcp:0:interface=127.0.0.1"
    tls: {{certificates: [{{{tls}, client_auth: required}}
  - endpoint: "tcp:0:interface=127.0.0.1"
    tls: {{certificates: [{{{tls}, client_auth: optional}}
access_log: "off"
auth:
  client_certs: {{file: {setup.identities}}}
rate_limits:
  tiers: {{free: {{rate: 2/minute}}, pro: {{rate: 3/minute}}}}
  default_tier: free
upstreams:
  echo: {{targets: ["{upstream_url}"]}}
routes:
  - {{prefix: /api/admin, upstream: echo, roles: [admin]}}
  - {{prefix: /api/users, upstream: echo, auth: required, rate_limit: {{key: user}}}}
  - {{prefix: /api/open, upstream: echo}}
"""


def h1(port: int, server: Any, client: ClientCert | None, *requests: bytes, sni: bool = True) -> bytes | str:
    """Requests over one TLS connection presenting `client` (and SNI "localhost" unless told
    not to); the bytes back, or the TLS error."""
    try:
        with tls_socket(port, server.cert, ["http/1.1"], client.pair if client else None, sni) as sock:
            sock.sendall(b"".join(requests))
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        return f"refused: {e}"


def get(path: str, *headers: tuple[str, str], close: bool = False) -> bytes:
    request = h1_request(path, headers)
    return request if close else request.replace(b"Connection: close\r\n", b"")


def echoed(response: Any) -> dict[str, str]:
    """The request headers the echo upstream received."""
    return {k.lower(): v for k, v in response.json()["headers"].items()}


@pytest_twisted.ensureDeferred
async def test_a_valid_certificate_is_an_identity_with_roles_limits_and_the_fingerprint_header(
        reactor, echo, gateway, cert, clients):  # noqa: F811
    gw = await gateway(config(cert, clients, echo.url))
    port = await port_of(gw, 1)
    forged = ("X-Client-Cert-SHA256", "f" * 64)
    data = await deferToThread(h1, port, cert, clients.alice,
                               get("/api/admin/1", forged, ("X-User-Role", "root")),
                               get("/api/users/1"), get("/api/users/2"), get("/api/users/3"),
                               get("/api/users/4", close=True))
    assert isinstance(data, bytes), data
    admin, *limited = parse_responses(data)
    assert admin.status == 200
    seen = echoed(admin)
    assert seen["x-client-cert-sha256"] == clients.alice.fingerprint          # the client's copy is gone
    assert (seen["x-user-id"], seen["x-user-role"], seen["x-user-tier"]) == (
        "spiffe://example.test/alice", "admin", "pro")
    # The pro tier (3/minute), keyed by the certificate's user id.
    assert [r.status for r in limited] == [200, 200, 200, 429]
    assert_envelope(limited[-1], 429, "RATE_LIMITED")

    # bob: CN for the user id, not listed (no role): 403 on the admin route, served elsewhere.
    data = await deferToThread(h1, port, cert, clients.bob, get("/api/admin/1"), get("/api/users/1", close=True))
    assert isinstance(data, bytes), data
    refused, served = parse_responses(data)
    assert_envelope(refused, 403, "FORBIDDEN")
    assert served.status == 200 and echoed(served)["x-user-id"] == "bob" and "x-user-role" not in echoed(served)
    assert echoed(served)["x-client-cert-sha256"] == clients.bob.fingerprint
    # The access log names the verified identity on the 403 too.
    assert [x["user_id"] for x in gw.log] == ["spiffe://example.test/alice"] * 5 + ["bob", "bob"]


@pytest.mark.parametrize("who", ["expired", "stranger", None])
@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_another_cas_or_none_gets_no_request_through(
        reactor, echo, gateway, cert, clients, who):  # noqa: F811
    gw = await gateway(config(cert, clients, echo.url))
    port = await port_of(gw, 1)
    client = getattr(clients, who) if who else None
    outcome = await deferToThread(h1, port, cert, client, get("/api/open/1", close=True))
    assert isinstance(outcome, str) and outcome.startswith("refused"), outcome
    expected = {"expired": "CERTIFICATE_EXPIRED", "stranger": "UNKNOWN_CA", None: "CERTIFICATE_REQUIRED"}[who]
    assert expected in outcome.upper().replace(" ", "_"), outcome
    assert echo.requests == [] and gw.log == []
    # The listener goes on serving a valid certificate.
    data = await deferToThread(h1, port, cert, clients.alice, get("/api/open/1", close=True))
    assert isinstance(data, bytes) and parse_responses(data)[0].status == 200


@pytest_twisted.ensureDeferred
async def test_an_optional_listener_serves_clients_without_a_certificate_as_anonymous(
        reactor, echo, gateway, cert, clients):  # noqa: F811
    gw = await gateway(config(cert, clients, echo.url))
    port = await port_of(gw, 2)
    forged = ("X-Client-Cert-SHA256", "f" * 64)
    data = await deferToThread(h1, port, cert, None, get("/api/open/1", forged, ("Connection", "X-Client-Cert-SHA256")),
                               get("/api/users/1", close=True))
    assert isinstance(data, bytes), data
    open_, users = parse_responses(data)
    assert open_.status == 200 and "x-client-cert-sha256" not in echoed(open_)     # a forged one is removed
    assert_envelope(users, 401, "UNAUTHORIZED")
    # Naming the header in Connection (hop-by-hop) does not take the real one away either.
    data = await deferToThread(h1, port, cert, clients.alice,
                               get("/api/users/1", forged, ("Connection", "X-Client-Cert-SHA256"), close=True))
    assert isinstance(data, bytes), data
    seen = echoed(parse_responses(data)[0])
    assert (seen["x-user-tier"], seen["x-client-cert-sha256"]) == ("pro", clients.alice.fingerprint)
    # Optional still means verified: a certificate from another CA is refused.
    outcome = await deferToThread(h1, port, cert, clients.stranger, get("/api/open/1", close=True))
    assert isinstance(outcome, str) and "UNKNOWN_CA" in outcome.upper().replace(" ", "_"), outcome


@pytest_twisted.ensureDeferred
async def test_the_certificate_identity_over_http2(reactor, echo, gateway, cert, clients):  # noqa: F811
    gw = await gateway(config(cert, clients, echo.url))
    port = await port_of(gw, 1)

    def run(client: ClientCert) -> list[Any]:
        with H2Client(port, cert.cert, client.pair) as h2:
            streams = [h2.request("/api/admin/1", headers=[("x-client-cert-sha256", "f" * 64)]),
                       h2.request("/api/users/1")]
            return h2.wait(*streams, timeout=WAIT)
    admin, users = await deferToThread(run, clients.alice)
    assert (admin.status, users.status) == (200, 200)
    for result in (admin, users):
        seen = {k.lower(): v for k, v in result.json()["headers"].items()}
        assert seen["x-client-cert-sha256"] == clients.alice.fingerprint
        assert (seen["x-user-id"], seen["x-user-role"]) == ("spiffe://example.test/alice", "admin")
    forbidden, _ = await deferToThread(run, clients.bob)
    assert_envelope(forbidden.as_response(), 403, "FORBIDDEN")
    assert {x["tls"] for x in gw.log} == {"TLSv1.3 h2"}
    (r,) = parse_responses(await raw(gw.port, b"GET /api/users/1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"))
    assert_envelope(r, 401, "UNAUTHORIZED")                      # the plain listener: no certificate there


@pytest_twisted.ensureDeferred
async def test_a_rotated_client_ca_bundle_applies_to_new_handshakes_on_reload(
        reactor, echo, gateway, cert, clients, tmp_path):  # noqa: F811
    text = config(cert, clients, echo.url)
    gw = await gateway(text)
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    gw.gateway.config = dataclasses.replace(gw.gateway.config, file=str(path))
    port = await port_of(gw, 1)
    assert isinstance(await deferToThread(h1, port, cert, clients.alice, get("/api/open/1", close=True)), bytes)
    newer = CertAuthority("clients CA, rotated")
    newer.write(Path(clients.ca))                      # the same file, now only the new CA
    carol = client_cert(newer, tmp_path, "carol", "carol")
    assert gw.gateway.reload() == []
    for sni in (True, False):
        refused = await deferToThread(h1, port, cert, clients.alice, get("/api/open/1", close=True), sni=sni)
        assert isinstance(refused, str) and "UNKNOWN_CA" in refused.upper().replace(" ", "_"), refused
        served = await deferToThread(h1, port, cert, carol, get("/api/open/1", close=True), sni=sni)
        assert isinstance(served, bytes) and parse_responses(served)[0].status == 200
