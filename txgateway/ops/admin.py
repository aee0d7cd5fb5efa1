"""The admin listener: /healthz, /readyz, /status (JSON), /metrics (Prometheus) and a status page.

It runs on twisted.web (admin traffic is a few requests a second; the data path never goes
through here) on its own endpoint, loopback by default. With `admin.token_env` set, /status,
/metrics and the page's data need `Authorization: Bearer <token>`; /healthz and /readyz stay
open for probes, and the page's HTML holds no data (it asks for the token, kept in the URL
fragment, which browsers never send). With `admin.config_api`, /config reads and replaces the
configuration (ops/configapi.py).

Hardened as a listener a browser can reach: it answers only requests whose `Host` is
loopback, an IP address or one of `admin.allowed_hosts` (403 otherwise: a web page cannot
read /status through DNS rebinding); every answer carries the security headers of proxied
responses and a Content-Security-Policy that forbids framing, and `Server` names no version.
A request's head must arrive within `limits.header_timeout` (408; a trickle never extends
it), an idle connection closes after `limits.idle_timeout`, and ops/admission.py caps the
connections and keeps descriptors for the main listeners.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from txgateway import __version__
from txgateway.config.reader import ConfigError
from txgateway.filters.headerconfig import DEFAULT_SECURITY_HEADERS
from txgateway.ops.admission import Admission
from txgateway.ops.configapi import MAX_BODY, apply, check, problems_body, running
from txgateway.ops.stats import MetricsCollector
from txgateway.ops.statuspage import STATUS_PAGE, STATUS_PAGE_CSP
from txgateway.ops.workerstats import whole_gateway

__all__ = ["AdminResource", "admin_site", "status"]


def status(gateway: Any) -> dict[str, Any]:
    """Everything /status shows (and the Manhole's status()): what runs, and how it is doing."""
    now = gateway.clock.seconds()
    stats, _, workers = whole_gateway(gateway)
    config = gateway.config
    upstreams = {}
    for name, group in gateway.proxy.groups.items():
        upstreams[name] = {
            "balance": group.config.balance,
            "retries": group.config.retries,
            "targets": group.balancer.snapshot(),
            "breaker": group.breaker.snapshot() if group.breaker is not None else None,
            "health_check": group.config.health_check.path.decode() if group.config.health_check else None,
        }
    limits = config.rate_limits
    cache = gateway.durable.get("cache")
    return {
        "version": __version__,
        "uptime_s": round(now - stats.started_at, 3),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": config.file,
        "ready": gateway.readiness()[0],
        "draining": gateway.draining,
        "listeners": [listener.endpoint for listener in config.listen],
        "routes": [{"prefix": r.prefix, "upstream": r.upstream, "methods": sorted(m.decode() for m in r.methods or ()),
                    "host": r.host, "terminal": r.terminal, "filters": sorted(r.policies),
                    "auth": r.policies["auth"].mode if "auth" in r.policies else "none",
                    "rate_limit": r.policies["rate_limit"].key if "rate_limit" in r.policies else None}
                   for r in config.routes],
        "upstreams": upstreams,
        "limiter": {
            "backend": limits.backend if limits is not None else None,
            "on_redis_error": limits.on_redis_error if limits is not None else None,
            "local_buckets": len(gateway.local_buckets.buckets),
            "redis": gateway.redis.state if gateway.redis is not None else None,
        },
        "requests": {"total": stats.finished, "in_flight": stats.in_flight, "by_class": stats.by_status_class(),
                     "rate_limited": sum(stats.rejected.values())},
        "cache": cache.snapshot() if cache is not None else None,
        **({"workers": workers} if workers is not None else {}),
    }


MAX_CONNECTIONS = 32          # at once on the admin listener (Prometheus and a few people)
_CSP = b"default-src 'none'; frame-ancestors 'none'"     # JSON and metrics: nothing to run or frame
_CONFIG_METHODS = {b"/config": (b"GET", b"HEAD", b"PUT"), b"/config/check": (b"POST",)}   # with admin.config_api
_PURGE = b"/cache/purge"
_log = Logger(namespace="txgateway.ops.admin")


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, gateway: Any) -> None:
        super().__init__()
        self.gateway = gateway
        admin = gateway.config.admin
        self.token = admin.token if admin is not None else None
        self.hosts = frozenset(["localhost", *(admin.allowed_hosts if admin is not None else ())])
        self.config_api = admin is not None and admin.config_api
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(lambda: whole_gateway(gateway)[:2], gateway.clock,
                                                lambda: gateway.durable.get("cache")))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render(self, request: Any) -> bytes:
        request.setHeader(b"server", b"txgateway")
        for name, value in DEFAULT_SECURITY_HEADERS:
            request.setHeader(name, value)
        request.setHeader(b"content-security-policy", _CSP)
        request.setHeader(b"cache-control", b"no-store")
        host = request.getHeader(b"host")
        if host is not None and not self._host_allowed(host):
            return _json(request, 403, {"error": "this Host is not one the admin listener answers to "
                                                 "(loopback, an IP address or admin.allowed_hosts)"})
        if request.path == _PURGE:
            allowed: tuple[bytes, ...] = (b"POST",)
        else:
            allowed = _CONFIG_METHODS.get(request.path, (b"GET", b"HEAD")) if self.config_api else (b"GET", b"HEAD")
        if request.method not in allowed:
            request.setHeader(b"allow", b", ".join(allowed))
            return _json(request, 405, {"error": f"method not allowed ({', '.join(m.decode() for m in allowed)})"})
        if request.path == _PURGE:
            return self._purge(request)
        if request.method in (b"PUT", b"POST"):
            return self._change_config(request)
        return super().render(request)  # type: ignore[no-any-return]

    def _change_config(self, request: Any) -> bytes:
        """PUT /config (validate, write, reload) and POST /config/check (validate only)."""
        if not self._authorized(request):
            return self._unauthorized(request)
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return _json(request, 413, {"error": f"a configuration is at most {MAX_BODY} bytes"})
        try:
            if request.path == b"/config/check":
                check(self.gateway, body)
                return _json(request, 200, {"valid": True, "file": self.gateway.config.file})
            _log.warn("admin: PUT /config from {client}", client=request.getClientAddress().host)
            return _json(request, 200, apply(self.gateway, body))
        except ConfigError as e:
            return _json(request, 422, problems_body(e.problems))
        except OSError as e:        # the file or its directory is not writable (a read-only /etc)
            return _json(request, 500, {"error": f"cannot write {e.filename}: {e.strerror}; nothing was applied"})

    def _host_allowed(self, host: bytes) -> bool:
        """Loopback names, IP addresses (a DNS-rebinding page always sends its own name) and
        the configured names; any port."""
        text = host.decode("latin-1").strip().lower()
        if text.startswith("["):
            text = text[1:].partition("]")[0]
        elif text.count(":") == 1:
            text = text.partition(":")[0]
        text = text.rstrip(".")
        try:
            ipaddress.ip_address(text)
        except ValueError:
            return text in self.hosts
        return True

    def render_GET(self, request: Any) -> bytes:
        path = request.path
        if path == b"/healthz":
            return _json(request, 200, {"status": "ok"})
        if path == b"/readyz":
            ready, checks = self.gateway.readiness()
            return _json(request, 200 if ready else 503, {"ready": ready, "checks": checks})
        if path == b"/":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"content-security-policy", STATUS_PAGE_CSP)
            return STATUS_PAGE
        if not self._authorized(request):
            return self._unauthorized(request)
        if path == b"/status":
            return _json(request, 200, status(self.gateway))
        if path == b"/status/history":
            return _json(request, 200, self.gateway.history.snapshot())
        if path == b"/config" and self.config_api:
            return _json(request, 200, running(self.gateway))
        if path == b"/metrics":
            # OpenMetrics (with exemplars: trace ids on txgateway_request_duration_seconds) when asked for
            if b"application/openmetrics-text" in (request.getHeader(b"accept") or b""):
                request.setHeader(b"content-type", openmetrics.CONTENT_TYPE_LATEST.encode())
                return openmetrics.generate_latest(self.registry)  # type: ignore[no-any-return]
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(self.registry)
        paths = ["/healthz", "/readyz", "/status", "/status/history", "/metrics", "/"]
        return _json(request, 404, {"error": "not found", "paths": paths + (["/config", "/config/check"] if self.config_api else [])})

    render_HEAD = render_GET

    def _unauthorized(self, request: Any) -> bytes:
        request.setHeader(b"www-authenticate", b'Bearer realm="txgateway-admin"')
        return _json(request, 401, {"error": "admin token required (Authorization: Bearer ...)"})

    def _purge(self, request: Any) -> bytes:
        """`POST /cache/purge?prefix=/api/items` (or `?path=/api/items/7?x=1`, that URL only):
        drops stored responses on every route and host; answers how many."""
        if not self._authorized(request):
            return self._unauthorized(request)
        store = self.gateway.durable.get("cache")
        prefix, path = request.args.get(b"prefix"), request.args.get(b"path")
        if (prefix is None) == (path is None) or not (prefix or path)[0].startswith(b"/"):
            return _json(request, 400, {"error": "give one of ?prefix=/path or ?path=/path?query"})
        if store is None:
            return _json(request, 200, {"purged": 0})
        purged = store.purge_path(prefix[0]) if prefix is not None else store.purge_path(path[0], exact=True)
        return _json(request, 200, {"purged": purged})

    def _authorized(self, request: Any) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token.encode())


