"""The request path as a pure function of a config: routes, chains, terminals, one Pipeline.

Built at start and again on each reload; the gateway swaps it with one assignment
(`Switch.pipeline`), so a request runs from start to end on the path it started on.
"""

from __future__ import annotations

from typing import Any

from txgateway.config import registry
from txgateway.config.contract import Resources
from txgateway.config.schema import Config
from txgateway.core.pipeline import Chain, Filter, Pipeline
from txgateway.filters.headers import ForwardingHeaders, HeaderRulesFilter, TrustedProxies
from txgateway.filters.routing import RouteTable, RoutingFilter

__all__ = ["build_request_path", "redirect_path"]


def build_request_path(config: Config, resources: Resources, observers: list[Any], tracing: Any = None) -> Pipeline:
    """Every route's chain (its filters from the registry, in registry order), its terminal,
    and the edge every request starts on (sanitise, route). `observers` (the counters, the
    access log) finish every request; `tracing` (ops/tracing.py), if on, opens each request's
    span in the edge's forwarding filter, ends it last, and hears of each upstream attempt."""
    gate = tracing.gate if tracing is not None else None    # ops/sampling.py: what every request passes
    if gate is not None:
        observers = [*observers, gate]
    forwarding = ForwardingHeaders(TrustedProxies(config.trusted_proxies), config.underscores_in_headers, gate)
    shared = {kind.name: kind.build(resources, config) for kind in registry.TERMINALS}
    terminals = {kind.name: kind for kind in registry.TERMINALS}
    chains = []
    for route in config.routes:
        filters: list[Filter] = [kind.build(resources, route.policies[kind.name], route)
                                 for kind in registry.FILTERS if kind.name in route.policies]
        kind = terminals[route.terminal]
        terminal = kind.make(shared[kind.name], route.answer, route)
        chains.append(Chain(route.prefix, filters, [*observers, forwarding, *filters], terminal))
    table = RouteTable(config.routes)
    edge = Chain("(no route)", [forwarding, RoutingFilter(table, chains)],
                 [*observers, forwarding, HeaderRulesFilter()], None)
    pipeline = Pipeline(edge, chains, table, resources.clock, resources.stats, config.limits,
                        {name: part for name, part in shared.items() if part is not None})
    for kind in registry.TERMINALS:
        if kind.answers_later and shared[kind.name] is not None:
            shared[kind.name].pipeline = pipeline
    if gate is not None and "proxy" in pipeline.terminals:
        pipeline.terminals["proxy"].tracing = gate
    if gate is not None and "compose" in pipeline.terminals:    # a composed call's attempts are spans too
        pipeline.terminals["compose"].calls.tracing = gate
    return pipeline


def redirect_path(config: Config, resources: Resources, observers: list[Any], redirect: Filter) -> Pipeline:
    """Plain listeners under `redirect_to_https`: sanitise, then 308 to https, for every request."""
    forwarding = ForwardingHeaders(TrustedProxies(config.trusted_proxies), config.underscores_in_headers)
    edge = Chain("(redirect to https)", [forwarding, redirect], [*observers, forwarding], None)
    return Pipeline(edge, (), None, resources.clock, resources.stats, config.limits)
