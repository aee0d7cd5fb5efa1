"""The proxy terminal's route key: `upstream: NAME` sends the route's requests upstream."""

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
                     config.limits.idle_timeout, resources.keep)
    return resources.shared("proxy", make)


def _build(resources: Resources, config: Any) -> Any:
    return proxy_for(resources)


def _make(proxy: Any, upstream: str, route: Any) -> Any:
    return proxy


PROXY = TerminalKind(name="proxy", route_key="upstream", parse_route=_parse_route, build=_build, make=_make,
                     answers_later=True)
