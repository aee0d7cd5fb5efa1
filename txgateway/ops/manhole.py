"""A live Python console inside the running gateway, over SSH (Twisted conch's Manhole).

Off unless `manhole:` is configured; loopback by default. Public-key login only, from the
configured authorized_keys file (any user name; the key is the identity); no passwords. An
ed25519 host key is created (0600) on first start. Every login and every line typed is logged
(audit): this is arbitrary code execution in the reactor thread, so the namespace offers
read-mostly helpers that print tables, and a blocking expression stalls all traffic.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.cred.portal import Portal
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from zope.interface import implementer

from txgateway.ops.admin import status as gateway_status
from txgateway.ops.config import ManholeConfig, read_authorized_keys

__all__ = ["load_or_create_host_key", "manhole_service", "namespace"]

_log = Logger(namespace="txgateway.ops.manhole")


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
        user = credentials.username.decode("utf-8", "replace")
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

    def lineReceived(self, line: bytes) -> None:
        _log.info("manhole input: {line}", line=line.decode("utf-8", "replace"))
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
    """The console's globals: the gateway and helpers that print readable tables."""

    def status() -> None:
        """Routes, upstreams, breakers, limiter and request counts, as /status has them."""
        print(json.dumps(gateway_status(gateway), indent=2, default=str))

    def breakers() -> None:
        """One line per circuit breaker."""
        rows = [(name, b.state, b.trips, b.snapshot().get("consecutive_failures"), b.retry_after())
                for name, b in gateway.breakers.items()]
        print(_table(("upstream", "state", "trips", "consecutive failures", "retry after s"), rows))

    def trip(name: str) -> None:
        """Open the breaker of upstream `name` (503 until it half-opens or is reset)."""
        _log.warn("manhole: breaker {name} tripped by hand", name=name)
        print(gateway.breakers.trip(name, "manual trip (manhole)"))

    def reset(name: str) -> None:
        """Close the breaker of upstream `name`."""
        _log.warn("manhole: breaker {name} reset by hand", name=name)
        print(gateway.breakers.reset(name, "manual reset (manhole)"))

    def bucket(key: str) -> None:
        """Tokens in the in-process buckets whose key contains `key` (e.g. 'ip:10.0.0.7')."""
        store = gateway.local_buckets
        rows = [(k, f"{store.peek(k):.2f}") for k in list(store.buckets) if key in k][:50]
        print(_table(("bucket", "tokens now"), rows) if rows else f"no in-process bucket matches {key!r}")

    def reload() -> None:
        """Re-read the config file, as SIGHUP does; prints the problems if it is refused."""
        _log.warn("manhole: reload requested")
        problems = gateway.reload()
        print("\n".join(problems) if problems else f"reloaded {gateway.config.file}")

    def purge(prefix: str) -> None:
        """Drop the cached responses whose path (and query) starts with `prefix`, on every route."""
        store = gateway.durable.get("cache")
        purged = store.purge_path(prefix.encode()) if store is not None else 0
        _log.warn("manhole: cache purge {prefix!r}: {purged} responses", prefix=prefix, purged=purged)
        print(f"purged {purged} cached responses")

    return {"gateway": gateway, "status": status, "breakers": breakers, "trip": trip, "reset": reset,
            "bucket": bucket, "reload": reload, "purge": purge, "__name__": "__manhole__"}


def _table(head: tuple[str, ...], rows: list[tuple[Any, ...]]) -> str:
    cells = [tuple(str(c) for c in head)] + [tuple(str(c) for c in row) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells)


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
    factory: Any = manhole_ssh.ConchFactory(Portal(realm, [checker]))
    factory.publicKeys = {b"ssh-ed25519": host_key.public()}     # fresh dicts: the class's are shared
    factory.privateKeys = {b"ssh-ed25519": host_key}
    _log.info("manhole on {endpoint}: {count} authorized key(s) from {path}", endpoint=config.endpoint,
              count=len(keys), path=config.authorized_keys)
    service = StreamServerEndpointService(serverFromString(reactor, config.endpoint), factory)
    service._raiseSynchronously = True
    return service
