"""`websocket: {origins, max_tunnels, max_tunnels_per_client}`: who may open a route's tunnels.

- `origins`: a browser sends the page's Origin with every WebSocket handshake, and the
  cookies of the site the handshake goes to: without a check, any page can open a session
  with its visitor's cookies (cross-site WebSocket hijacking). A handshake whose Origin is
  not listed gets 403 `FORBIDDEN`; one without Origin (not a browser: no cookies ride along
  uninvited) passes.
- `max_tunnels_per_client`: tunnels one client address may hold open at once on the route,
  429 `TOO_MANY_TUNNELS` beyond (the client's own doing: closing one lets the next in).
- `max_tunnels`: tunnels open at once on the route, from everyone, 503 `TOO_MANY_TUNNELS`
  beyond (capacity, not the client's fault: it may retry later).

A tunnel counts from its accepted handshake until it ends (`on_finished`). Only upgrades are
looked at: other requests on the route pass for the cost of one comparison. The counts
belong to the route's chain; a reload starts new counts, and tunnels opened before it end on
the old ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader
from txgateway.core.pipeline import LocalResponse, RequestContext, error_response

__all__ = ["WEBSOCKET", "WebSocketGuard", "WebSocketPolicy"]

_ORIGIN = re.compile(r"^(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$")


@dataclass(frozen=True)
class WebSocketPolicy:
    origins: frozenset[bytes] | None = None       # None: any Origin
    max_tunnels: int | None = None
    max_tunnels_per_client: int | None = None


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> WebSocketPolicy | None:
    if "websocket" not in fields:
        return None
    node = fields["websocket"]
    path = f"{path}.websocket"
    f = r.mapping(node, path, {"origins": "", "max_tunnels": "", "max_tunnels_per_client": ""})
    if not node.value:                             # (unknown keys alone are reported by mapping)
        raise r.fail(node, path, "expected at least one of origins, max_tunnels, max_tunnels_per_client")
    origins = None
    if "origins" in f:
        origins = frozenset(_origin(r, item, item_path) for item_path, item in r.sequence(f["origins"], f"{path}.origins"))
    limits = {key: r.integer(f[key], f"{path}.{key}", minimum=1)
              for key in ("max_tunnels", "max_tunnels_per_client") if key in f}
    return WebSocketPolicy(origins, **limits)


def _origin(r: Reader, node: yaml.Node, path: str) -> bytes:
    value = r.string(node, path).lower()
    if not _ORIGIN.match(value):
        raise r.fail(node, path, f'expected an origin like "https://app.example.com" (scheme, host and '
                                 f"optional port; no path), got {value!r}")
    return value.encode()


class WebSocketGuard:
    """One route's Origin check and tunnel counts."""

    name = "websocket"
    on_response_head = None
    on_response_body = None

    def __init__(self, policy: WebSocketPolicy) -> None:
        self.origins = policy.origins
        self.max_tunnels = policy.max_tunnels
        self.max_per_client = policy.max_tunnels_per_client
        self.open = 0
        self.by_client: dict[str, int] = {}

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        if ctx.upgrade is None:
            return None
        origin = ctx.header(b"origin")
        if self.origins is not None and origin is not None and origin.lower() not in self.origins:
            ctx.note("websocket", "origin refused")
            return error_response(ctx, 403, "FORBIDDEN", "this route does not accept WebSocket sessions from "
                                                         "this Origin")
        client = ctx.client_ip
        held = self.by_client.get(client, 0)
        if self.max_per_client is not None and held >= self.max_per_client:
            ctx.note("websocket", "client tunnel limit")
            return error_response(ctx, 429, "TOO_MANY_TUNNELS", f"this client already holds {held} WebSocket "
                                                                "sessions on this route; close one first")
        if self.max_tunnels is not None and self.open >= self.max_tunnels:
            ctx.note("websocket", "route tunnel limit")
            return error_response(ctx, 503, "TOO_MANY_TUNNELS", "this route holds as many WebSocket sessions "
                                                                "as it may; retry later")
        self.open += 1
        self.by_client[client] = held + 1
        ctx.set_state(self.name, client)
        return None

    def on_finished(self, ctx: RequestContext) -> None:
        client = ctx.get_state(self.name)
        if client is None:
            return
        self.open -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


def _build(resources: Any, policy: WebSocketPolicy, route: Any) -> WebSocketGuard:
    return WebSocketGuard(policy)


WEBSOCKET = FilterKind(name="websocket", build=_build, route_keys=("websocket",), parse_route=parse_route)
