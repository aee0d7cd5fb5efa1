"""Wiring: one Config in, one running gateway (listeners, pipeline, pools) out.

`Gateway` is the object the status page, metrics and the Manhole read. It is a MultiService
whose children say what runs, in start order: the long-lived parts (`Component`: the
access-log writer, the deadline sweep, the bucket stores, the JWKS refresher, the upstream
groups), the listeners (a port that cannot be bound aborts start-up), then the admin
listener and the Manhole. Stopping stops the listeners, drains in-flight requests, then
stops the other children in reverse: the access-log writer last.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.config.contract import ReloadRefused, Resources
from txgateway.config.schema import Config, ConfigError, load_config
from txgateway.core.fetch import quiet_pool, read_body
from txgateway.core.periodic import Periodic
from txgateway.core.pipeline import Pipeline, Switch
from txgateway.core.timeouts import Deadlines
from txgateway.filters.ratelimit.filter import LocalStore, RateLimitStore
from txgateway.filters.routing import RouteTable
from txgateway.ops.accesslog import AccessLog, JsonLinesWriter, Layout, TextStream
from txgateway.ops.stats import Stats
from txgateway.ops.workerstats import WorkerStats
from txgateway.service.reload import keep_restart_only_settings
from txgateway.service.requestpath import build_request_path, redirect_path
from txgateway.service.workers import WORKERS_PARENT
from txgateway.transport.clientcert import ClientCerts
from txgateway.transport.endpoints import ListenerError, cannot_listen
from txgateway.transport.http1 import HTTP1Factory
from txgateway.transport.peerlimit import PeerLimit, PeerLimitedTLSFactory
from txgateway.transport.tls import TICKET_KEY_LIFETIME, RedirectToHttps, ServerTLS
from txgateway.upstream.breaker import Breakers
from txgateway.upstream.proxy import Proxy, UpstreamGroup

# Optional features (admin, HTTP/2, auth, JWKS, Redis, Manhole) are imported where they are
# built: a config without one never loads its library (prometheus_client, twisted.web + h2,
# PyJWT, txredisapi, twisted.conch: ~6 MiB of RSS a plain proxy does not need).
if TYPE_CHECKING:
    from txgateway.filters.auth.jwks import RemoteJwks
    from txgateway.filters.ratelimit.redislink import RedisLink

__all__ = ["Gateway"]

_log = Logger(namespace="txgateway")


DEFAULT_BACKLOG = 1024


def _endpoint(reactor: Any, index: int, description: str) -> Any:
    try:
        return serverFromString(reactor, with_backlog(description))
    except KeyError as e:       # systemd:...:name=X without an inherited socket of that name
        names = os.environ.get("LISTEN_FDNAMES", "")
        raise ListenerError(f"listen[{index}].endpoint {description}: no inherited socket named {e} "
                            f"(LISTEN_FDNAMES={names!r}; a socket unit needs FileDescriptorName={e.args[0]})") from None
    except (ValueError, IndexError) as e:
        raise ListenerError(f"listen[{index}].endpoint {description}: {e}") from None


def tcp_port(endpoint: str) -> int | None:
    """The port of a tcp:/tcp6: endpoint string (positional or port=), else None."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for part in rest.split(":"):
        value = part[len("port="):] if part.startswith("port=") else part
        if value.isdigit() and (part.startswith("port=") or "=" not in part):
            return int(value)
    return None


def _hsts(tls: Any) -> bytes | None:
    return b"max-age=%d" % tls.hsts_max_age if tls is not None and tls.hsts_max_age else None


def with_backlog(endpoint: str) -> str:
    """TCP listeners default to a 1024-deep accept queue (Twisted's 50 drops bursts)."""
    if endpoint.split(":", 1)[0] in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


