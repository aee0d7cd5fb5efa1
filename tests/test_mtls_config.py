"""The config of client certificates: a listener's client_ca, client_auth, client_cert_header
and auth.client_certs with its identities file, each problem as file:line: key."""

from __future__ import annotations

import pytest

from tests.configcheck import config_errors
from tests.test_tls_config import CertAuthority, listener_text, pair
from txgateway.config.schema import parse_config
from txgateway.transport.clientcert import ClientAuth


@pytest.fixture
def server(tmp_path):
    return CertAuthority().issue(tmp_path, "server", "localhost", ("localhost",))


def test_client_certificate_settings_load(tmp_path, server):
    ca = CertAuthority("clients").write(tmp_path / "clients.pem")
    tls = parse_config(listener_text(f"""\
        certificates: [{pair(server)}]
        client_ca: {ca}
        client_auth: optional
        client_cert_header: X-Client-Cert-SHA256
        """), "c.yaml").listen[0].tls
    assert tls is not None and tls.client_auth == ClientAuth(ca, False, b"x-client-cert-sha256")
    plain = parse_config(listener_text(f"certificates: [{pair(server)}]\nclient_ca: {ca}\n"), "c.yaml").listen[0].tls
    assert plain is not None and plain.client_auth == ClientAuth(ca, True, None)       # required by default


def test_bad_client_certificate_settings_are_reported_with_their_lines(tmp_path, server):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    assert config_errors(listener_text(f"""\
        certificates: [{pair(server)}]
        client_auth: required
        client_cert_header: X-Fingerprint
        """)) == [
        "c.yaml:5: listen[0].tls.client_auth: needs client_ca: the CA bundle client certificates are verified against",
        "c.yaml:6: listen[0].tls.client_cert_header: needs client_ca: the CA bundle client certificates are "
        "verified against",
    ]
    assert config_errors(listener_text(f"certificates: [{pair(server)}]\nclient_ca: {not_pem}\n")) == [
        f"c.yaml:5: listen[0].tls.client_ca: {not_pem} holds no PEM certificate"]
    assert config_errors(listener_text(f"certificates: [{pair(server)}]\nclient_ca: {tmp_path}/missing.pem\n")) == [
        f"c.yaml:5: listen[0].tls.client_ca: cannot read {tmp_path}/missing.pem: No such file or directory"]
    ca = CertAuthority().write(tmp_path / "ca.pem")
    assert config_errors(listener_text(f"certificates: [{pair(server)}]\nclient_ca: {ca}\nclient_auth: maybe\n")) == [
        "c.yaml:6: listen[0].tls.client_auth: expected one of required, optional, got 'maybe'"]
    assert config_errors(listener_text(f"""\
        certificates: [{pair(server)}]
        client_ca: {ca}
        client_cert_header: X-User-Cert
        """)) == [
        "c.yaml:6: listen[0].tls.client_cert_header: X-User-* and X-Gateway-* are the gateway's own headers, "
        "got 'x-user-cert'"]


CERT_AUTH = """\
listen: [{endpoint: "tcp:0"}]
auth:
  client_certs: %s
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
routes:
  - {prefix: /api/users, upstream: users, auth: required}
"""


def test_client_identities_load_and_their_files_problems_name_the_file_and_line(tmp_path):
    good = tmp_path / "ids.yaml"
    good.write_text('- {id: "spiffe://example.test/a", role: admin, tier: pro}\n- {id: bob}\n')
    config = parse_config(CERT_AUTH % f"{{file: {good}}}", "c.yaml")
    assert dict(config.auth.client_certs.identities) == {"spiffe://example.test/a": ("admin", "pro"), "bob": (None, None)}
    assert dict(parse_config(CERT_AUTH % "{}", "c.yaml").auth.client_certs.identities) == {}
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {role: admin}\n- {id: a}\n- {id: a}\n- {id: \"b\\n\"}\n- {id: c, colour: red}\n")
    assert config_errors(CERT_AUTH % f"{{file: {bad}}}") == [
        f"{bad}:1: identities[0]: each entry needs id: the certificate's URI SAN, else its subject CN",
        f"{bad}:3: identities[2].id: the same id is listed twice",
        f"{bad}:4: identities[3].id: is empty, too long or contains control characters (it goes upstream as an "
        "X-User-* header), got 'b\\n'",
        f"{bad}:5: identities[4].colour: unknown key (expected one of: id, role, tier)",
    ]
    assert config_errors(CERT_AUTH % f"{{file: {tmp_path}/nope.yaml}}") == [
        f"c.yaml:3: auth.client_certs.file: cannot read {tmp_path}/nope.yaml: No such file or directory"]
