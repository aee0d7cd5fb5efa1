"""`tls:` of listeners and upstreams (txgateway/transport/tlsconfig.py), read through `parse_config`:
certificates made here with `cryptography` (a test CA, SAN names, an expired one, a key of
another certificate, a file that is not PEM, a missing file), every error exactly as
`check-config` prints it (file:line: key.path: message). Also the pure parts of
txgateway/transport/tls.py: the SNI table (`ServerTLS._select`) and the 308 Location of
`RedirectToHttps`.

The certificate helpers (`CertAuthority`) are shared with tests/integration/test_tls.py.
"""

from __future__ import annotations

import datetime
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.configcheck import config_errors
from txgateway.config.schema import Target, parse_config
from txgateway.transport.tls import RedirectToHttps, ServerTLS
from txgateway.transport.tlsconfig import Certificate, ListenerTLS, UpstreamTLS

# --- certificates -------------------------------------------------------------------------

NOW = datetime.datetime.now(datetime.UTC)
DAY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class Issued:
    cert: str           # PEM file: the certificate (then the CA, when chain=True)
    key: str            # PEM file: its private key (unencrypted PKCS#8)
    serial: int
    der: bytes          # the certificate as it travels in a TLS handshake


def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class CertAuthority:
    """A test CA (P-256) that issues leaf certificates into files. Its certificates carry key
    identifiers, which Python 3.13's default client context (VERIFY_X509_STRICT) demands."""

    def __init__(self, cn: str = "txgateway test CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        self.cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(NOW - DAY).not_valid_after(NOW + 30 * DAY)
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                                  content_commitment=False, key_encipherment=False,
                                                  data_encipherment=False, key_agreement=False,
                                                  encipher_only=False, decipher_only=False), critical=True)
                     .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
                     .sign(self.key, hashes.SHA256()))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> str:
        path.write_bytes(self.pem)
        return str(path)

    def issue(self, directory: Path, stem: str, cn: str | None, sans: tuple[str, ...] = (), *,
              expired: bool = False, serial: int | None = None, rsa_key: bool = False,
              chain: bool = False) -> Issued:
        """`stem`.pem and `stem`.key in `directory` (overwritten: a renewal keeps the paths)."""
        key = rsa.generate_private_key(65537, 2048) if rsa_key else ec.generate_private_key(ec.SECP256R1())
        serial = serial or x509.random_serial_number()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
        not_before, not_after = (NOW - 10 * DAY, NOW - 2 * DAY) if expired else (NOW - DAY, NOW + 30 * DAY)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(serial)
                   .not_valid_before(not_before).not_valid_after(not_after)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]),
                                            critical=not cn)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + (self.pem if chain else b""))
        key_path.write_bytes(_pem(key))
        return Issued(str(cert_path), str(key_path), serial, cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def ca() -> CertAuthority:
    return CertAuthority()


# --- config text --------------------------------------------------------------------------

# Line numbers matter: the tls keys of listen[0] start at line 4.
HEAD = """\
listen:
  - endpoint: "tcp:8443"
    tls:
"""
TAIL = """\
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
routes:
  - {prefix: /api/users, upstream: users}
"""
CERTS = "listen[0].tls.certificates"


def listener_text(body: str) -> str:
    """A config whose listen[0].tls holds `body` (its first line is line 4)."""
    return HEAD + textwrap.indent(textwrap.dedent(body), "      ") + TAIL


def pair(issued: Issued) -> str:
    return f"{{cert: {issued.cert}, key: {issued.key}}}"


def listener_tls(body: str) -> ListenerTLS:
    tls = parse_config(listener_text(body), "c.yaml").listen[0].tls
    assert tls is not None
    return tls


errors = config_errors


# --- listener tls: certificates -----------------------------------------------------------

def test_certificates_load_with_their_san_names_and_the_defaults(tmp_path, ca):
    api = ca.issue(tmp_path, "api", "api.test", ("API.test", "www.api.test"))
    wild = ca.issue(tmp_path, "wild", "wild", ("*.wild.test",), rsa_key=True)
    tls = listener_tls(f"""\
        certificates:
          - {pair(api)}
          - {pair(wild)}
        """)
    assert tls == ListenerTLS(certificates=(
        Certificate(api.cert, api.key, ("api.test", "www.api.test"), tls.certificates[0].not_after),
        Certificate(wild.cert, wild.key, ("*.wild.test",), tls.certificates[1].not_after),
    ), min_version="1.2", alpn=("http/1.1",), hsts_max_age=31536000)
    assert tls.warnings == ()
    assert abs(tls.certificates[0].not_after - (NOW + 30 * DAY)) < datetime.timedelta(seconds=1)


def test_names_come_from_the_cn_only_without_a_san(tmp_path, ca):
    only_cn = ca.issue(tmp_path, "cn", "Legacy.Test")
    both = ca.issue(tmp_path, "both", "cn-is-ignored.test", ("san.test",))
    no_names = ca.issue(tmp_path, "none", None, ("only-san.test",))
    tls = listener_tls(f"certificates: [{pair(only_cn)}, {pair(both)}, {pair(no_names)}]\n")
    assert [c.names for c in tls.certificates] == [("legacy.test",), ("san.test",), ("only-san.test",)]


def test_a_chain_file_is_read_for_its_first_certificate(tmp_path, ca):
    chained = ca.issue(tmp_path, "chained", "chained.test", ("chained.test",), chain=True)
    assert listener_tls(f"certificates: [{pair(chained)}]\n").certificates[0].names == ("chained.test",)


def test_an_expired_certificate_loads_with_a_warning(tmp_path, ca):
    old = ca.issue(tmp_path, "old", "old.test", ("old.test",), expired=True)
    fresh = ca.issue(tmp_path, "fresh", "fresh.test", ("fresh.test",))
    tls = listener_tls(f"certificates: [{pair(fresh)}, {pair(old)}]\n")
    expiry = (NOW - 2 * DAY).strftime("%Y-%m-%d")
    assert tls.warnings == (f"{old.cert} expired on {expiry}",)
    assert [c.names for c in tls.certificates] == [("fresh.test",), ("old.test",)]


def test_a_missing_certificate_or_key_file(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    missing = tmp_path / "missing.pem"
    text = listener_text(f"""\
        certificates:
          - {{cert: {missing}, key: {good.key}}}
          - {{cert: {good.cert}, key: {tmp_path / "missing.key"}}}
        """)
    assert errors(text) == [
        f"c.yaml:5: {CERTS}[0].cert: cannot read {missing}: No such file or directory",
        f"c.yaml:6: {CERTS}[1].key: cannot read {tmp_path / 'missing.key'}: No such file or directory",
    ]


def test_a_directory_instead_of_a_file(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    assert errors(listener_text(f"certificates: [{{cert: {tmp_path}, key: {good.key}}}]\n")) == [
        f"c.yaml:4: {CERTS}[0].cert: cannot read {tmp_path}: Is a directory"]


def test_files_that_are_not_pem(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    der = tmp_path / "cert.der"
    der.write_bytes(good.der)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("this is not a certificate\n")
    key_as_cert = good.key
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase")))
    text = listener_text(f"""\
        certificates:
          - {{cert: {der}, key: {good.key}}}
          - {{cert: {text_file}, key: {good.key}}}
          - {{cert: {key_as_cert}, key: {good.key}}}
          - {{cert: {good.cert}, key: {good.cert}}}
          - {{cert: {good.cert}, key: {encrypted}}}
        """)
    assert errors(text) == [
        f"c.yaml:5: {CERTS}[0].cert: {der} is not a PEM certificate",
        f"c.yaml:6: {CERTS}[1].cert: {text_file} is not a PEM certificate",
        f"c.yaml:7: {CERTS}[2].cert: {key_as_cert} is not a PEM certificate",
        f"c.yaml:8: {CERTS}[3].key: {good.cert} is not a PEM private key (or it is encrypted)",
        f"c.yaml:9: {CERTS}[4].key: {encrypted} is not a PEM private key (or it is encrypted)",
    ]


def test_a_key_of_another_certificate(tmp_path, ca):
    a = ca.issue(tmp_path, "a", "a.test", ("a.test",))
    b = ca.issue(tmp_path, "b", "b.test", ("b.test",), rsa_key=True)
    c = ca.issue(tmp_path, "c", "c.test", ("c.test",))
    text = listener_text(f"""\
        certificates:
          - {{cert: {a.cert}, key: {c.key}}}
          - {{cert: {b.cert}, key: {a.key}}}
        """)
    assert errors(text) == [
        f"c.yaml:5: {CERTS}[0].key: {c.key} does not match the certificate in {a.cert}",
        f"c.yaml:6: {CERTS}[1].key: {a.key} does not match the certificate in {b.cert}",
    ]


def test_certificates_shape_errors(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    assert errors(listener_text("min_version: '1.2'\n")) == [
        f"c.yaml:4: {CERTS}: missing (required): [{{cert: FILE.pem, key: FILE.key}}, ...]"]
    assert errors(listener_text("certificates: []\n")) == [f"c.yaml:4: {CERTS}: expected at least one certificate"]
    assert errors(listener_text(f"certificates: {{cert: {good.cert}, key: {good.key}}}\n")) == [
        f"c.yaml:4: {CERTS}: expected a list, got a mapping"]
    text = listener_text(f"""\
        certificates:
          - {{cert: {good.cert}}}
          - {good.cert}
          - {{cert: {good.cert}, key: [{good.key}]}}
          - {{cert: {good.cert}, key: {good.key}, chain: x.pem}}
        """)
    assert errors(text) == [
        f"c.yaml:5: {CERTS}[0]: expected {{cert: FILE, key: FILE}}",
        f"c.yaml:6: {CERTS}[1]: expected a mapping, got '{good.cert}'",
        f"c.yaml:7: {CERTS}[2].key: expected a single value, got a list",
        f"c.yaml:8: {CERTS}[3].chain: unknown key (expected one of: cert, key, ocsp)",
    ]
    assert errors(listener_text(f"certificates: [{pair(good)}]\nciphers: HIGH\n")) == [
        "c.yaml:5: listen[0].tls.ciphers: unknown key (expected one of: alpn, certificates, client_auth, client_ca, "
        "client_cert_header, hsts_max_age, min_version)"]
    assert errors(HEAD.replace("    tls:\n", "    tls: true\n") + TAIL) == [
        "c.yaml:3: listen[0].tls: expected a mapping, got 'true'"]


# --- listener tls: min_version, alpn, hsts_max_age -------------------------------------------

@pytest.mark.parametrize(("line", "expected"), [
    ('min_version: "1.3"', {"min_version": "1.3"}),
    ("min_version: '1.2'", {"min_version": "1.2"}),
    ("alpn: [http/1.1]", {"alpn": ("http/1.1",)}),
    ("alpn: []", {"alpn": ("http/1.1",)}),
    ("hsts_max_age: 1d", {"hsts_max_age": 86400}),
    ("hsts_max_age: 0s", {"hsts_max_age": 0}),
    ("hsts_max_age: 1500ms", {"hsts_max_age": 1}),
])
def test_settings(tmp_path, ca, line, expected):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    tls = listener_tls(f"certificates: [{pair(good)}]\n{line}\n")
    defaults = {"min_version": "1.2", "alpn": ("http/1.1",), "hsts_max_age": 31536000}
    assert {key: getattr(tls, key) for key in defaults} == defaults | expected


def test_bad_settings_are_all_reported(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    text = listener_text(f"""\
        certificates: [{pair(good)}]
        min_version: "1.1"
        alpn: [http/1.1, h2, spdy/3]
        hsts_max_age: forever
        """)
    assert errors(text) == [
        'c.yaml:5: listen[0].tls.min_version: expected "1.2" or "1.3", got 1.1',
        "c.yaml:6: listen[0].tls.alpn[2]: expected one of http/1.1, h2, got 'spdy/3'",
        'c.yaml:7: listen[0].tls.hsts_max_age: expected a duration like "250ms", "5s" or "1m", got "forever"',
    ]


def test_h2_is_read_in_the_order_given(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    assert listener_tls(f"certificates: [{pair(good)}]\nalpn: [h2, http/1.1]\n").alpn == ("h2", "http/1.1")
    assert listener_tls(f"certificates: [{pair(good)}]\nalpn: [h2]\n").alpn == ("h2",)


def test_h2_without_its_packages_is_refused(tmp_path, ca, monkeypatch):
    monkeypatch.setattr("txgateway.transport.tlsconfig._h2_available", lambda: False)
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    assert errors(listener_text(f"certificates: [{pair(good)}]\nalpn: [http/1.1, h2]\n")) == [
        "c.yaml:5: listen[0].tls.alpn[1]: h2 needs the hpack package (pip install 'twisted[http2]')"]


def test_errors_in_certificates_and_settings_come_together(tmp_path, ca):
    """...and a redirect_to_https next to that TLS listener is not an error of its own."""
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    text = listener_text(f"""\
        certificates:
          - {{cert: {tmp_path / "gone.pem"}, key: {good.key}}}
        alpn: [h3]
        """) + "redirect_to_https: true\n"
    assert errors(text) == [
        f"c.yaml:5: {CERTS}[0].cert: cannot read {tmp_path / 'gone.pem'}: No such file or directory",
        "c.yaml:6: listen[0].tls.alpn[0]: expected one of http/1.1, h2, got 'h3'",
    ]


# --- redirect_to_https ----------------------------------------------------------------------

def test_redirect_to_https_with_a_tls_listener(tmp_path, ca):
    good = ca.issue(tmp_path, "good", "good.test", ("good.test",))
    text = ('listen:\n  - endpoint: "tcp:8080"\n  - endpoint: "tcp:8443"\n'
            f"    tls: {{certificates: [{pair(good)}]}}\n") + TAIL + "redirect_to_https: true\n"
    config = parse_config(text, "c.yaml")
    assert config.redirect_to_https is True
    assert [(x.endpoint, x.tls is not None) for x in config.listen] == [("tcp:8080", False), ("tcp:8443", True)]


def test_redirect_to_https_needs_a_tls_listener():
    text = 'listen:\n  - endpoint: "tcp:8080"\n' + TAIL + "redirect_to_https: true\n"
    assert errors(text) == ["c.yaml:7: redirect_to_https: needs a listener with tls: to redirect to"]
    assert parse_config(text.replace("true", "false"), "c.yaml").redirect_to_https is False


# --- upstream tls -----------------------------------------------------------------------------

UPSTREAM = """\
listen:
  - endpoint: "tcp:8080"
routes:
  - {prefix: /api/users, upstream: users}
upstreams:
  users:
    targets: ["https://api.internal"]
"""
UP = "upstreams.users.tls"


def upstream_text(body: str) -> str:
    """UPSTREAM and the keys of upstreams.users.tls in `body`; its first line is line 9."""
    return UPSTREAM + "    tls:\n" + textwrap.indent(textwrap.dedent(body), "      ")


def test_https_targets_and_an_upstream_tls_section(tmp_path, ca):
    client = ca.issue(tmp_path, "client", "gateway.test")
    ca_file = ca.write(tmp_path / "ca.pem")
    upstream = parse_config(upstream_text(f"ca: {ca_file}\ncert: {client.cert}\nkey: {client.key}\n"),
                            "c.yaml").upstreams["users"]
    assert upstream.targets == (Target("https://api.internal", "api.internal", 443, https=True),)
    assert upstream.tls == UpstreamTLS(ca=ca_file, verify=True, cert=client.cert, key=client.key)
    assert parse_config(UPSTREAM, "c.yaml").upstreams["users"].tls is None
    assert parse_config(upstream_text("verify: false\n"), "c.yaml").upstreams["users"].tls == UpstreamTLS(verify=False)


def test_upstream_tls_errors(tmp_path, ca):
    client = ca.issue(tmp_path, "client", "gateway.test")
    gone = tmp_path / "gone-ca.pem"
    assert errors(upstream_text(f"ca: {gone}\n")) == [f"c.yaml:9: {UP}.ca: cannot read {gone}: No such file or directory"]
    assert errors(upstream_text(f"cert: {client.cert}\n")) == [
        f"c.yaml:9: {UP}: a client certificate needs both cert and key"]
    assert errors(upstream_text(f"key: {client.key}\n")) == [
        f"c.yaml:9: {UP}: a client certificate needs both cert and key"]
    assert errors(upstream_text(f'verify: "no"\ncert: {client.cert}\nkey: {tmp_path / "gone.key"}\nsni: x\n')) == [
        f"c.yaml:9: {UP}.verify: expected true or false, got 'no'",
        f"c.yaml:11: {UP}.key: cannot read {tmp_path / 'gone.key'}: No such file or directory",
        "c.yaml:12: upstreams.users.tls.sni: unknown key (expected one of: ca, cert, key, verify)",
    ]
    assert errors(UPSTREAM + "    tls: {ca: [a, b]}\n") == [f"c.yaml:8: {UP}.ca: expected a single value, got a list"]


# --- the SNI table -----------------------------------------------------------------------------

def test_sni_selects_by_exact_name_then_wildcard_else_the_first(tmp_path, ca):
    first = ca.issue(tmp_path, "first", "first.test", ("first.test",))
    other = ca.issue(tmp_path, "other", "other.test", ("other.test", "alias.test"))
    wild = ca.issue(tmp_path, "wild", "wild", ("*.wild.test",))
    exact = ca.issue(tmp_path, "exact", "exact.wild.test", ("exact.wild.test",))
    tls = ServerTLS(listener_tls(f"certificates: [{pair(first)}, {pair(other)}, {pair(wild)}, {pair(exact)}]\n"))
    by_cert = {id(tls._select(name)): name for name in (b"first.test", b"other.test", b"x.wild.test", b"exact.wild.test")}
    assert len(by_cert) == 4, "one context per certificate"
    chosen = {name: by_cert.get(id(tls._select(name))) for name in (
        None, b"", b"first.test", b"OTHER.Test", b"alias.test", b"x.wild.test", b"Y.WILD.TEST", b"exact.wild.test",
        b"wild.test", b"a.b.wild.test", b"zzz.test", b"first.test.", b"x" * 300)}
    assert chosen == {
        None: b"first.test", b"": b"first.test", b"first.test": b"first.test", b"OTHER.Test": b"other.test",
        b"alias.test": b"other.test", b"x.wild.test": b"x.wild.test", b"Y.WILD.TEST": b"x.wild.test",
        b"exact.wild.test": b"exact.wild.test", b"wild.test": b"first.test", b"a.b.wild.test": b"first.test",
        b"zzz.test": b"first.test", b"first.test.": b"first.test", b"x" * 300: b"first.test",
    }


# --- RedirectToHttps ---------------------------------------------------------------------------

def ctx(host: bytes | None, target: bytes) -> Any:
    path, _, query = target.partition(b"?")
    if b"://" in target:
        path, _, query = target.split(b"/", 3)[3].partition(b"?")
        path = b"/" + path
    return SimpleNamespace(host=host, target=target, path=path, query=b"?" + query if query else b"")


@pytest.mark.parametrize(("https_port", "host", "target", "location"), [
    (443, b"api.test", b"/a/b?x=1&y=2", b"https://api.test/a/b?x=1&y=2"),
    (None, b"api.test:80", b"/", b"https://api.test/"),
    (8443, b"api.test:8080", b"/a?q", b"https://api.test:8443/a?q"),
    (8443, b"[::1]:8080", b"/v6", b"https://[::1]:8443/v6"),
    (443, b"[::1]", b"/v6", b"https://[::1]/v6"),
    (443, b"other.test", b"http://other.test/abs?x=1", b"https://other.test/abs?x=1"),
])
def test_redirect_location(https_port, host, target, location):
    local = RedirectToHttps(lambda: https_port, lambda name: True).on_request(ctx(host, target))   # any name covered
    assert local.status == 308
    assert dict(local.headers)[b"location"] == location
    assert local.body == b"use " + location + b"\n"
