"""`cache:` on a route and the global `cache:` section, parsed through the config reader.

Light on purpose (the registry imports it at every start): the filter, its store and the
RFC 9111 rules are imported by `build`, only when a route has `cache:`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader
from txgateway.config.units import parse_duration, parse_size
from txgateway.filters.headerconfig import header_name

__all__ = ["CACHE", "CacheSettings", "RouteCache"]


@dataclass(frozen=True)
class CacheSettings:
    """The global `cache:` section: one store for every cached route."""

    max_memory: int = 64 * 2**20        # the memory every stored response holds (store.Entry.size), LRU beyond
    max_object_size: int = 8 * 2**20    # larger responses pass through uncached, never held
    credentials: bool = False           # store answers to requests with credentials (RFC 9111 §3.5)
    lock_timeout: float = 5.0           # how long concurrent misses wait for the first one
    store_set_cookie: bool = False      # keep Set-Cookie in stored responses (sent to every client)


@dataclass(frozen=True)
class RouteCache:
    """A route's `cache:`."""

    ttl: float = 0.0                    # freshness when the response gives none (heuristic)
    methods: frozenset[bytes] = frozenset({b"GET", b"HEAD"})
    query: bool | tuple[bytes, ...] = True   # whole query, none of it, or these parameters
    headers: tuple[bytes, ...] = ()     # request headers added to the key (lower case)
    identity: bool = False              # key by the authenticated user id
    serve_stale: float = 0.0            # stale entries answer when the upstream cannot


_ROUTE = {"ttl": "", "methods": "", "key": "", "serve_stale": ""}
_KEY = {"query": "", "headers": "", "identity": ""}
_SECTION = {"max_memory": "", "max_object_size": "", "credentials": "", "lock_timeout": "", "store_set_cookie": ""}


def _duration(r: Reader, node: yaml.Node, path: str) -> float:
    return r.parsed(node, path, parse_duration)


def _parse_key(r: Reader, node: yaml.Node, path: str) -> dict[str, Any]:
    f = r.mapping(node, path, _KEY)
    out: dict[str, Any] = {}
    if "query" in f:
        q = f["query"]
        if isinstance(q, yaml.SequenceNode):
            out["query"] = tuple(sorted(r.string(n, p).encode() for p, n in r.sequence(q, f"{path}.query")))
        else:
            out["query"] = r.boolean(q, f"{path}.query")
    if "headers" in f:
        out["headers"] = tuple(header_name(r, n, p, from_clients=True).lower() for p, n in r.sequence(f["headers"], f"{path}.headers"))
    if "identity" in f:
        out["identity"] = r.boolean(f["identity"], f"{path}.identity")
    return out


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> RouteCache | None:
    if "cache" not in fields:
        return None
    node = fields["cache"]
    path = f"{path}.cache"
    f = r.mapping(node, path, _ROUTE)
    args: dict[str, Any] = {}
    if "ttl" in f:
        args["ttl"] = _duration(r, f["ttl"], f"{path}.ttl")
    if "serve_stale" in f:
        args["serve_stale"] = _duration(r, f["serve_stale"], f"{path}.serve_stale")
    if "methods" in f:
        methods = set()
        for p, n in r.sequence(f["methods"], f"{path}.methods"):
            methods.add(r.choice(n, p, ("GET", "HEAD")).encode())
        if b"GET" not in methods:
            raise r.fail(f["methods"], f"{path}.methods", "expected GET among the methods (HEAD is served from a stored GET)")
        args["methods"] = frozenset(methods)
    if "key" in f:
        args.update(_parse_key(r, f["key"], f"{path}.key"))
    return RouteCache(**args)


def parse_section(r: Reader, node: yaml.Node, top: dict[str, yaml.Node],
                  environ: Mapping[str, str] | None) -> CacheSettings:
    f = r.mapping(node, "cache", _SECTION)
    args: dict[str, Any] = {}
    for key in ("max_memory", "max_object_size"):
        if key in f:
            size = r.parsed(f[key], f"cache.{key}", parse_size)
            if size <= 0:
                raise r.fail(f[key], f"cache.{key}", f"expected a size above zero, got {size}")
            args[key] = size
    for key in ("credentials", "store_set_cookie"):
        if key in f:
            args[key] = r.boolean(f[key], f"cache.{key}")
    if "lock_timeout" in f:
        args["lock_timeout"] = _duration(r, f["lock_timeout"], "cache.lock_timeout")
    if "max_object_size" not in args and "max_memory" in args:
        args["max_object_size"] = min(CacheSettings.max_object_size, args["max_memory"])
    settings = CacheSettings(**args)
    if settings.max_object_size > settings.max_memory:
        raise r.fail(f.get("max_object_size", node), "cache.max_object_size",
                     f"expected at most max_memory ({settings.max_memory} bytes), got {settings.max_object_size}")
    return settings


def _build(resources: Any, policy: RouteCache, route: Any) -> Any:
    from txgateway.filters.cache.filter import build_filter
    return build_filter(resources, policy, route)


CACHE = FilterKind(name="cache", build=_build, route_keys=("cache",), parse_route=parse_route,
                   section="cache", parse_section=parse_section)
