"""A live Python console inside the running gateway, over SSH (Twisted conch's Manhole).

Off unless `manhole:` is configured; loopback by default. Public-key login only, from the
configured authorized_keys file (any user name; the key is the identity); no passwords. An
ed25519 host key is created (0600) on first start. Every login and every line typed is logged
(audit): this is arbitrary code execution in the reactor thread, so the namespace offers
read-mostly helpers that print tables, and a blocking expression stalls all traffic (the
banner says so; `deferLater` and `deferToThread` are in the namespace).

Hardened as a listener strangers can reach: user names and typed lines are logged with their
control characters escaped (core/logtext.py); a connection must log in within
PRE_AUTH_TIMEOUT seconds and at most MAX_CONNECTIONS are open at once (ops/admission.py);
an address with FAILED_LOGINS failed logins within FAILED_WINDOW seconds has its connections
closed on sight until they age out; conch's "cannot find moduli file" line is not logged (it
only means fixed Diffie-Hellman groups, which OpenSSH clients never need: they use curve25519).
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.error import IgnoreAuthentication, ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.ssh import transport, userauth
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.cred.portal import Portal
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import ILogObserver, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from txgateway.core.logtext import printable
from txgateway.ops.admin import status as gateway_status
from txgateway.ops.admission import Admission
from txgateway.ops.config import ManholeConfig, read_authorized_keys

__all__ = ["load_or_create_host_key", "manhole_service", "namespace"]

_log = Logger(namespace="txgateway.ops.manhole")

PRE_AUTH_TIMEOUT = 30.0    # seconds from connecting to logged in (OpenSSH's LoginGraceTime is 120)
MAX_CONNECTIONS = 10       # open at once, logged in or not
FAILED_LOGINS = 5          # failed logins from one address within FAILED_WINDOW ...
FAILED_WINDOW = 60.0       # ... close its connections on sight until the oldest is this old
_TRACKED = 4096            # addresses remembered at most (the oldest are forgotten first)

BANNER = ("txgateway Manhole: Python in the gateway's reactor thread. A statement that blocks "
          "(time.sleep, a slow loop, a network call) stalls every request until it returns: "
          "schedule work with deferLater(reactor, seconds, f) or run it with deferToThread(f). "
          "Every line typed is logged.\r\n")


@implementer(IAuthorizedKeysDB)
class _AuthorizedKeys:
    """The keys of one authorized_keys file, for whatever user name the client gives."""

    def __init__(self, keys: list[Key]) -> None:
        self.keys = keys

    def getAuthorizedKeys(self, username: bytes) -> list[Key]:
        return self.keys


class _AuditingChecker(SSHPublicKeyChecker):
    """Logs each login (user name, key fingerprint) and each refused key."""

    def requestAvatarId(self, credentials: Any) -> Any:
        d = super().requestAvatarId(credentials)
        user = printable(credentials.username)
        try:
            fingerprint = _openssh_fingerprint(Key.fromString(credentials.blob))
        except Exception:   # an unparsable key blob: the checker refuses it too
            fingerprint = "unreadable key"

        def accepted(avatar: Any) -> Any:
            _log.warn("manhole login: {user} with key {fingerprint}", user=user, fingerprint=fingerprint)
            return avatar

        def refused(failure: Any) -> Any:
            if not failure.check(ValidPublicKey):     # the key is known; the signature comes next
                _log.warn("manhole login refused: {user} with key {fingerprint}", user=user, fingerprint=fingerprint)
            return failure

        return d.addCallbacks(accepted, refused)


class _AuditedManhole(manhole.ColoredManhole):
    """ColoredManhole that logs every line before running it."""

    def initializeScreen(self) -> None:
        """RecvLine's, with the banner before the first prompt."""
        self.terminal.reset()
        self.terminal.write(BANNER.encode())
        self.terminal.write(self.ps[self.pn])
        self.setInsertMode()

    def lineReceived(self, line: bytes) -> None:
        _log.info("manhole input: {line}", line=printable(line))
        try:
            super().lineReceived(line)
        except SystemExit:                  # exit() / quit(): end this session, as Ctrl-D does
            self.terminal.loseConnection()


