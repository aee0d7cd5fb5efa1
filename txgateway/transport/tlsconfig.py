"""TLS settings: a listener's `tls:` (certificates by SNI, minimum version, ALPN, HSTS) and an
upstream's `tls:` (CA, verification, client certificate for mTLS).

Certificates and keys are read and checked at load: a missing file, a key that does not match
its certificate or an unreadable PEM is a config error naming the file; an expired
certificate is reported as a warning (`warnings`), since refusing to start would turn a
renewal slip into an outage.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from txgateway.config.reader import Reader, _Invalid, _kind
from txgateway.config.units import parse_duration
from txgateway.transport.clientcert import ClientAuth, client_auth_keys, parse_client_auth

__all__ = ["Certificate", "ListenerTLS", "UpstreamTLS", "parse_listener_tls", "parse_upstream_tls"]

_NO_H2 = "h2 needs the hpack package (pip install 'twisted[http2]')"


def _h2_available() -> bool:
    try:
        import hpack  # noqa: F401   # HPACK's code tables (transport/hpackdecode.py, h2headers.py)
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class Certificate:
    cert: str                       # PEM: the certificate, then its chain
    key: str                        # PEM private key
    names: tuple[str, ...]          # DNS names it serves (SAN, else CN), for SNI
    not_after: datetime.datetime
    ocsp: str | None = None         # a DER OCSP response for it, stapled when clients ask


@dataclass(frozen=True)
class ListenerTLS:
    certificates: tuple[Certificate, ...]   # the first is the default (no or unknown SNI name)
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ("http/1.1",)
    hsts_max_age: int = 31536000            # seconds; 0: no Strict-Transport-Security
    warnings: tuple[str, ...] = field(default=(), compare=False)
    client_auth: ClientAuth | None = None   # client certificates (mTLS), transport/clientcert.py


@dataclass(frozen=True)
class UpstreamTLS:
    ca: str | None = None           # PEM bundle to trust instead of the system's
    verify: bool = True
    cert: str | None = None         # client certificate (mTLS) ...
    key: str | None = None          # ... and its key


def _load_pair(r: Reader, node: yaml.Node, path: str, cert_path: str, key_path: str) -> Certificate:
    from cryptography.hazmat.primitives import serialization
    try:
        with open(cert_path, "rb") as f:
            pem = f.read()
        leaf = x509.load_pem_x509_certificate(pem)
    except OSError as e:
        raise r.fail(node, f"{path}.cert", f"cannot read {cert_path}: {e.strerror}") from None
    except ValueError:
        raise r.fail(node, f"{path}.cert", f"{cert_path} is not a PEM certificate") from None
    try:
        with open(key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise r.fail(node, f"{path}.key", f"cannot read {key_path}: {e.strerror}") from None
    except (ValueError, TypeError):
        raise r.fail(node, f"{path}.key", f"{key_path} is not a PEM private key (or it is encrypted)") from None
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*der) != leaf.public_key().public_bytes(*der):
        raise r.fail(node, f"{path}.key", f"{key_path} does not match the certificate in {cert_path}")
    try:
        names = tuple(leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                      .value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME))
    return Certificate(cert_path, key_path, tuple(n.lower() for n in names), leaf.not_valid_after_utc)


def _ocsp_response(r: Reader, node: yaml.Node, path: str, certificate: Certificate) -> str:
    """The file of a DER OCSP response that says `successful` about this certificate."""
    from cryptography.x509 import ocsp
    file = r.file_path(node, path)
    try:
        with open(file, "rb") as f:
            response = ocsp.load_der_ocsp_response(f.read())
    except OSError as e:
        raise r.fail(node, path, f"cannot read {file}: {e.strerror}") from None
    except ValueError:
        raise r.fail(node, path, f"{file} is not a DER OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise r.fail(node, path, f"{file} is an unsuccessful OCSP response ({response.response_status.name})")
    with open(certificate.cert, "rb") as f:
        serial = x509.load_pem_x509_certificate(f.read()).serial_number
    if response.serial_number != serial:
        raise r.fail(node, path, f"{file} is an OCSP response for another certificate than {certificate.cert}")
    return file


def parse_listener_tls(r: Reader, node: yaml.Node, path: str) -> ListenerTLS:
    f = r.mapping(node, path, {"certificates": "", "min_version": "", "alpn": "", "hsts_max_age": "",
                               **client_auth_keys()})
    before = len(r.problems)
    if "certificates" not in f:
        raise r.fail(node, f"{path}.certificates", "missing (required): [{cert: FILE.pem, key: FILE.key}, ...]")
    certificates: list[Certificate] = []
    for item_path, item in r.sequence(f["certificates"], f"{path}.certificates"):
        pair = r.attempt(lambda: r.mapping(item, item_path, {"cert": "", "key": "", "ocsp": ""}), None)
        if pair is None:
            continue
        if "cert" not in pair or "key" not in pair:
            r.fail(item, item_path, "expected {cert: FILE, key: FILE}")
            continue
        cert_path = r.attempt(lambda: r.file_path(pair["cert"], f"{item_path}.cert"), None)
        key_path = r.attempt(lambda: r.file_path(pair["key"], f"{item_path}.key"), None)
        if cert_path and key_path:
            loaded = r.attempt(lambda: _load_pair(r, item, item_path, cert_path, key_path), None)
            if loaded is not None and "ocsp" in pair:
                pem = loaded
                ocsp = r.attempt(lambda: _ocsp_response(r, pair["ocsp"], f"{item_path}.ocsp", pem), None)
                loaded = dataclasses.replace(loaded, ocsp=ocsp) if ocsp else None
            if loaded is not None:
                certificates.append(loaded)
    if not certificates and len(r.problems) == before:
        r.fail(f["certificates"], f"{path}.certificates", "expected at least one certificate")
    values: dict[str, object] = {}
    if "min_version" in f:
        node_value = f["min_version"]
        text = str(node_value.value) if isinstance(node_value, yaml.ScalarNode) else ""   # 1.3 unquoted is a float
        if text in ("1.2", "1.3"):
            values["min_version"] = text
        else:
            r.fail(node_value, f"{path}.min_version", f'expected "1.2" or "1.3", got {text or "a " + _kind(node_value)}')
    if "alpn" in f:
        protocols = []
        for item_path, item in r.sequence(f["alpn"], f"{path}.alpn"):
            name = r.attempt(lambda: r.choice(item, item_path, ("http/1.1", "h2")), None)
            if name == "h2" and not _h2_available():
                r.fail(item, item_path, _NO_H2)
            elif name is not None:
                protocols.append(name)
        values["alpn"] = tuple(protocols) or ("http/1.1",)
    if "hsts_max_age" in f:
        values["hsts_max_age"] = int(r.attempt(lambda: r.parsed(f["hsts_max_age"], f"{path}.hsts_max_age", parse_duration), 0.0))
    values["client_auth"] = r.attempt(lambda: parse_client_auth(r, node, f, path), None)
    if len(r.problems) != before:
        raise _Invalid()
    now = datetime.datetime.now(datetime.UTC)
    warnings = tuple(f"{c.cert} expired on {c.not_after:%Y-%m-%d}" for c in certificates if c.not_after < now)
    return ListenerTLS(certificates=tuple(certificates), warnings=warnings, **values)  # type: ignore[arg-type]


def parse_upstream_tls(r: Reader, node: yaml.Node, path: str) -> UpstreamTLS:
    f = r.mapping(node, path, {"ca": "", "verify": "", "cert": "", "key": ""})
    before = len(r.problems)
    values: dict[str, object] = {}
    contents: dict[str, bytes] = {}
    for key in ("ca", "cert", "key"):
        if key in f:
            file = r.attempt(lambda: r.file_path(f[key], f"{path}.{key}"), None)
            if file is not None:
                try:
                    with open(file, "rb") as opened:
                        contents[key] = opened.read()
                except OSError as e:
                    r.fail(f[key], f"{path}.{key}", f"cannot read {file}: {e.strerror}")
                values[key] = file
    if ("cert" in f) != ("key" in f):
        r.fail(node, path, "a client certificate needs both cert and key")
    if "ca" in contents and b"-----BEGIN CERTIFICATE-----" not in contents["ca"]:
        r.fail(f["ca"], f"{path}.ca", f"{values['ca']} holds no PEM certificate")
    if "cert" in contents and "key" in contents:
        from twisted.internet.ssl import PrivateCertificate
        try:
            PrivateCertificate.loadPEM(contents["cert"] + b"\n" + contents["key"])
        except Exception:
            r.fail(f["cert"], f"{path}.cert", f"{values['cert']} and {values['key']} are not a PEM certificate "
                                              "and its (unencrypted) private key")
    if "verify" in f:
        values["verify"] = r.attempt(lambda: r.boolean(f["verify"], f"{path}.verify"), True)
    if len(r.problems) != before:
        raise _Invalid()
    return UpstreamTLS(**values)  # type: ignore[arg-type]
