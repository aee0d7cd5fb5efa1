"""The admin listener: /healthz, /readyz, /status (JSON), /metrics (Prometheus) and a status page.

It runs on twisted.web (admin traffic is a few requests a second; the data path never goes
through here) on its own endpoint, loopback by default. With `admin.token_env` set, /status,
/metrics and the page's data need `Authorization: Bearer <token>`; /healthz and /readyz stay
open for probes, and the page's HTML holds no data (it asks for the token, kept in the URL
fragment, which browsers never send).
"""

from __future__ import annotations

import hmac
import json
import time
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.gc_collector import GCCollector
from prometheus_client.openmetrics import exposition as openmetrics
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.web.resource import Resource
from twisted.web.server import Site

from txgateway import __version__
from txgateway.ops.stats import MetricsCollector
from txgateway.ops.statuspage import STATUS_PAGE
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
        **({"workers": workers} if workers is not None else {}),
    }


class AdminResource(Resource):
    isLeaf = True

    def __init__(self, gateway: Any) -> None:
        super().__init__()
        self.gateway = gateway
        self.token = gateway.config.admin.token if gateway.config.admin is not None else None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MetricsCollector(lambda: whole_gateway(gateway)[:2], gateway.clock))
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)

    def render_GET(self, request: Any) -> bytes:
        path = request.path
        request.setHeader(b"cache-control", b"no-store")
        if path == b"/healthz":
            return _json(request, 200, {"status": "ok"})
        if path == b"/readyz":
            ready, checks = self.gateway.readiness()
            return _json(request, 200 if ready else 503, {"ready": ready, "checks": checks})
        if path == b"/":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return STATUS_PAGE
        if not self._authorized(request):
            request.setHeader(b"www-authenticate", b'Bearer realm="txgateway-admin"')
            return _json(request, 401, {"error": "admin token required (Authorization: Bearer ...)"})
        if path == b"/status":
            return _json(request, 200, status(self.gateway))
        if path == b"/metrics":
            # OpenMetrics (with exemplars: trace ids on txgateway_request_duration_seconds) when asked for
            if b"application/openmetrics-text" in (request.getHeader(b"accept") or b""):
                request.setHeader(b"content-type", openmetrics.CONTENT_TYPE_LATEST.encode())
                return openmetrics.generate_latest(self.registry)  # type: ignore[no-any-return]
            request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
            return generate_latest(self.registry)
        return _json(request, 404, {"error": "not found", "paths": ["/healthz", "/readyz", "/status", "/metrics", "/"]})

    render_HEAD = render_GET

    def _authorized(self, request: Any) -> bool:
        if self.token is None:
            return True
        scheme, _, given = (request.getHeader(b"authorization") or b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token.encode())


def _json(request: Any, code: int, body: dict[str, Any]) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(body, indent=2, default=str).encode() + b"\n"


def admin_site(gateway: Any) -> Site:
    site = Site(AdminResource(gateway))
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
