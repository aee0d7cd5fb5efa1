"""TLS in both directions: server contexts chosen by SNI, upstream connections verified.

Server side: every certificate of a listener gets its own OpenSSL context, built through
`CertificateOptions` so that all share the ciphers, the minimum version and ALPN; the SNI
callback (`contextForServerName`, Twisted >= 26.4) picks one by name (exact, then
`*.domain`), else the first certificate. `ServerTLS.load()` swaps the table, so certificates
are reloaded on SIGHUP without touching open connections. TLS wraps the same HTTP/1.1
protocol as plain listeners (`TLSMemoryBIOFactory`), whatever the endpoint (tcp, systemd,
sockets inherited by --workers).

Client side: `https://` targets are verified against the system's trust store or
`tls.ca`, hostname included (service_identity), with an optional client certificate;
`verify: false` is possible and warned about at every start.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    KeyPair,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.logger import Logger

from txgateway.config.schema import Target
from txgateway.core.pipeline import LocalResponse, RequestContext
from txgateway.transport.clientcert import verify_clients
from txgateway.transport.tlsconfig import ListenerTLS, UpstreamTLS

__all__ = ["RedirectToHttps", "ServerTLS", "client_creator", "tls_description"]

_log = Logger(namespace="txgateway.transport.tls")
_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}


def _pem_chain(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    return [block + marker + b"\n" for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


class ServerTLS:
    """The TLS side of one listener: `options` for TLSMemoryBIOFactory; `load()` re-reads."""

    def __init__(self, config: ListenerTLS) -> None:
        self.config = config
        self.by_name: dict[bytes, SSL.Context] = {}
        self.default: SSL.Context | None = None
        self.options = self._options(config, config.certificates[0], select=True)
        # The context every handshake starts on (its verify mode is the connection's); the SNI
        # callback then moves it to a context of `load`'s, whose CA store verifies the client.
        self._verify_clients(self.options.getContext(), config)
        self.load(config)

    def _options(self, config: ListenerTLS, certificate: Any, select: bool = False) -> CertificateOptions:
        chain = _pem_chain(certificate.cert)
        with open(certificate.key, "rb") as f:
            key = KeyPair.load(f.read(), 1)   # 1 = FILETYPE_PEM
        leaf = PrivateCertificate.load(chain[0], key, 1)
        return CertificateOptions(
            privateKey=leaf.privateKey.original, certificate=leaf.original,
            extraCertChain=[Certificate.loadPEM(c).original for c in chain[1:]],
            raiseMinimumTo=_VERSIONS[config.min_version],
            acceptableProtocols=[p.encode() for p in config.alpn],
            contextForServerName=self._select if select else None,
        )

    def load(self, config: ListenerTLS) -> None:
        """Build every context now, then swap: a reload never serves a half-built table."""
        by_name: dict[bytes, SSL.Context] = {}
        default = None
        for certificate in config.certificates:
            context = self._options(config, certificate).getContext()
            self._verify_clients(context, config)
            default = default or context
            for name in certificate.names:
                # DNS names in certificates are ASCII (IDNs come as punycode), as SNI names are.
                by_name.setdefault(name.encode("ascii", "replace"), context)
        self.config, self.by_name, self.default = config, by_name, default
        for warning in config.warnings:
            _log.warn("tls: {warning}", warning=warning)

    @staticmethod
    def _verify_clients(context: SSL.Context, config: ListenerTLS) -> None:
        if config.client_auth is not None:
            verify_clients(context, config.client_auth)

    def _select(self, name: bytes | None) -> SSL.Context | None:
        if not name:
            return self.default
        name = name.lower()
        context = self.by_name.get(name)
        if context is None and b"." in name:
            context = self.by_name.get(b"*." + name.split(b".", 1)[1])
        return context or self.default


def tls_description(transport: Any, default_protocol: str) -> str:
    """What the access log says of a TLS connection: "TLSv1.3 h2" (version, ALPN protocol)."""
    try:
        version = transport.getHandle().get_protocol_version_name()
    except Exception:        # not (or no longer) a TLS transport
        version = "TLS"
    alpn = getattr(transport, "negotiatedProtocol", None)
    return f"{version} {alpn.decode() if alpn else default_protocol}"


class RedirectToHttps:
    """The only filter of plain listeners when `redirect_to_https` is on: 308 to the same
    URL over https (the port of the first TLS listener unless it is 443)."""

    name = "redirect_to_https"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, https_port: Callable[[], int | None]) -> None:
        self.https_port = https_port     # asked per request: the TLS listener may bind port 0

    def on_request(self, ctx: RequestContext) -> LocalResponse:
        host = ctx.host or b""
        host = host[:host.index(b"]") + 1] if host.startswith(b"[") and b"]" in host else host.split(b":", 1)[0]
        target = ctx.target if ctx.target.startswith(b"/") else ctx.path + ctx.query
        port = self.https_port()
        location = b"https://" + host + (b"" if port in (None, 443) else b":%d" % port) + target
        return LocalResponse(308, [(b"location", location), (b"content-type", b"text/plain")],
                             b"use " + location + b"\n")


def client_creator(target: Target, tls: UpstreamTLS | None) -> Any:
    """The TLS connection creator for an https:// target: verified unless verify is false."""
    config = tls or UpstreamTLS()
    client_cert = None
    if config.cert and config.key:
        with open(config.cert, "rb") as c, open(config.key, "rb") as k:
            client_cert = PrivateCertificate.loadPEM(c.read() + b"\n" + k.read())
    if not config.verify:
        return CertificateOptions(verify=False, privateKey=client_cert.privateKey.original if client_cert else None,
                                  certificate=client_cert.original if client_cert else None)
    if config.ca:
        trust = trustRootFromCertificates([Certificate.loadPEM(c) for c in _pem_chain(config.ca)])
    else:
        trust = platformTrust()
    return optionsForClientTLS(target.host, trustRoot=trust, clientCertificate=client_cert,
                               acceptableProtocols=[b"http/1.1"])