class AdoptedPort(Service):
    """A listener on a socket another process bound (the --workers parent)."""

    def __init__(self, reactor: Any, fd: int, endpoint: str, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = socket.AF_INET6 if endpoint.startswith("tcp6:") else socket.AF_INET
        self.factory = factory
        self.port: Any = None
        self._waitingForPort: Deferred[Any] | None = None   # as StreamServerEndpointService has

    def startService(self) -> None:
        super().startService()
        self.port = port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        os.close(self.fd)            # the port has its own copy
        # Workers share one accept queue. Twisted accepts up to 100+ connections per wake-up,
        # so the first worker awake took a whole burst (wrk's 64 connections: 100/0 in a
        # third of runs). One accept per wake-up lets the other workers take their share.
        accept = port.doRead

        def accept_one() -> Any:
            port.numberAccepts = 1
            return accept()

        port.doRead = accept_one
        self._waitingForPort = succeed(self.port)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return maybeDeferred(self.port.stopListening) if self.port is not None else succeed(None)


class Component(Service):
    """A long-lived part of the gateway (a periodic sweep, a refresher, a writer) as a child
    service, so the service tree says what runs and in which order it starts and stops."""

    def __init__(self, name: str, start: Callable[[], Any], stop: Callable[[], Any]) -> None:
        self.setName(name)
        self._start = start
        self._stop = stop

    def startService(self) -> None:
        super().startService()
        self._start()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return maybeDeferred(self._stop)


class Gateway(MultiService):
    """A configured gateway: build with a Config, a reactor and a clock (IReactorTime)."""

    def __init__(self, config: Config, reactor: Any, clock: Any = None, inherited_fds: list[int] | None = None,
                 operations: bool = True, stdout: TextStream | None = None, workers_state: str | None = None,
                 worker: int = 0) -> None:
        """`inherited_fds`: listening sockets a --workers parent bound, one per listener, in
        order; `operations`: whether this process runs the admin listener and the Manhole;
        `workers_state`: the --workers parent's directory for the workers' counters, where this
        process is worker number `worker` (ops/workerstats.py);
        `stdout`: where `access_log: "-"` writes (sys.stdout unless told)."""
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.deadlines = Deadlines(self.clock)
        self.stats = Stats(self.clock)
        self.worker_stats = WorkerStats(workers_state, worker, self) if workers_state else None
        if self.worker_stats is not None:
            self.worker_stats.restore()
        self.draining = False
        self.reloads = {"success": 0, "failure": 0}        # SIGHUP reloads (metrics)
        self.last_reload_success = self.clock.seconds()   # the load at start counts
        self.log_writer = JsonLinesWriter.open(config.access_log, self.clock, stdout or sys.stdout)
        self.jwks = self._remote_jwks(config)
        self.durable: dict[str, Any] = {}   # what filters keep across reloads (the response cache's store)
        self.redis, self.limiter, self.local_buckets = self._limit_stores(config)
        self.access_log = AccessLog(self.log_writer, Layout(config.access_log_fields, config.access_log_redact))
        self.tracing = self._tracing(config, reactor, self.clock)
        self.switch = Switch(self._request_path(config, {}))
        self.peers = PeerLimit(lambda: self.switch.pipeline.limits.max_connections_per_ip)
        self.factory = HTTP1Factory(self.switch, self.clock, self.deadlines, peers=self.peers)
        for component in self._components():     # children before the listeners: started first
            component.setServiceParent(self)
        self.factories = [self.factory]          # every HTTP/1.1 factory: plain, TLS, redirecting
        self.server_tls: dict[int, ServerTLS] = {}  # listener index -> its certificates
        self.tls_factories: dict[int, HTTP1Factory] = {}  # listener index -> its HTTP/1.1 factory
        self.listeners: list[Any] = []
        self._named: dict[Any, tuple[str, str]] = {}   # service -> (config key, endpoint), for bind errors
        for i, listener in enumerate(config.listen):
            factory = self._listener_factory(i, listener, config)
            if inherited_fds:
                service: Any = AdoptedPort(reactor, inherited_fds[i], listener.endpoint, factory)
            else:
                service = StreamServerEndpointService(_endpoint(reactor, i, listener.endpoint), factory)
                service._raiseSynchronously = True
            service.setServiceParent(self)
            self.listeners.append(service)
            self._named[service] = (f"listen[{i}]", listener.endpoint)
        for name, upstream in config.upstreams.items():
            if upstream.tls is not None and not upstream.tls.verify and any(t.https for t in upstream.targets):
                _log.warn("upstream {name}: TLS certificates are NOT verified (tls.verify: false)", name=name)
        self.admin: StreamServerEndpointService | None = None
        if config.admin is not None and operations:
            from txgateway.ops.admin import admin_site  # prometheus_client, twisted.web: admin only
            from txgateway.ops.history import History
            self.history = History(self, self.clock)  # the status page's charts: sampled with an admin only
            Component("history", self.history.start, self.history.stop).setServiceParent(self)
            self.admin = StreamServerEndpointService(serverFromString(reactor, config.admin.endpoint), admin_site(self))
            self.admin._raiseSynchronously = True
            self.admin.setServiceParent(self)
            self._named[self.admin] = ("admin", config.admin.endpoint)
        if config.manhole is not None and operations:
            from txgateway.ops.manhole import manhole_service
            manhole = manhole_service(self, config.manhole, reactor)
            manhole.setServiceParent(self)
            self._named[manhole] = ("manhole", config.manhole.endpoint)

    def _components(self) -> list[Component]:
        """The long-lived parts, as child services in start order (they stop in reverse, after
        the listeners stopped and the drain): the access-log writer, the deadline sweep, the
        bucket stores (a Redis-backed one closes its connections), the JWKS refresher, the
        upstream groups (pools, health checks) of the current request path, and with TLS
        listeners the rotation of their session ticket keys."""
        out = []
        if self.log_writer is not None:
            out.append(Component("access-log", self.log_writer.start, self.log_writer.stop))
        out.append(Component("deadlines", self.deadlines.start, self.deadlines.stop))
        if self.local_buckets is not self.limiter:
            out.append(Component("local-buckets", self.local_buckets.start, self.local_buckets.stop))
        out.append(Component("limiter", self.limiter.start, self.limiter.stop))
        if self.jwks is not None:
            out.append(Component("jwks", self.jwks.start, self.jwks.stop))
        if self.tracing is not None:   # stopped after the upstreams: the drained requests' spans are ended
            out.append(Component("tracing", lambda: None, lambda: self.tracing.stop(self.reactor)))
        out.append(Component("upstreams", lambda: self.proxy.start(), lambda: self.proxy.close()))
        if any(listener.tls is not None for listener in self.config.listen):
            tickets = Periodic(self.clock, TICKET_KEY_LIFETIME, self._rotate_ticket_keys)
            out.append(Component("tls-ticket-keys", tickets.start, tickets.stop))
        if self.worker_stats is not None:   # after the upstreams: stopped first, it writes its last file before they close
            out.append(Component("worker-stats", self.worker_stats.start, self.worker_stats.stop))
        return out

    def _rotate_ticket_keys(self) -> None:
        for tls in self.server_tls.values():
            tls.rotate()

    def _listener_factory(self, index: int, listener: Any, config: Config) -> Any:
        """HTTP/1.1 for a listener: wrapped in TLS when it has `tls:`; answering 308 to https
        when it is plain and `redirect_to_https` is on; else the shared plain factory."""
        if listener.tls is not None:
            tls = self.server_tls[index] = ServerTLS(listener.tls)
            client_auth = listener.tls.client_auth
            http = HTTP1Factory(self.switch, self.clock, self.deadlines, scheme=b"https", hsts=_hsts(listener.tls),
                                client_certs=ClientCerts(client_auth) if client_auth is not None else None)
            self.factories.append(http)
            self.tls_factories[index] = http
            wrapped: Any = http
            if "h2" in listener.tls.alpn:
                from txgateway.transport.h2 import ALPNFactory  # the h2 library: only listeners offering h2
                wrapped = ALPNFactory(http)
            return PeerLimitedTLSFactory(tls, wrapped, self.peers)
        if config.redirect_to_https:
            first_tls = next(i for i, x in enumerate(config.listen) if x.tls is not None)
            redirect = redirect_path(config, self._resources(config, {}), [self.stats, self.access_log],
                                     RedirectToHttps(lambda: self._bound_port(first_tls),
                                                     lambda name: self.server_tls[first_tls].covers(name)))
            factory = HTTP1Factory(Switch(redirect), self.clock, self.deadlines, peers=self.peers)  # a reload leaves it alone
            self.factories.append(factory)
            return factory
        return self.factory

    def _resources(self, config: Config, keep: dict[str, UpstreamGroup]) -> Resources:
        return Resources(config, self.clock, reactor=self.reactor, deadlines=self.deadlines, stats=self.stats,
                         jwks=self.jwks, limiter=self.limiter, local_buckets=self.local_buckets, keep=keep,
                         durable=self.durable)

    def _request_path(self, config: Config, keep: dict[str, UpstreamGroup]) -> Pipeline:
        """Everything a config decides about the path of a request (requestpath.py); upstream
        groups in `keep` carry over with their pools, breakers and health."""
        return build_request_path(config, self._resources(config, keep), [self.stats, self.access_log], self.tracing)

    @staticmethod
    def _tracing(config: Config, reactor: Any, clock: Any) -> Any:
        """The OpenTelemetry tracer (ops/tracing.py) when `tracing:` is set; read at start only."""
        if config.tracing is None:
            return None
        from txgateway.ops.tracing import Tracing  # the OpenTelemetry SDK: only configs that trace
        return Tracing(config.tracing, reactor, clock)

    @property
    def pipeline(self) -> Pipeline:
        return self.switch.pipeline

    @property
    def proxy(self) -> Proxy:
        return self.switch.pipeline.terminals["proxy"]  # type: ignore[no-any-return]

    @property
    def routes(self) -> RouteTable:
        return self.switch.pipeline.table  # type: ignore[return-value]

    @property
    def breakers(self) -> Breakers:
        return Breakers(g.breaker for g in self.proxy.groups.values() if g.breaker is not None)

    def reopen_access_log(self) -> None:
        """A file access log continues in a file opened again at its path (SIGUSR1, SIGHUP:
        logrotate moved the old one away); stdout and `off` are left as they are."""
        writer = self.log_writer
        if writer is None or writer.path is None:
            return
        try:
            writer.reopen()
        except OSError as e:
            _log.error("access log {path}: cannot reopen it ({error}); still writing to the file open before",
                       path=writer.path, error=e.strerror or str(e))
            return
        _log.info("access log {path} reopened", path=writer.path)

    def reload(self) -> list[str]:
        """`_reload`, counted for /metrics."""
        problems = self._reload()
        if problems:
            self.reloads["failure"] += 1
        else:
            self.reloads["success"] += 1
            self.last_reload_success = self.clock.seconds()
        return problems

    def _reload(self) -> list[str]:
        """Read the config file again and, if it is valid, serve new requests with it.

        In-flight requests finish on the old pipeline; upstreams whose settings did not change
        keep their pools, breakers and health; rate-limit buckets stay. Settings that need a
        restart (txgateway/service/reload.py lists them) keep their running values, each with a
        warning. An invalid file changes nothing; every problem is logged. Returns the
        problems (empty: applied)."""
        try:
            new = load_config(self.config.file)
        except ConfigError as e:
            for problem in e.problems:
                _log.error("reload refused, still serving the running config: {problem}", problem=str(problem))
            return [str(p) for p in e.problems]
        try:
            config, restart = keep_restart_only_settings(self.config, new)
        except ReloadRefused as e:
            _log.error("reload refused, still serving the running config: {why}", why=str(e))
            return [str(e)]
        for what in restart:
            _log.warn("reload: {what} changed; that needs a restart, the running value stays", what=what)
        old = self.proxy
        keep = {name: group for name, group in old.groups.items() if config.upstreams.get(name) == group.config}
        try:
            path = self._request_path(config, keep)
            for index, tls in self.server_tls.items():
                tls.load(config.listen[index].tls)  # type: ignore[arg-type]  # re-read: new handshakes get them
        except Exception as e:                        # a file readable at load but not usable
            _log.failure("reload refused, still serving the running config")
            return [f"reload failed: {e}"]
        self.config = config
        self.switch.pipeline = path                   # new requests take it; running ones keep theirs
        for index, http in self.tls_factories.items():
            http.hsts = _hsts(config.listen[index].tls)
        for name, group in self.proxy.groups.items():
            if name not in keep and self.running:
                group.start()
        for name, group in old.groups.items():
            if name not in keep:
                group.retire()             # idle connections now; busy ones when their exchange ends
        _log.info("reload: {file} applied: {routes} routes, {upstreams} upstreams ({kept} kept as they were)",
                  file=config.file, routes=len(config.routes), upstreams=len(config.upstreams), kept=len(keep))
        return []

    def reload_everywhere(self) -> list[str]:
        """`reload()` here and, under `--workers`, in every worker: once this one has applied the
        file, SIGHUP to the parent, which forwards it to each worker (this one reads the same
        file again: no change). Returns this process's problems (empty: applied)."""
        problems = self.reload()
        parent = os.environ.get(WORKERS_PARENT)
        if not problems and parent:
            os.kill(int(parent), signal.SIGHUP)
        return problems

    def _limit_stores(self, config: Config) -> tuple[RedisLink | None, RateLimitStore, LocalStore]:
        """(Redis link, the configured store, in-process buckets: the store itself for
        backend local, else the on_redis_error fallback)."""
        limits = config.rate_limits
        local = LocalStore(self.clock, limits.max_buckets if limits is not None else 100_000)
        if limits is None or limits.backend == "local":
            if config.redis is not None:
                _log.warn("redis: is configured but unused (rate_limits.backend is local)")
            return None, local, local
        assert config.redis is not None        # the config refuses a Redis backend without redis:
        from txgateway.filters.ratelimit.redislink import RedisLink  # txredisapi: only a Redis-backed limiter
        from txgateway.filters.ratelimit.redisstore import HybridStore, RedisStore
        link = RedisLink(config.redis, self.clock)
        if limits.backend == "redis":
            return link, RedisStore(link), local
        return link, HybridStore(link, self.clock, limits.sync_interval, limits.max_buckets), local

    def _remote_jwks(self, config: Config) -> RemoteJwks | None:
        jwt_config = config.auth.jwt if config.auth is not None else None
        if jwt_config is None or jwt_config.jwks_url is None:
            return None
        import treq
        from twisted.web.http_headers import Headers

        from txgateway.filters.auth.jwks import RemoteJwks
        pool = quiet_pool(self.reactor)

        def fetch(url: str) -> Deferred[bytes]:
            d = treq.get(url, pool=pool, reactor=self.reactor, headers=Headers({b"Accept": [b"application/json"]}))
            return d.addCallback(_body_if_ok)

        return RemoteJwks(jwt_config.jwks_url, self.clock, fetch, jwt_config.jwks_cooldown,
                          jwt_config.jwks_refresh, jwt_config.jwks_timeout)

    @property
    def upstreams(self) -> dict[str, Any]:
        return self.proxy.groups

    def _bound_port(self, index: int) -> int | None:
        """The port listener `index` is bound to (its endpoint's when not bound yet)."""
        service = self.listeners[index] if index < len(self.listeners) else None
        waiting = getattr(service, "_waitingForPort", None)
        if waiting is not None and waiting.called and not isinstance(waiting.result, Failure):
            return int(waiting.result.getHost().port)
        return tcp_port(self.config.listen[index].endpoint)

    def ports(self) -> list[int]:
        """The bound TCP ports, in listener order (for tests and the demo banner)."""
        return [s._waitingForPort.result.getHost().port for s in self.listeners]  # type: ignore[union-attr]

    def privilegedStartService(self) -> None:
        """Bind every listener (twistd does this before dropping privileges); one that cannot
        bind stops start-up with a ListenerError naming it and its address."""
        Service.privilegedStartService(self)
        for service in self:
            try:
                service.privilegedStartService()
            except CannotListenError as e:
                name, endpoint = self._named[service]
                raise ListenerError(f"{name} ({endpoint}) {cannot_listen(e)}") from None

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    def readiness(self) -> tuple[bool, dict[str, str]]:
        """(ready, why) for /readyz: not while draining, not before every listener is bound,
        and not while Redis is down if that means refusing (on_redis_error: deny)."""
        checks = {"config": "loaded", "draining": "yes" if self.draining else "no"}
        bound = all(s._waitingForPort is not None and s._waitingForPort.called for s in self.listeners)
        checks["listeners"] = "bound" if bound and self.running else "not bound"
        ready = bound and bool(self.running) and not self.draining
        if self.redis is not None:
            checks["redis"] = "up" if self.redis.up else "down"
            limits = self.config.rate_limits
            if not self.redis.up and limits is not None and limits.on_redis_error == "deny":
                ready = False
        return ready, checks

    async def _stop(self) -> None:
        self.draining = True                   # /readyz says 503 from now on
        Service.stopService(self)
        for listener in self.listeners:        # stop accepting; the admin listener (and any
            await listener.stopService()       # other child) stays up while draining
        give_up = self.clock.seconds() + self.config.drain_timeout
        while self._busy() and self.clock.seconds() < give_up:
            await deferLater(self.clock, 0.05, lambda: None)
        cut = self.stats.in_flight
        if cut:
            _log.warn("drain_timeout ({seconds:g}s) reached: cutting {count} request(s) still in flight",
                      seconds=self.config.drain_timeout, count=cut)
        closing = False
        for factory in self.factories:
            for conn in list(factory.connections):
                conn.close()
                closing = True
            if factory.others:
                from txgateway.transport.h2 import close_h2  # only listeners offering h2 have any
                for transport in _open(factory.others):
                    close_h2(transport)
                    closing = True
        if closing:
            # Their connections close on the next reactor turns: let what they still send go
            # out (HTTP/2's GOAWAY, TLS close_notify: the reactor drops unsent bytes when it
            # stops) and cut requests' access-log lines be written before the log writer stops.
            await deferLater(self.reactor, 0.05, lambda: None)
            if self.stats.in_flight:
                # A TLS close waits for the client's close_notify (a client need not send it):
                # until the connection is gone its request is neither ended nor logged.
                for factory in self.factories:
                    for conn in list(factory.connections):
                        conn.transport.abortConnection()
                    for transport in _open(factory.others):
                        transport.abortConnection()
                await deferLater(self.reactor, 0.05, lambda: None)
        for child in reversed(list(self)):     # the Manhole, admin, then the components, last
            if child not in self.listeners:    # started first stopped last (the log writer)
                await child.stopService()

    def _busy(self) -> bool:
        """Requests in flight: HTTP/1.1 ones queued on their connections, and every request the
        pipeline has not finished yet (HTTP/2 streams, WebSocket sessions included)."""
        return self.stats.in_flight > 0 or any(conn._queue for factory in self.factories for conn in factory.connections)


def _open(transports: Any) -> list[Any]:
    """The transports (of HTTP/2 connections) not lost yet: a lost one stays in its WeakSet
    until it is garbage, and TLS fails on being closed again."""
    return [transport for transport in list(transports) if transport.connected]


MAX_JWKS_BYTES = 1 << 20


def _body_if_ok(response: Any) -> Deferred[bytes]:
    """The body of a 200 response, refusing more than MAX_JWKS_BYTES (a JWKS is small)."""
    if response.code != 200:
        raise ValueError(f"HTTP {response.code}")
    return read_body(response, MAX_JWKS_BYTES)
