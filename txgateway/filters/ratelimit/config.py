"""The `rate_limits:` section and each route's `rate_limit:`, validated at load."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import yaml

from txgateway.config.reader import Reader, _Invalid
from txgateway.config.units import Rate, parse_duration
from txgateway.core.hopbyhop import consumed_by_transport
from txgateway.filters.headerconfig import refuse_dropped

__all__ = ["RATE_LIMIT", "LimitsConfig", "RouteLimit", "Tier", "parse_rate_limits", "parse_route_limit"]

_HEADER = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_SCOPE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Tier:
    name: str
    rate: Rate
    burst: int


@dataclass(frozen=True)
class LimitsConfig:
    tiers: Mapping[str, Tier]
    default_tier: str
    backend: str = "local"              # local | redis | hybrid
    sync_interval: float = 0.1          # hybrid: how often local consumption meets Redis
    on_redis_error: str = "local"       # local | allow | deny
    instances: int = 1                  # the local fallback limits each instance to rate / instances
    max_buckets: int = 100_000


@dataclass(frozen=True)
class RouteLimit:
    """A route's `rate_limit:`. `key` is ip | user | api_key | header (then `header` names it)."""

    key: str
    header: bytes | None = None        # lower-case header name for key: header:NAME
    rate: Rate | None = None           # overrides the tier's rate ...
    burst: int | None = None           # ... and burst
    scope: str | None = None           # routes naming the same scope share buckets


def _burst(r: Reader, fields: dict[str, yaml.Node], path: str) -> int | None:
    if "burst" not in fields:
        return None
    return r.integer(fields["burst"], f"{path}.burst", 1)


def parse_rate_limits(r: Reader, node: yaml.Node) -> LimitsConfig:
    path = "rate_limits"
    f = r.mapping(node, path, {k: "" for k in (
        "backend", "sync_interval", "on_redis_error", "instances", "tiers", "default_tier", "max_buckets")})
    values: dict[str, Any] = {}
    if "backend" in f:
        values["backend"] = r.attempt(lambda: r.choice(f["backend"], f"{path}.backend", ("local", "redis", "hybrid")), "local")
    backend = values.get("backend", "local" if "backend" not in f else None)
    if "sync_interval" in f:
        if backend not in ("hybrid", None):
            r.fail(f["sync_interval"], f"{path}.sync_interval", f"only used with backend: hybrid (backend is {backend})")
        interval = r.attempt(lambda: r.parsed(f["sync_interval"], f"{path}.sync_interval", parse_duration), 0.1)
        if not 0.01 <= interval <= 10.0:
            r.fail(f["sync_interval"], f"{path}.sync_interval", f"expected between 10ms and 10s, got {f['sync_interval'].value}")
        values["sync_interval"] = interval
    for key in ("on_redis_error", "instances"):
        if key in f and backend == "local":
            r.fail(f[key], f"{path}.{key}", "only used with backend: redis or hybrid (backend is local)")
    if "on_redis_error" in f:
        values["on_redis_error"] = r.attempt(
            lambda: r.choice(f["on_redis_error"], f"{path}.on_redis_error", ("local", "allow", "deny")), "local")
    if "instances" in f:
        values["instances"] = r.attempt(lambda: r.integer(f["instances"], f"{path}.instances", 1), 1)
    if "tiers" not in f:
        raise r.fail(node, f"{path}.tiers", "missing (required): e.g. {free: {rate: 100/hour}}")
    tiers: dict[str, Tier] = {}
    declared: list[str] = []     # valid or not: an invalid tier reports its own problem, once
    for name, _, value in r.free_mapping(f["tiers"], f"{path}.tiers"):
        declared.append(name)
        tier_path = f"{path}.tiers.{name}"
        t = r.attempt(lambda: r.mapping(value, tier_path, {"rate": "", "burst": ""}), None)
        if t is None:
            continue
        if "rate" not in t:
            r.fail(value, f"{tier_path}.rate", 'missing (required): e.g. "100/hour"')
            continue
        rate = r.attempt(lambda: r.parsed(t["rate"], f"{tier_path}.rate", Rate.parse), None)
        burst = r.attempt(lambda: _burst(r, t, tier_path), None)
        if rate is not None:
            tiers[name] = Tier(name, rate, burst or rate.count)
    if not declared:
        raise r.fail(f["tiers"], f"{path}.tiers", "expected at least one tier")
    default = r.string(f["default_tier"], f"{path}.default_tier") if "default_tier" in f else None
    if default is None:
        if len(declared) != 1:
            raise r.fail(node, f"{path}.default_tier", f"missing: which of {', '.join(declared)} applies without a tier")
        default = declared[0]
    elif default not in declared:
        raise r.fail(f["default_tier"], f"{path}.default_tier", f'no tier named "{default}" (defined: {", ".join(declared)})')
    if "max_buckets" in f:
        values["max_buckets"] = r.integer(f["max_buckets"], f"{path}.max_buckets", 100)
    if len(tiers) != len(declared):
        raise _Invalid()
    return LimitsConfig(tiers=MappingProxyType(tiers), default_tier=default, **values)


