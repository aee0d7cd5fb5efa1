"""The proxy terminal's route key: `upstream: NAME` sends the route's requests upstream (with
the route's own `timeout` and `connect_timeout` when it has them)."""

from __future__ import annotations

from typing import Any

import yaml

from txgateway.config.contract import Resources, Scope, TerminalKind
from txgateway.config.reader import Reader

__all__ = ["PROXY", "proxy_for", "upstream_name"]


def upstream_name(r: Reader, node: yaml.Node, path: str, scope: Scope) -> str:
    """The name of one of the config's upstreams (a route's, or an auth service's)."""
    upstream = r.string(node, path)
    if upstream not in scope.upstreams and upstream not in scope.declared:
        known = ", ".join(sorted(scope.declared)) or "none defined"
        raise r.fail(node, path, f'no upstream named "{upstream}" (defined: {known})')
    return upstream


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> str:
    return upstream_name(r, fields["upstream"], f"{path}.upstream", scope)


def proxy_for(resources: Resources) -> Any:
    """The request path's one proxy: it holds the upstream groups (pools, breakers, health),
    which routes naming the same upstream share, and so do filters that call an upstream
    themselves (forward auth)."""
    def make() -> Any:
        from txgateway.upstream.proxy import Proxy
        config = resources.config
        return Proxy(resources.reactor, resources.clock, config.upstreams, resources.deadlines,
                     config.limits, resources.keep)
    return resources.shared("proxy", make)


def _build(resources: Resources, config: Any) -> Any:
    return proxy_for(resources)


def _make(proxy: Any, upstream: str, route: Any) -> Any:
    """The proxy itself, or for a route with its own timeouts the proxy with those (for each
    upstream the route may send to: its own and a split's other one)."""
    if route.timeout is None and route.connect_timeout is None:
        return proxy
    from txgateway.upstream.proxy import RouteTimeouts
    split = route.policies.get("split")
    names = (upstream,) if split is None else (upstream, split.upstream)
    by_upstream = {}
    for name in names:
        config = proxy.groups[name].config
        by_upstream[name] = (config.connect_timeout if route.connect_timeout is None else route.connect_timeout,
                             config.timeout if route.timeout is None else route.timeout)
    return RouteTimeouts(proxy, by_upstream)


PROXY = TerminalKind(name="proxy", route_key="upstream", parse_route=_parse_route, build=_build, make=_make,
                     answers_later=True)