class _Session(manhole_ssh.TerminalSession):
    """TerminalSession without its NotImplementedError on resize and EOF."""

    def openShell(self, proto: Any) -> None:
        self._terminal = self.transportFactory(proto, self.chainedProtocolFactory(),
                                               manhole_ssh.iconch.IConchUser(self.original), self.width, self.height)

    def windowChanged(self, size: tuple[int, int, int, int]) -> None:
        terminal = getattr(self, "_terminal", None)
        if terminal is not None:
            terminal.chainedProtocol.terminalProtocol.terminalSize(size[1], size[0])

    def eofReceived(self) -> None:
        terminal = getattr(self, "_terminal", None)
        if terminal is not None:
            terminal.proto.loseConnection()


class LoginThrottle:
    """Failed logins per client address, over the last FAILED_WINDOW seconds (injected clock)."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def _recent(self, host: str) -> deque[float] | None:
        times = self.failures.get(host)
        if times is not None:
            cutoff = self.clock.seconds() - FAILED_WINDOW
            while times and times[0] <= cutoff:
                times.popleft()
            if not times:
                del self.failures[host]
                return None
        return times

    def failed(self, host: str) -> bool:
        """Count one; True when this one blocks the address."""
        times = self._recent(host)
        if times is None:
            if len(self.failures) >= _TRACKED:
                del self.failures[next(iter(self.failures))]
            times = self.failures[host] = deque()
        times.append(self.clock.seconds())
        return len(times) == FAILED_LOGINS

    def blocked(self, host: str) -> bool:
        times = self._recent(host)
        return times is not None and len(times) >= FAILED_LOGINS


class _UserAuth(userauth.SSHUserAuthServer):
    """conch's user authentication, counting each failed login against the client's address."""

    def _ebBadAuth(self, reason: Failure) -> None:
        if self.method != b"none" and not reason.check(IgnoreAuthentication):
            ssh: Any = self.transport
            host = _host(ssh.transport.getPeer())
            if ssh.factory.throttle.failed(host):
                _log.warn("manhole: {count} failed logins from {host} within {window:.0f} s; its connections "
                          "are closed on sight for now", count=FAILED_LOGINS, host=host, window=FAILED_WINDOW)
            if ssh.factory.throttle.blocked(host):
                ssh.sendDisconnect(transport.DISCONNECT_NO_MORE_AUTH_METHODS_AVAILABLE, b"too many failed logins")
                return
        super()._ebBadAuth(reason)


class _Transport(transport.SSHServerTransport):
    """conch's SSH server side, counted by the factory and closed if not logged in within
    PRE_AUTH_TIMEOUT (conch's own login timeout is ten hours, and only starts after the key
    exchange)."""

    _grace: Any = None

    def connectionMade(self) -> None:
        factory: Any = self.factory
        factory.admission.open.add(self)
        self._grace = factory.clock.callLater(PRE_AUTH_TIMEOUT, self._login_too_slow)
        super().connectionMade()

    def _login_too_slow(self) -> None:
        self._grace = None
        if getattr(self, "avatar", None) is None:
            tcp: Any = self.transport
            _log.info("manhole: {host} did not log in within {seconds:.0f} s", host=_host(tcp.getPeer()),
                      seconds=PRE_AUTH_TIMEOUT)
            tcp.abortConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._grace is not None and self._grace.active():
            self._grace.cancel()
        self._grace = None
        factory: Any = self.factory
        factory.admission.open.discard(self)
        super().connectionLost(reason)


@implementer(ILogObserver)
class _Discard:
    def __call__(self, event: Any) -> None:
        pass


class _Factory(manhole_ssh.ConchFactory):
    """ConchFactory with the cap, the throttle, our transport and user authentication."""

    protocol = _Transport
    services = {**manhole_ssh.ConchFactory.services, b"ssh-userauth": _UserAuth}
    _log = Logger(namespace="txgateway.ops.manhole", observer=cast(ILogObserver, _Discard()))  # only the moduli line

    def __init__(self, portal: Portal, clock: Any) -> None:
        super().__init__(portal)
        self.clock = clock
        self.admission = Admission(MAX_CONNECTIONS)
        self.throttle = LoginThrottle(clock)

    def buildProtocol(self, addr: Any) -> Any:
        if self.throttle.blocked(_host(addr)) or not self.admission.admit():
            return None                   # Twisted closes the connection at once
        return super().buildProtocol(addr)


def _host(address: Any) -> str:
    return str(getattr(address, "host", "") or "")


def _openssh_fingerprint(key: Key) -> str:
    """As `ssh-keygen -l` prints it (SHA256:base64 without padding), so logs can be grepped."""
    return "SHA256:" + key.fingerprint(format=FingerprintFormats.SHA256_BASE64).rstrip("=")


def load_or_create_host_key(path: str) -> Key:
    """The ed25519 host key at `path`, created (mode 0600, directory 0700) if missing."""
    if os.path.exists(path):
        return Key.fromFile(path)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    key = Key(Ed25519PrivateKey.generate())
    os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("OPENSSH"))
    _log.info("manhole: created host key {path} ({fingerprint})", path=path,
              fingerprint=_openssh_fingerprint(key))
    return key


def namespace(gateway: Any) -> dict[str, Any]:
    """The console's globals: the gateway, helpers that print readable tables, and the ways
    to wait without blocking (reactor, deferLater, deferToThread)."""

    def status() -> None:
        """Routes, upstreams, breakers, limiter and request counts, as /status has them."""
        print(_status_text(gateway_status(gateway)))

    def breakers() -> None:
        """One line per circuit breaker ("retry after" only for an open one)."""
        print(_breaker_table([b.snapshot() for b in gateway.breakers.values()]))

    def _known(name: str) -> bool:
        if name in gateway.breakers:
            return True
        print(f"no breaker named {name!r}; upstreams with a breaker: {', '.join(sorted(gateway.breakers)) or 'none'}")
        return False

    def trip(name: str) -> None:
        """Open the breaker of upstream `name` (503 until it half-opens or is reset)."""
        if _known(name):
            _log.warn("manhole: breaker {name} tripped by hand", name=name)
            print(_breaker_table([gateway.breakers.trip(name, "manual trip (manhole)")]))

    def reset(name: str) -> None:
        """Close the breaker of upstream `name`."""
        if _known(name):
            _log.warn("manhole: breaker {name} reset by hand", name=name)
            print(_breaker_table([gateway.breakers.reset(name, "manual reset (manhole)")]))

    def bucket(key: str) -> None:
        """Tokens in the in-process buckets whose key contains `key` (e.g. 'ip:10.0.0.7')."""
        store = gateway.local_buckets
        rows = [(k, f"{store.peek(k):.2f}") for k in list(store.buckets) if key in k][:50]
        print(_table(("bucket", "tokens now"), rows) if rows else f"no in-process bucket matches {key!r}")

    def reload() -> None:
        """Re-read the config file, as SIGHUP does (in every worker under --workers); prints the
        problems if it is refused."""
        _log.warn("manhole: reload requested")
        problems = gateway.reload_everywhere()
        print("\n".join(problems) if problems else f"reloaded {gateway.config.file}")

    def purge(prefix: str) -> None:
        """Drop the cached responses whose path (and query) starts with `prefix`, on every route."""
        store = gateway.durable.get("cache")
        purged = store.purge_path(prefix.encode()) if store is not None else 0
        _log.warn("manhole: cache purge {prefix!r}: {purged} responses", prefix=prefix, purged=purged)
        print(f"purged {purged} cached responses")

    return {"gateway": gateway, "status": status, "breakers": breakers, "trip": trip, "reset": reset,
            "bucket": bucket, "reload": reload, "purge": purge, "reactor": gateway.reactor, "deferLater": deferLater,
            "deferToThread": deferToThread, "__name__": "__manhole__"}


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    """Columns aligned on the widest cell, two spaces apart; an empty cell shows as "-"."""
    cells = [tuple(str(c) for c in head)] + [tuple("-" if c is None or c == "" else str(c) for c in row)
                                               for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells)


def _breaker_table(snapshots: list[dict[str, Any]]) -> str:
    rows = [(b["name"], b["state"], b["trips"], b["consecutive_failures"], b["retry_after"]) for b in snapshots]
    return _table(("upstream", "state", "trips", "consecutive failures", "retry after s"), rows)


def _target_state(target: dict[str, Any], breaker: dict[str, Any] | None) -> str:
    """What an operator should believe of a target: an open breaker or an ejection beats "up"."""
    if target["down"]:
        return "down"
    if target["ejected_for"] > 0:
        return f"ejected, back in {target['ejected_for']:.0f} s"
    if breaker is not None and breaker["state"] != "closed":
        return f"up, breaker {breaker['state'].replace('_', '-')}"
    return "up"


def _status_text(st: dict[str, Any]) -> str:
    """/status as a few aligned tables: the gateway, its requests, routes, upstream targets, limiter."""
    req, lim = st["requests"], st["limiter"]
    by_class = "  ".join(f"{k}: {v}" for k, v in sorted(req["by_class"].items())) or "none yet"
    head = _table(("gateway", ""), [
        ("version", st["version"]), ("uptime", f"{st['uptime_s']:.0f} s"), ("config", st["config"]),
        ("ready", st["ready"]), ("draining", st["draining"]), ("listeners", ", ".join(st["listeners"])),
        ("requests", f"{req['total']} done, {req['in_flight']} in flight, {req['rate_limited']} rate-limited"),
        ("by class", by_class),
        ("limiter", f"{lim['backend'] or 'none'}, {lim['local_buckets']} local bucket(s)"
                    + (f", redis {lim['redis']}" if lim["redis"] is not None else "")),
    ])
    routes = _table(("route", "methods", "host", "upstream", "auth", "rate limit", "filters"), [
        (r["prefix"], ",".join(r["methods"]) or "any", r["host"] or "any", r["upstream"] or r["terminal"],
         r["auth"], r["rate_limit"], ",".join(r["filters"])) for r in st["routes"]])
    targets = _table(("upstream", "target", "state", "in flight", "requests", "failures", "last error"), [
        (name, t["url"], _target_state(t, u["breaker"]), t["in_flight"], t["requests"], t["failures"], t["last_error"])
        for name, u in st["upstreams"].items() for t in u["targets"]])
    return "\n\n".join((head, routes, targets, _breaker_table([u["breaker"] for u in st["upstreams"].values()
                                                                  if u["breaker"] is not None])))


def manhole_service(gateway: Any, config: ManholeConfig, reactor: Any) -> StreamServerEndpointService:
    keys = read_authorized_keys(config.authorized_keys)
    host_key = load_or_create_host_key(config.host_key)
    names = namespace(gateway)
    # conch's zope interfaces are invisible to mypy: these are typed Any.
    realm: Any = manhole_ssh.TerminalRealm()
    realm.sessionFactory = _Session
    realm.chainedProtocolFactory = lambda: insults.ServerProtocol(_AuditedManhole, names)
    keys_db: Any = _AuthorizedKeys(keys)
    checker: Any = _AuditingChecker(keys_db)
    factory: Any = _Factory(Portal(realm, [checker]), gateway.clock)
    factory.publicKeys = {b"ssh-ed25519": host_key.public()}     # fresh dicts: the class's are shared
    factory.privateKeys = {b"ssh-ed25519": host_key}
    _log.info("manhole on {endpoint}: {count} authorized key(s) from {path}", endpoint=config.endpoint,
              count=len(keys), path=config.authorized_keys)
    service = StreamServerEndpointService(serverFromString(reactor, config.endpoint), factory)
    service._raiseSynchronously = True
    return service
