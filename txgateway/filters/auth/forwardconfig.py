"""A route's `auth: {forward: {...}}`: the auth service that decides, as nginx's `auth_request` does.

The auth service is one of the config's `upstreams:` (its targets, pool, breaker, timeouts
and health checks are set where every upstream's are), asked at `path`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import Scope
from txgateway.config.reader import Reader
from txgateway.config.units import parse_duration
from txgateway.filters.headerconfig import header_names
from txgateway.upstream.config import upstream_name

__all__ = ["ForwardAuthConfig", "parse_forward"]

_KEYS = {k: "" for k in ("upstream", "path", "headers_to_send", "headers_from_response", "cache_ttl", "cache_size")}


@dataclass(frozen=True)
class ForwardAuthConfig:
    upstream: str                                  # the auth service, one of upstreams:
    path: bytes = b"/"                             # where it is asked
    headers_to_send: tuple[bytes, ...] = (b"authorization", b"cookie")        # lower case
    headers_from_response: tuple[bytes, ...] = (b"x-user-id", b"x-user-role", b"x-user-tier")
    cache_ttl: float = 0.0                         # 0: every request asks
    cache_size: int = 10000                        # decisions kept at most


def parse_forward(r: Reader, node: yaml.Node, path: str, scope: Scope) -> ForwardAuthConfig:
    f = r.mapping(node, path, _KEYS)
    if "upstream" not in f:
        raise r.fail(node, f"{path}.upstream", "missing (required): the upstream that runs the auth service")
    upstream = r.attempt(lambda: upstream_name(r, f["upstream"], f"{path}.upstream", scope), "")
    values: dict[str, Any] = {}
    if "path" in f:
        where = r.string(f["path"], f"{path}.path")
        if not where.startswith("/") or any(c in where for c in " \t\r\n#"):
            r.fail(f["path"], f"{path}.path", f'expected a path like "/auth/verify", got "{where}"')
        values["path"] = where.encode("latin-1", "replace")
    for key in ("headers_to_send", "headers_from_response"):
        if key in f:
            values[key] = tuple(name.lower() for name in header_names(r, f[key], f"{path}.{key}",
                                                                       from_clients=key == "headers_to_send"))
    if "cache_ttl" in f:
        values["cache_ttl"] = r.attempt(lambda: r.parsed(f["cache_ttl"], f"{path}.cache_ttl", parse_duration), 0.0)
    if "cache_size" in f:
        values["cache_size"] = r.attempt(lambda: r.integer(f["cache_size"], f"{path}.cache_size", minimum=1), 1)
    return ForwardAuthConfig(upstream, **values)
