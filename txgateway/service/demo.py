"""`twistd -n txgateway --demo`: the gateway plus three in-process demo upstreams.

The upstreams (`users`, `orders`, `search`) answer JSON describing what they received, so
`curl` shows the gateway's work: the rewritten path, the query, and the headers the gateway
set (X-Forwarded-*, X-Correlation-ID, traceparent).
"""

from __future__ import annotations

import json
import string
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from txgateway.config.schema import Config, parse_config
from txgateway.ops.accesslog import TextStream

__all__ = ["DEMO_CONFIG", "DemoPorts", "EchoResource", "banner", "demo_service"]

_log = Logger(namespace="txgateway.service.demo")

# Demo only: a fixed, public secret so that `txgateway token --demo` can sign for it.
DEMO_SECRET = "txgateway-demo-secret-do-not-use-in-production"

PORTS_VARIABLE = "TXGATEWAY_DEMO_PORTS"


@dataclass(frozen=True)
class DemoPorts:
    """The demo's ports on 127.0.0.1: the gateway, its admin listener, the three upstreams."""

    gateway: int = 8080
    admin: int = 8081
    users: int = 3001
    search: int = 3002
    orders: int = 3003

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DemoPorts:
        """TXGATEWAY_DEMO_PORTS="gateway=18080,admin=18081" moves the ports it names (so that a
        second demo, or a test, runs next to one on the usual ports)."""
        text = environ.get(PORTS_VARIABLE, "").strip()
        if not text:
            return cls()
        names = [f.name for f in fields(cls)]
        ports: dict[str, int] = {}
        for item in text.split(","):
            name, _, port = item.strip().partition("=")
            if name not in names or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{PORTS_VARIABLE}: expected NAME=PORT[,NAME=PORT...] with NAME one of "
                                 f"{', '.join(names)} and PORT from 1 to 65535, got {item.strip()!r}")
            ports[name] = int(port)
        return cls(**ports)

    def upstreams(self) -> dict[str, int]:
        return {"users": self.users, "search": self.search, "orders": self.orders}


DEMO_CONFIG = string.Template("""
listen:
  - endpoint: "tcp:$gateway:interface=127.0.0.1"
admin:
  endpoint: "tcp:$admin:interface=127.0.0.1"
trusted_proxies: [127.0.0.1/32]
auth:
  jwt:
    algorithms: [HS256]
    secret_env: TXGATEWAY_DEMO_SECRET
    issuer: txgateway-demo
    leeway: 30s
upstreams:
  users:  {targets: ["http://127.0.0.1:$users"], timeout: 5s}
  search:
    targets: ["http://127.0.0.1:$search"]
    timeout: 5s
    circuit_breaker: {consecutive_failures: 3, open_for: 10s}   # try ?fail=1 three times
  orders: {targets: ["http://127.0.0.1:$orders"], timeout: 5s}
routes:
  - {prefix: /api/users, upstream: users, rewrite_prefix: /users, auth: required}
  - {prefix: /api/search, upstream: search, rewrite_prefix: /search}
  - prefix: /api/orders
    upstream: orders
    rewrite_prefix: /orders
    roles: [admin]
    request_headers: {set: {X-Api-Version: "2"}, remove: [Cookie]}
    response_headers: {remove: [X-Db-Query-Count, X-Powered-By]}
  - prefix: /api/profile
    auth: required            # it answers with the users upstream's data: protected as /api/users is
    compose:
      path: /{id}
      calls:
        user: {upstream: users, path: "/users/{id}", group: user}
        orders: {upstream: orders, path: "/orders?user={id}", group: orders, required: false, fallback: []}
""")

BANNER = """txgateway demo on http://127.0.0.1:{p.gateway} - try:
  curl -s 'localhost:{p.gateway}/api/search?q=x'                  # public
  curl -si localhost:{p.gateway}/api/users/7                       # 401: auth required
  TOKEN=$(.venv/bin/txgateway token --demo --sub alice --role admin --tier pro)
  curl -s localhost:{p.gateway}/api/users/7 -H "Authorization: Bearer $TOKEN"
  curl -si localhost:{p.gateway}/api/orders/1 -H "Authorization: Bearer $TOKEN" -H 'Cookie: dropped=1'
  curl -si localhost:{p.gateway}/api/orders/1 -H "Authorization: Bearer $(.venv/bin/txgateway token --demo --sub bob)"  # 403
  curl -s localhost:{p.gateway}/api/profile/7 -H "Authorization: Bearer $TOKEN"   # users and orders, one JSON answer
  curl -si localhost:{p.gateway}/nowhere
  for i in 1 2 3; do curl -s -o /dev/null -w '%{{http_code}} ' 'localhost:{p.gateway}/api/search?fail=1'; done
  curl -si 'localhost:{p.gateway}/api/search?q=x'                 # 503: the breaker is open for 10s
Status page: http://127.0.0.1:{p.admin}/ (also /status, /metrics, /healthz, /readyz)"""


def demo_config(ports: DemoPorts | None = None) -> Config:
    text = DEMO_CONFIG.substitute(asdict(ports or DemoPorts()))
    return parse_config(text, "<demo>", {"TXGATEWAY_DEMO_SECRET": DEMO_SECRET})


def banner(ports: DemoPorts) -> str:
    return BANNER.format(p=ports)


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
    def __init__(self, text: str) -> None:
        self.text = text

    def startService(self) -> None:
        super().startService()
        _log.info("{banner}", banner=self.text)   # the text holds braces: not a format string


def demo_service(reactor: Any, environ: Mapping[str, str], stdout: TextStream) -> MultiService:
    """The demo on the ports `environ` names (DemoPorts.from_environ); its access log goes to
    `stdout`."""
    from txgateway.service.gateway import Gateway
    try:
        ports = DemoPorts.from_environ(environ)
    except ValueError as e:
        raise SystemExit(f"txgateway: {e}") from None
    top = MultiService()
    for name, port in ports.upstreams().items():
        site = Site(EchoResource(name))
        site.noisy = False
        site.log = lambda request: None  # type: ignore[method-assign]
        service = StreamServerEndpointService(serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1"), site)
        service._raiseSynchronously = True
        service.setServiceParent(top)
    Gateway(demo_config(ports), reactor, stdout=stdout).setServiceParent(top)
    _Banner(banner(ports)).setServiceParent(top)
    return top
