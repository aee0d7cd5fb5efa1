"""The proxy terminal's route key: `upstream: NAME` sends the route's requests upstream."""

from __future__ import annotations

from typing import Any

import yaml

from txgateway.config.contract import Resources, Scope, TerminalKind
from txgateway.config.reader import Reader

__all__ = ["PROXY"]


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> str:
    upstream = r.string(fields["upstream"], f"{path}.upstream")
    if upstream not in scope.upstreams and upstream not in scope.declared:
        known = ", ".join(sorted(scope.declared)) or "none defined"
        raise r.fail(fields["upstream"], f"{path}.upstream", f'no upstream named "{upstream}" (defined: {known})')
    return upstream


def _build(resources: Resources, config: Any) -> Any:
    """One proxy for the whole request path: it holds the upstream groups (pools, breakers,
    health), which routes naming the same upstream share."""
    from txgateway.upstream.proxy import Proxy
    return Proxy(resources.reactor, resources.clock, config.upstreams, resources.deadlines,
                 config.limits, resources.keep)


def _make(proxy: Any, upstream: str, route: Any) -> Any:
    return proxy


PROXY = TerminalKind(name="proxy", route_key="upstream", parse_route=_parse_route, build=_build, make=_make,
                     answers_later=True)