def _route_key(r: Reader, f: dict[str, yaml.Node], path: str) -> tuple[str, bytes | None]:
    key_text = r.string(f["key"], f"{path}.key") if "key" in f else "ip"
    if key_text.startswith("header:"):
        name = key_text[len("header:"):]
        if not _HEADER.match(name):
            raise r.fail(f["key"], f"{path}.key", f'expected header:NAME with a header name, got "{key_text}"')
        refuse_dropped(r, f["key"], f"{path}.key", name)
        low = name.lower()
        if low != "host" and consumed_by_transport(low.encode()):
            raise r.fail(f["key"], f"{path}.key", f"{name} is consumed by the HTTP layer and never reaches "
                                                  "the limiter (header:Host works)")
        return "header", low.encode()
    if key_text in ("ip", "user", "api_key"):
        return key_text, None
    raise r.fail(f["key"], f"{path}.key", f'expected ip, user, api_key or header:NAME, got "{key_text}"')


def _scope(r: Reader, f: dict[str, yaml.Node], path: str) -> str | None:
    if "scope" not in f:
        return None
    scope = r.string(f["scope"], f"{path}.scope")
    if not _SCOPE.match(scope):
        raise r.fail(f["scope"], f"{path}.scope", f'expected 1-64 of [A-Za-z0-9_.-], got "{scope}"')
    return scope


def parse_route_limit(r: Reader, node: yaml.Node, path: str, has_limits: bool) -> RouteLimit:
    """Every problem of the route's rate_limit is reported, not only the first."""
    f = r.mapping(node, path, {"key": "", "rate": "", "burst": "", "scope": ""})
    before = len(r.problems)
    no_key: tuple[str, bytes | None] = ("ip", None)
    key, header = r.attempt(lambda: _route_key(r, f, path), no_key)
    rate = r.attempt(lambda: r.parsed(f["rate"], f"{path}.rate", Rate.parse), None) if "rate" in f else None
    burst = r.attempt(lambda: _burst(r, f, path), None)
    if "burst" in f and "rate" not in f:
        r.fail(f["burst"], f"{path}.burst", "a route's burst needs the route's own rate")
    scope = r.attempt(lambda: _scope(r, f, path), None)
    if "rate" not in f and not has_limits:
        r.fail(node, path, "needs a rate here or a rate_limits: section with tiers")
    if len(r.problems) != before:
        raise _Invalid()
    return RouteLimit(key=key, header=header, rate=rate, burst=burst, scope=scope)


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Any) -> RouteLimit | None:
    if "rate_limit" not in fields:
        return None
    return parse_route_limit(r, fields["rate_limit"], f"{path}.rate_limit", "rate_limits" in scope.sections)


def _check_routes(r: Reader, routes: list[tuple[str, yaml.Node, RouteLimit]]) -> None:
    """Routes sharing a scope share its buckets, so they must agree on what fills them."""
    scopes: dict[str, tuple[Any, Any, str]] = {}
    for path, node, limit in routes:
        if limit.scope is not None:
            first = scopes.setdefault(limit.scope, (limit.rate, limit.burst, path))
            if first[:2] != (limit.rate, limit.burst):
                r.fail(node, f"{path}.rate_limit", f'routes sharing scope "{limit.scope}" must share rate and burst '
                                                   f"(differs from {first[2]})")


def _parse_section(r: Reader, node: yaml.Node, top: dict[str, yaml.Node], environ: Mapping[str, str] | None) -> LimitsConfig:
    limits = r.attempt(lambda: parse_rate_limits(r, node), None)
    backend = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == "backend"
                    and isinstance(v, yaml.ScalarNode)), None) if isinstance(node, yaml.MappingNode) else None
    if backend is not None and backend.value in ("redis", "hybrid") and "redis" not in top:
        r.fail(backend, "rate_limits.backend", f"{backend.value} needs a redis: section (url or sentinel)")
    if limits is None:
        raise _Invalid()
    return limits


_RESTART_ONLY = ("backend", "sync_interval", "on_redis_error", "instances", "max_buckets")


def _reload(running: LimitsConfig | None, new: LimitsConfig | None) -> tuple[LimitsConfig | None, list[str]]:
    """Tiers reload; the bucket store (and what it was made with) stays until a restart."""
    import dataclasses

    from txgateway.config.contract import ReloadRefused
    if running is not None and new is not None:
        moved = [key for key in _RESTART_ONLY if getattr(new, key) != getattr(running, key)]
        if moved:
            new = dataclasses.replace(new, **{key: getattr(running, key) for key in moved})
        return new, [f"rate_limits.{key}" for key in moved]
    changed = running if running is not None else new
    if changed is not None and changed.backend != "local":
        raise ReloadRefused("rate_limits: a Redis-backed limiter added or removed needs a restart")
    return new, []


def _build(resources: Any, limit: RouteLimit, route: Any) -> Any:
    from txgateway.filters.ratelimit.filter import Limiter, RateLimitFilter

    def limiter() -> Limiter:
        own = [(p.scope or r.prefix, p.rate.count, p.rate.window)
               for r in resources.config.routes
               if (p := r.policies.get("rate_limit")) is not None and p.rate is not None]
        return Limiter(resources.config.rate_limits, own, resources.limiter, resources.local_buckets)

    return RateLimitFilter(resources.shared("rate_limit", limiter), limit, route)


def _kind() -> Any:
    from txgateway.config.contract import FilterKind
    return FilterKind(name="rate_limit", build=_build, route_keys=("rate_limit",), parse_route=_parse_route,
                      check_routes=_check_routes, section="rate_limits", parse_section=_parse_section, reload=_reload)


RATE_LIMIT = _kind()
