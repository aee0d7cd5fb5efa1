"""Client certificates on a TLS listener (mTLS): `tls.client_ca`, `client_auth`, `client_cert_header`.

OpenSSL verifies the certificate during the handshake against `client_ca` (chain, validity
dates): an expired one, one from another CA, or none on a `required` listener never gets a
connection. Once a connection has a verified certificate, every request on it carries:

- its identity for the auth filter, as the per-request state `client_cert`: the user id is
  the certificate's first URI SAN (a SPIFFE id, say), else its subject CN; `auth.client_certs`
  (filters/auth/clientcerts.py) gives it a role and tier and decides whether routes accept it;
- its SHA-256 fingerprint (lower-case hex of the DER) in the header `client_cert_header`
  names, after any copy the client sent is removed (also on requests without a certificate).

The certificate is read once per connection (kept by transport, weakly).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any
from weakref import WeakKeyDictionary

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import SSL

from txgateway.config.reader import Reader
from txgateway.core.pipeline import RequestContext

__all__ = ["ClientAuth", "ClientCerts", "PeerCert", "client_auth_keys", "parse_client_auth", "verify_clients"]

# Header names the edge drops from every request (filters/headers.py): ours would be dropped too.
_RESERVED = (b"x-user-", b"x-gateway-")


@dataclass(frozen=True)
class ClientAuth:
    """A listener's client-certificate settings."""

    ca: str                         # PEM bundle of the CAs whose client certificates are accepted
    required: bool = True           # False (optional): a client without a certificate is served too
    header: bytes | None = None     # lower-case name of the fingerprint header, or None


def client_auth_keys() -> dict[str, str]:
    """The keys of a listener's tls: that this module reads."""
    return {"client_ca": "", "client_auth": "", "client_cert_header": ""}


def parse_client_auth(r: Reader, node: yaml.Node, f: dict[str, yaml.Node], path: str) -> ClientAuth | None:
    """The client-certificate keys of a listener's `tls:` (`f`: its fields), or None without them."""
    if "client_ca" not in f:
        for key in ("client_auth", "client_cert_header"):
            if key in f:
                r.fail(f[key], f"{path}.{key}", "needs client_ca: the CA bundle client certificates are verified against")
        return None
    from txgateway.filters.headerconfig import header_name
    ca = r.file_path(f["client_ca"], f"{path}.client_ca")
    try:
        with open(ca, "rb") as opened:
            pem = opened.read()
        x509.load_pem_x509_certificates(pem)
    except OSError as e:
        raise r.fail(f["client_ca"], f"{path}.client_ca", f"cannot read {ca}: {e.strerror}") from None
    except ValueError:
        raise r.fail(f["client_ca"], f"{path}.client_ca", f"{ca} holds no PEM certificate") from None
    required = True
    if "client_auth" in f:
        required = r.choice(f["client_auth"], f"{path}.client_auth", ("required", "optional")) == "required"
    header = None
    if "client_cert_header" in f:
        header = header_name(r, f["client_cert_header"], f"{path}.client_cert_header").lower()
        if header.startswith(_RESERVED):
            raise r.fail(f["client_cert_header"], f"{path}.client_cert_header",
                         f"X-User-* and X-Gateway-* are the gateway's own headers, got {header.decode()!r}")
    return ClientAuth(ca, required, header)


def verify_clients(context: SSL.Context, config: ClientAuth) -> None:
    """Make an OpenSSL server context ask for a client certificate and verify it against the
    CA bundle (every SNI context of the listener, since a verify store follows the context)."""
    mode = SSL.VERIFY_PEER | (SSL.VERIFY_FAIL_IF_NO_PEER_CERT if config.required else 0)
    context.set_verify(mode)
    context.load_verify_locations(config.ca)
    context.load_client_ca(config.ca.encode())       # the CA names a client picks its certificate by


@dataclass(frozen=True)
class PeerCert:
    """What a connection's verified client certificate says (both None: no certificate)."""

    user_id: str | None
    fingerprint: bytes | None


_NONE = PeerCert(None, None)


def read_peer(transport: Any) -> PeerCert:
    """The verified certificate of a TLS transport (a TLSMemoryBIOProtocol), or _NONE."""
    try:
        cert = transport.getPeerCertificate()
    except Exception:          # not (or no longer) a TLS transport
        return _NONE
    if cert is None:
        return _NONE
    parsed = cert.to_cryptography()
    from cryptography.hazmat.primitives.serialization import Encoding
    fingerprint = hashlib.sha256(parsed.public_bytes(Encoding.DER)).hexdigest().encode()
    try:
        uris = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value \
            .get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        return PeerCert(uris[0], fingerprint)
    names = parsed.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return PeerCert(str(names[0].value) if names else None, fingerprint)


class ClientCerts:
    """A listener's per-request part: the connection's certificate onto each request."""

    def __init__(self, config: ClientAuth) -> None:
        self.header = config.header
        self._peers: WeakKeyDictionary[Any, PeerCert] = WeakKeyDictionary()

    def apply(self, ctx: RequestContext, transport: Any) -> None:
        if transport is None:
            peer = _NONE
        else:
            peer = self._peers.get(transport) or self._peers.setdefault(transport, read_peer(transport))
        header = self.header
        if header is not None:
            ctx.headers = [h for h in ctx.headers if h[0] != header]
            if peer.fingerprint is not None:
                ctx.headers.append((header, peer.fingerprint))
        if peer.user_id is not None:
            ctx.set_state("client_cert", peer.user_id)
