"""TLS listener defaults (txgateway/transport/tls.py): only ECDHE + AEAD suites in TLS 1.2,
session resumption (cache and tickets) whose ticket keys rotate, an optional stapled OCSP
response (tls.certificates[].ocsp) checked at load.

Clients: `openssl s_client` in threads (bounded), as in test_tls.py, whose fixtures this reuses.
"""

from __future__ import annotations

import datetime
import re
import socket
import ssl
from pathlib import Path

import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from twisted.internet.threads import deferToThread

from tests.integration.test_tls import WAIT, certs, config, events, s_client, serves_over_tls, tls_listener
from tests.test_tls_config import CERTS, CertAuthority, Issued, errors, listener_text, pair
from txgateway.config.schema import parse_config

__all__ = ["certs", "events"]  # the fixtures


def ocsp_response(ca: CertAuthority, issued: Issued, path: Path) -> str:
    """A `good` OCSP response for `issued`, signed by its CA, written as DER to `path`."""
    cert = x509.load_pem_x509_certificate(Path(issued.cert).read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    builder = (ocsp.OCSPResponseBuilder()
               .add_response(cert=cert, issuer=ca.cert, algorithm=hashes.SHA1(), cert_status=ocsp.OCSPCertStatus.GOOD,
                             this_update=now, next_update=now + datetime.timedelta(days=1),
                             revocation_time=None, revocation_reason=None)
               .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert))
    path.write_bytes(builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))
    return str(path)


def negotiated(out: str) -> str | None:
    found = re.search(r"Cipher is (\S+)", out) or re.search(r"Ciphersuite: (\S+)", out)
    return found.group(1) if found and found.group(1) != "(NONE)" else None


@pytest_twisted.ensureDeferred
async def test_tls12_offers_only_ecdhe_with_aead_ciphers(events, echo, gateway, certs):
    gw = await gateway(config(tls_listener(certs.a, certs.b), echo.url))
    # b.test has an RSA key: static RSA key exchange would be possible with it, and refused.
    for name, suite in [("b.test", "AES128-GCM-SHA256"), ("b.test", "AES256-SHA256"), ("b.test", "AES128-SHA"),
                        ("b.test", "ECDHE-RSA-AES128-SHA"), ("b.test", "ECDHE-RSA-AES256-SHA384"),
                        ("a.test", "ECDHE-ECDSA-AES128-SHA256"), ("a.test", "ECDHE-ECDSA-AES256-SHA")]:
        out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", name, "-cipher", suite)
        assert negotiated(out) is None and "handshake failure" in out, (suite, out)
    for name, suite in [("b.test", "ECDHE-RSA-AES128-GCM-SHA256"), ("b.test", "ECDHE-RSA-CHACHA20-POLY1305"),
                        ("a.test", "ECDHE-ECDSA-AES256-GCM-SHA384")]:
        out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", name, "-cipher", suite)
        assert negotiated(out) == suite, (suite, out)
    out = await deferToThread(s_client, gw.port, "-tls1_3", "-servername", "a.test", "-brief")
    assert negotiated(out) in ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256", "TLS_CHACHA20_POLY1305_SHA256")
    await serves_over_tls(gw.port, certs)


def resumed(out: str) -> tuple[int, int]:
    """(new, reused) handshakes in `openssl s_client -reconnect` output."""
    return len(re.findall(r"^New, ", out, re.M)), len(re.findall(r"^Reused, ", out, re.M))


def tls13_resumed(port: int, cafile: str) -> list[bool]:
    """Three TLS 1.3 connections, each offering the session of the one before: resumed each?"""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    session, out = None, []
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw_sock, \
                context.wrap_socket(raw_sock, server_hostname="a.test", session=session) as sock:
            sock.sendall(b"GET /api/users/1 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
            while sock.recv(65536):
                pass
            out.append(sock.session_reused)
            session = sock.session
    return out


@pytest_twisted.ensureDeferred
async def test_sessions_are_resumed_by_ticket_and_by_cache_and_tickets_rotate(events, echo, gateway, certs, tmp_path):
    gw = await gateway(config(tls_listener(certs.a, certs.b), echo.url))
    for args in (["-tls1_2"], ["-tls1_2", "-no_ticket"], ["-tls1_2", "-servername", "b.test"]):
        out = await deferToThread(s_client, gw.port, "-reconnect", "-servername", "a.test", *args)
        assert resumed(out) == (1, 5), (args, out)
    # TLS 1.3 tickets come after the handshake (s_client -reconnect leaves before): Python's ssl.
    assert await deferToThread(tls13_resumed, gw.port, certs.ca_file) == [False, True, True]
    # A ticket from before a rotation of the keys is no longer accepted: a full handshake.
    session = str(tmp_path / "session.pem")
    out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", "a.test", "-sess_out", session)
    assert "New, " in out
    out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", "a.test", "-sess_in", session)
    assert "Reused, " in out, out
    for tls in gw.gateway.server_tls.values():
        tls.rotate()
    out = await deferToThread(s_client, gw.port, "-tls1_2", "-servername", "a.test", "-sess_in", session)
    assert "New, " in out and "Reused, " not in out, out
    await serves_over_tls(gw.port, certs)


@pytest_twisted.ensureDeferred
async def test_a_configured_ocsp_response_is_stapled(events, echo, gateway, certs):
    response = ocsp_response(certs.ca, certs.a, certs.dir / "a.ocsp")
    item = f"{{cert: {certs.a.cert}, key: {certs.a.key}, ocsp: {response}}}"
    gw = await gateway("listen:\n" + f'  - endpoint: "tcp:0:interface=127.0.0.1"\n'
                       f"    tls: {{certificates: [{item}, {pair(certs.b)}]}}\n"
                       + config("", echo.url).removeprefix("listen:\n"))
    out = await deferToThread(s_client, gw.port, "-servername", "a.test", "-status")
    assert "OCSP Response Status: successful" in out and "Cert Status: good" in out, out
    out = await deferToThread(s_client, gw.port, "-servername", "b.test", "-status")
    assert "OCSP response: no response sent" in out, out
    await serves_over_tls(gw.port, certs)


def test_bad_ocsp_files_are_config_errors(tmp_path):
    ca = CertAuthority()
    a = ca.issue(tmp_path, "a", "a.test", ("a.test",))
    b = ca.issue(tmp_path, "b", "b.test", ("b.test",))
    (tmp_path / "junk.der").write_bytes(b"not an OCSP response")
    of_b = ocsp_response(ca, b, tmp_path / "b.der")
    for file, expected in [(tmp_path / "missing.der", "cannot read"), (tmp_path / "junk.der", "is not a DER OCSP response"),
                           (Path(of_b), "is an OCSP response for another certificate")]:
        text = listener_text(f"certificates: [{{cert: {a.cert}, key: {a.key}, ocsp: {file}}}]\n")
        (problem,) = errors(text)
        assert problem.startswith(f"c.yaml:4: {CERTS}[0].ocsp: ") and expected in problem and str(file) in problem, problem
    good = ocsp_response(ca, a, tmp_path / "a.der")
    tls = parse_config(listener_text(f"certificates: [{{cert: {a.cert}, key: {a.key}, ocsp: {good}}}]\n"), "c.yaml")
    assert tls.listen[0].tls is not None and tls.listen[0].tls.certificates[0].ocsp == good
