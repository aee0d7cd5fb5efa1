"""TLS in both directions: server contexts chosen by SNI, upstream connections verified.

Server side: every certificate of a listener gets its own OpenSSL context, built through
`CertificateOptions` so that all share the ciphers, the minimum version and ALPN; the SNI
callback (`contextForServerName`, Twisted >= 26.4) picks one by name (exact, then
`*.domain`), else the first certificate. `ServerTLS.load()` swaps the table, so certificates
are reloaded on SIGHUP without touching open connections. TLS wraps the same HTTP/1.1
protocol as plain listeners (`TLSMemoryBIOFactory`), whatever the endpoint (tcp, systemd,
sockets inherited by --workers).

Defaults hardened for the listeners: Mozilla's "intermediate" TLS 1.2 suites (ECDHE key
exchange, AEAD ciphers: no static RSA, no CBC), session resumption by a server-side cache and by
session tickets whose keys rotate (`rotate()`, every TICKET_KEY_LIFETIME: OpenSSL gives each new
context fresh random ticket keys), and an optional stapled OCSP response per certificate.

Client side: `https://` targets are verified against the system's trust store or
`tls.ca`, hostname included (service_identity), with an optional client certificate;
`verify: false` is possible and warned about at every start.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from OpenSSL import SSL
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import (
    AcceptableCiphers,
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
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.config.schema import Target
from txgateway.core.fastwrite import writer_for
from txgateway.core.pipeline import LocalResponse, RequestContext, error_response
from txgateway.transport import tlsbio
from txgateway.transport.clientcert import verify_clients
from txgateway.transport.tlsconfig import ListenerTLS, UpstreamTLS

__all__ = ["INTERMEDIATE_CIPHERS", "TICKET_KEY_LIFETIME", "RedirectToHttps", "ServerTLS", "TLSFactory",
           "client_creator", "tls_description"]

_log = Logger(namespace="txgateway.transport.tls")
_VERSIONS = {"1.2": TLSVersion.TLSv1_2, "1.3": TLSVersion.TLSv1_3}
# Mozilla "intermediate" (server side TLS v5.7) for TLS 1.2, less the DHE suites (no DH
# parameters are configured): forward secrecy and authenticated encryption only. TLS 1.3 suites
# are all of that kind and are not affected by this list.
INTERMEDIATE_CIPHERS = ("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"
                        "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305")
TICKET_KEY_LIFETIME = 3600.0      # seconds a session ticket key encrypts new tickets (see rotate)
_SESSION_TIMEOUT = 7200           # seconds a session (cached or in a ticket) may be resumed


def _pem_chain(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        data = f.read()
    marker = b"-----END CERTIFICATE-----"
    return [block + marker + b"\n" for block in data.split(marker) if b"-----BEGIN CERTIFICATE-----" in block]


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS side of one listener, the connection creator of its TLSMemoryBIOFactory;
    `load()` re-reads. Connections start on the front context (`options`: it holds the session
    cache and the ticket keys), whose SNI callback moves them to their certificate's."""

    def __init__(self, config: ListenerTLS) -> None:
        self.config = config
        self.by_name: dict[bytes, SSL.Context] = {}
        self.default: SSL.Context | None = None
        self.session_id = os.urandom(16).hex().encode()   # one for the listener: SNI switches contexts
        self.load(config)

    def serverConnectionForTLS(self, protocol: Any) -> SSL.Connection:
        return self.options.serverConnectionForTLS(protocol)

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
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(INTERMEDIATE_CIPHERS),
            enableSessions=True, enableSessionTickets=True,
        )

    def load(self, config: ListenerTLS) -> None:
        """Build every context now, then swap: a reload never serves a half-built table."""
        self._build(config)
        for warning in config.warnings:
            _log.warn("tls: {warning}", warning=warning)

    def rotate(self) -> None:
        """New contexts, so new session ticket keys: tickets issued under the old ones are no
        longer accepted (those clients do a full handshake). Files that became unreadable
        keep the running contexts."""
        try:
            self._build(self.config)
        except Exception:
            _log.failure("tls: session ticket keys not rotated (certificate files unreadable)")

    def _build(self, config: ListenerTLS) -> None:
        options = self._options(config, config.certificates[0], select=True)
        # The context every handshake starts on (its verify mode is the connection's); the SNI
        # callback then moves it to a certificate's context, whose CA store verifies the client.
        _resumption(options.getContext(), self.session_id)
        self._verify_clients(options.getContext(), config)
        by_name: dict[bytes, SSL.Context] = {}
        default = None
        for certificate in config.certificates:
            context = self._options(config, certificate).getContext()
            _resumption(context, self.session_id)
            self._verify_clients(context, config)
            if certificate.ocsp is not None:
                _staple(context, certificate.ocsp)
            default = default or context
            for name in certificate.names:
                # DNS names in certificates are ASCII (IDNs come as punycode), as SNI names are.
                by_name.setdefault(name.encode("ascii", "replace"), context)
        self.config, self.options, self.by_name, self.default = config, options, by_name, default

    @staticmethod
    def _verify_clients(context: SSL.Context, config: ListenerTLS) -> None:
        if config.client_auth is not None:
            verify_clients(context, config.client_auth)

    def covers(self, name: bytes) -> bool:
        """Whether a certificate of the listener is for `name` (exactly, or by `*.domain`):
        the https redirect goes to such names only, never to whatever a Host says."""
        name = name.lower().rstrip(b".")
        if name in self.by_name:
            return True
        return b"." in name and b"*." + name.split(b".", 1)[1] in self.by_name

    def _select(self, name: bytes | None) -> SSL.Context | None:
        if not name:
            return self.default
        name = name.lower()
        context = self.by_name.get(name)
        if context is None and b"." in name:
            context = self.by_name.get(b"*." + name.split(b".", 1)[1])
        return context or self.default


