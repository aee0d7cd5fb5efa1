"""`twistd -n txgateway --demo`: the gateway plus three in-process demo upstreams.

The upstreams (`users`, `orders`, `search`, as in the seed chapter) answer JSON describing
what they received, so `curl` shows the gateway's work: the rewritten path, the query, and
the headers the gateway set (X-Forwarded-*, X-Correlation-ID, traceparent).
"""

from __future__ import annotations

import json
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from txgateway.config import Config, parse_config

__all__ = ["DEMO_CONFIG", "EchoResource", "demo_service"]

_log = Logger(namespace="txgateway.demo")

DEMO_UPSTREAMS = {"users": 3001, "search": 3002, "orders": 3003}

# Demo only: a fixed, public secret so that `txgateway token --demo` can sign for it.
DEMO_SECRET = "txgateway-demo-secret-do-not-use-in-production"

DEMO_CONFIG = """
listen:
  - endpoint: "tcp:8080:interface=127.0.0.1"
trusted_proxies: [127.0.0.1/32]
auth:
  jwt:
    algorithms: [HS256]
    secret_env: TXGATEWAY_DEMO_SECRET
    issuer: txgateway-demo
    leeway: 30s
upstreams:
  users:  {targets: ["http://127.0.0.1:3001"], timeout: 5s}
  search:
    targets: ["http://127.0.0.1:3002"]
    timeout: 5s
    circuit_breaker: {consecutive_failures: 3, open_for: 10s}   # try ?fail=1 three times
  orders: {targets: ["http://127.0.0.1:3003"], timeout: 5s}
routes:
  - {prefix: /api/users, upstream: users, rewrite_prefix: /users, auth: required}
  - {prefix: /api/search, upstream: search, rewrite_prefix: /search}
  - prefix: /api/orders
    upstream: orders
    rewrite_prefix: /orders
    roles: [admin]
    request_headers: {set: {X-Api-Version: "2"}, remove: [Cookie]}
    response_headers: {remove: [X-Db-Query-Count, X-Powered-By]}
"""

BANNER = """txgateway demo on http://127.0.0.1:8080 - try:
  curl -s 'localhost:8080/api/search?q=x'                  # public
  curl -si localhost:8080/api/users/7                       # 401: auth required
  TOKEN=$(.venv/bin/txgateway token --demo --sub alice --role admin --tier pro)
  curl -s localhost:8080/api/users/7 -H "Authorization: Bearer $TOKEN"
  curl -si localhost:8080/api/orders/1 -H "Authorization: Bearer $TOKEN" -H 'Cookie: dropped=1'
  curl -si localhost:8080/api/orders/1 -H "Authorization: Bearer $(.venv/bin/txgateway token --demo --sub bob)"  # 403
  curl -si localhost:8080/nowhere
  for i in 1 2 3; do curl -s -o /dev/null -w '%{http_code} ' 'localhost:8080/api/search?fail=1'; done
  curl -si 'localhost:8080/api/search?q=x'                 # 503: the breaker is open for 10s"""


def demo_config() -> Config:
    return parse_config(DEMO_CONFIG, "<demo>", {"TXGATEWAY_DEMO_SECRET": DEMO_SECRET})


class EchoResource(Resource):
    """Answers every request with a JSON description of what it received; with `fail=1` in
    the query it answers 503 instead (to watch a circuit breaker open)."""

    isLeaf = True

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def render(self, request: Any) -> bytes:
        body = request.content.read() if request.content is not None else b""
        headers = {k.decode("latin-1"): ", ".join(v.decode("latin-1") for v in vs)
                   for k, vs in request.requestHeaders.getAllRawHeaders()}
        path, _, query = request.uri.partition(b"?")
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Powered-By", b"txgateway-demo")
        request.setHeader(b"X-Internal-Host", b"demo-" + self.service.encode())
        if b"fail=1" in query.split(b"&"):
            request.setResponseCode(503)
        if request.method == b"HEAD":
            return b""
        return json.dumps({
            "service": self.service,
            "method": request.method.decode(),
            "path": path.decode("latin-1"),
            "query": query.decode("latin-1"),
            "headers": headers,
            "body_bytes": len(body),
        }, indent=2).encode() + b"\n"


class _Banner(Service):
    def startService(self) -> None:
        super().startService()
        _log.info(BANNER)


def demo_service(reactor: Any) -> MultiService:
    from txgateway.gateway import Gateway
    top = MultiService()
    for name, port in DEMO_UPSTREAMS.items():
        site = Site(EchoResource(name))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        service = StreamServerEndpointService(serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"), site)
        service._raiseSynchronously = True
        service.setServiceParent(top)
    Gateway(demo_config(), reactor).setServiceParent(top)
    _Banner().setServiceParent(top)
    return top