def _json(request: Any, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body, indent=2, default=str).encode() + b"\n"


class _AdminChannel(HTTPChannel):
    """twisted.web's channel with a deadline on each request's head: its own timeout restarts
    on every byte, so a client trickling a byte every few seconds would never be closed. As on
    the main listener, the deadline runs from the connection's start, then from the first byte
    of each next request (an idle kept-alive connection is left to the idle timeout); a late
    head gets 408, a connection that sent nothing is just closed."""

    site: _AdminSite
    _late: Any = None
    _between = False          # the last request was answered; the next one has not started
    _started = False          # bytes of the awaited head arrived

    def connectionMade(self) -> None:
        super().connectionMade()
        self.site.admission.open.add(self)
        self._arm()

    def _arm(self) -> None:
        self._late = self.callLater(self.site.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._late is not None and self._late.active():
            self._late.cancel()
        self._late = None

    def _too_slow(self) -> None:
        self._late = None
        transport: Any = self.transport
        if self._started:
            body = b'{"error": "request headers not received in time"}\n'
            transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._between:
            self._between = False
            self._arm()
        self._started = True
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._disarm()
        self._started = False
        super().allHeadersReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._between = self._late is None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._disarm()
        self.site.admission.open.discard(self)
        super().connectionLost(reason)


class _AdminSite(Site):
    protocol = _AdminChannel          # type: ignore[assignment]  # HTTP/1.1 only: no HTTP/2 negotiation here

    def __init__(self, resource: Resource, header_timeout: float, idle_timeout: float, clock: Any) -> None:
        super().__init__(resource, timeout=idle_timeout, reactor=clock)
        self.header_timeout = header_timeout
        self.admission = Admission(MAX_CONNECTIONS)

    def buildProtocol(self, addr: Any) -> Any:
        if not self.admission.admit():
            return None                  # Twisted closes the connection at once
        return super().buildProtocol(addr)


def admin_site(gateway: Any) -> Site:
    limits = gateway.config.limits
    site = _AdminSite(AdminResource(gateway), limits.header_timeout, limits.idle_timeout, gateway.clock)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