def _resumption(context: SSL.Context, session_id: bytes) -> None:
    """Abbreviated handshakes: a server-side session cache and session tickets (enabled by the
    options), under one session id context for all of a listener's contexts (CertificateOptions
    draws one per context, and the SNI callback switches between them). And no TLS 1.2
    renegotiation: a handshake in the middle of a connection would need the data path
    (tlsbio.py) to send what OpenSSL answers while it reads; nginx refuses it too."""
    context.set_session_id(session_id)
    context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
    context.set_timeout(_SESSION_TIMEOUT)
    context.set_options(SSL.OP_NO_RENEGOTIATION)


def _staple(context: SSL.Context, response: str) -> None:
    """Staple the DER OCSP response in `response` (a file, re-read at each build: a renewed
    response is served after SIGHUP) to handshakes whose client asks for one."""
    with open(response, "rb") as f:
        der = f.read()
    context.set_ocsp_server_callback(lambda connection, data: der)


class _TLSProtocol(TLSMemoryBIOProtocol):
    """Twisted's TLS protocol for the handshake and everything unusual; the data path of an
    established connection compiled (tlsbio.DataPath), without a reference cycle on unclean closes.

    Twisted's `BufferingTLSTransport` holds each write for a `callLater(0)`, then hands the
    ciphertext to `transport.write` (an epoll_ctl pair and a send on a later iteration), and
    its four interpreted frames per request (dataReceived, _flushReceiveBIO, write,
    _flushSendBIO) with pyOpenSSL's wrappers were a quarter of an HTTPS request's instructions.
    Here the reactor hands the ciphertext to the connection's `DataPath` (`dataReceived` is
    its `received`, set on the instance as Twisted's own `BufferingTLSTransport` sets `write`),
    and the wrapped protocol writes through it (`batched_writers`, for core/fastwrite.py's
    `writer_for`): once the handshake is done, reads decrypt straight into the wrapped protocol
    and writes are encrypted at once, their ciphertext in the turn's batched send. The path
    steps aside at the first event Twisted must handle (a close, an abort, a write held back,
    a TLS error): Twisted's methods then run, unchanged, until its dataReceived leaves the
    connection established with nothing pending again.

    A client that leaves without TLS close_notify (most do, and every aborted connection)
    makes `_flushReceiveBIO` build a `Failure()` in a frame its own traceback holds: the
    connection (TLS state, protocols, buffers) then waits for the cyclic collector, which
    gc.freeze and the raised thresholds make rare. Dropping the failure's traceback breaks
    the cycle (tests/integration/test_http2_abuse.py counts what a closed connection leaves)."""

    _app: Any = None
    _path: tlsbio.DataPath
    _send: Callable[[bytes], None]
    _send_now: Callable[[], None]
    twisted_write = TLSMemoryBIOProtocol.write

    @property
    def wrappedProtocol(self) -> Any:
        """HTTP/1.1, or what ALPN chose (h2.py puts it in place after the handshake): the
        data path delivers to whichever is here now."""
        return self._app

    @wrappedProtocol.setter
    def wrappedProtocol(self, protocol: Any) -> None:
        self._app = protocol
        self._path.app = protocol

    def __init__(self, factory: Any, wrappedProtocol: Any, _connectWrapped: bool = True) -> None:
        self._path = tlsbio.DataPath(self)
        super().__init__(factory, wrappedProtocol, _connectWrapped)

    def makeConnection(self, transport: Any) -> None:
        # Before the handshake writes its first flight, and before the wrapped protocol asks
        # for its writers (its connectionMade, in super().makeConnection).
        self._send, self._send_now = writer_for(transport)
        self._path.connect(self._send, self._send_now)
        self.dataReceived = self._path.received  # type: ignore[method-assign]  # the reactor calls it directly
        super().makeConnection(transport)

    def batched_writers(self) -> tuple[Callable[[bytes], None], Callable[[], None]]:
        """`(write, flush)` for the wrapped protocol (core/fastwrite.py's writer_for asks)."""
        return self._path.write, self._path.flush

    def twisted_received(self, data: bytes) -> None:
        """Twisted's dataReceived (the handshake, or the path stopped); the data path takes
        over once the handshake is done and nothing is pending."""
        TLSMemoryBIOProtocol.dataReceived(self, data)
        if (self._handshakeDone and not self._appSendBuffer and not self.disconnecting
                and not self._lostTLSConnection and not self._aborted and not self._path.ready):
            self._path.start(self._tlsConnection)

    def read_failed(self, result: int) -> None:
        """The data path's SSL_read returned `result` <= 0: what Twisted's _flushReceiveBIO
        does with pyOpenSSL's exception for it."""
        connection = self._tlsConnection
        try:
            connection._raise_ssl_error(connection._ssl, result)
        except SSL.WantReadError:
            pass
        except SSL.ZeroReturnError:
            self._shutdownTLS()
            self._tlsShutdownFinished(None)
        except SSL.Error:
            self._tlsShutdownFinished(Failure())

    def write_failed(self, rest: bytes, result: int) -> None:
        """The data path's SSL_write returned `result` <= 0: what Twisted's _write does."""
        connection = self._tlsConnection
        try:
            connection._raise_ssl_error(connection._ssl, result)
        except SSL.WantReadError:
            self._bufferedWrite(rest)
        except SSL.Error:
            self._tlsShutdownFinished(Failure())

    def write(self, data: bytes) -> None:
        """For callers that hold the transport (HTTP/2, tunnels): the same path."""
        self._path.write(data)

    def _leave_data_path(self) -> None:
        self._path.ready = False

    def _flushSendBIO(self) -> None:
        """The ciphertext OpenSSL produced, onto the turn's send (none: nothing to ask for).
        Once closing, at once: the TCP connection may be closed next (by Twisted's TLS code, or
        by HTTP/2's `fail`), and a close from a timed call would beat the turn's flush."""
        out = tlsbio.outgoing(self._tlsConnection)
        if out:
            self._send(out)
        if self.disconnecting or self._lostTLSConnection:
            self._send_now()

    def _bufferedWrite(self, octets: bytes) -> None:
        self._leave_data_path()
        super()._bufferedWrite(octets)

    def _shutdownTLS(self) -> None:
        self._leave_data_path()
        super()._shutdownTLS()

    def loseConnection(self) -> None:
        self._leave_data_path()
        super().loseConnection()

    def abortConnection(self) -> None:
        self._leave_data_path()
        super().abortConnection()

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        self._leave_data_path()
        if reason is not None:
            # The part of Failure.cleanFailure that matters here (pytest-twisted stubs it out).
            reason.tb = None
            reason.value.__traceback__ = None
        super()._tlsShutdownFinished(reason)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._leave_data_path()
        self.__dict__.pop("dataReceived", None)
        super().connectionLost(reason)
        self._path.release()      # what it held, let go: no cycle through this protocol


class TLSFactory(TLSMemoryBIOFactory):
    """The TLS wrapper of a listener's protocol factory."""

    protocol = _TLSProtocol


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
    URL over https (the port of the first TLS listener unless it is 443). The host is the
    request's, which `ForwardingHeaders` has checked is an authority before, and only when a
    certificate of that listener is for it (else an open redirect to any name a client
    writes): without one, or for another name, there is nothing to redirect to (400)."""

    name = "redirect_to_https"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, https_port: Callable[[], int | None], covers: Callable[[bytes], bool]) -> None:
        self.https_port = https_port     # asked per request: the TLS listener may bind port 0
        self.covers = covers             # ServerTLS.covers of that listener (reloads included)

    def on_request(self, ctx: RequestContext) -> LocalResponse:
        host = ctx.host
        if not host:
            return error_response(ctx, 400, "BAD_REQUEST", "a redirect to https needs a Host header")
        host = host[:host.index(b"]") + 1] if host.startswith(b"[") and b"]" in host else host.split(b":", 1)[0]
        if not self.covers(host):
            return error_response(ctx, 400, "BAD_REQUEST",
                                  "no certificate of the https listener is for this Host: nothing to redirect to")
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
