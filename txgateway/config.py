"""The config file: YAML in, frozen and validated values out.

Loaded once (at start, and on reload later); nothing downstream re-validates. Every error
names the file, the key path and the line. Sections that later work implements are
recognised so that using them fails loudly ("not supported yet") instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from txgateway._yamlreader import ConfigError, ConfigProblem, Reader, _Invalid, cannot_write, compose
from txgateway.adminconfig import AdminConfig, ManholeConfig, parse_admin, parse_manhole
from txgateway.authconfig import AuthConfig, parse_auth
from txgateway.breaker import BreakerSettings
from txgateway.endpoints import endpoint_problem, overlapping
from txgateway.limitconfig import LimitsConfig, RouteLimit, parse_rate_limits, parse_route_limit
from txgateway.redisconfig import RedisConfig, parse_redis
from txgateway.resilienceconfig import (
    HealthCheck,
    PassiveHealth,
    parse_circuit_breaker,
    parse_health_check,
    parse_passive_health,
)
from txgateway.tlsconfig import ListenerTLS, UpstreamTLS, parse_listener_tls, parse_upstream_tls
from txgateway.units import parse_duration, parse_size

__all__ = [
    "Config", "ConfigError", "ConfigProblem", "HeaderRules", "Limits", "Listener", "Route",
    "Target", "Upstream", "load_config", "parse_config",
]

# Keys of the SPEC that later work implements: accepted by name, refused with this reason.
_NOT_YET = "not supported yet in this version of txgateway; remove it or upgrade"
_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_GLOB = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_METHOD = re.compile(r"^[A-Z]+$")
_HOST = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^\[[0-9a-f:.]+\]$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

DEFAULT_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
)


@dataclass(frozen=True)
class Listener:
    endpoint: str
    tls: ListenerTLS | None = None


@dataclass(frozen=True)
class Limits:
    max_body_size: int = 10 * 2**20
    max_header_bytes: int = 16 * 2**10
    header_timeout: float = 10.0
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    https: bool = False

    @property
    def netloc(self) -> bytes:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode()


@dataclass(frozen=True)
class Upstream:
    name: str
    targets: tuple[Target, ...]
    connect_timeout: float = 1.0
    timeout: float = 30.0
    max_connections: int = 1024
    preserve_host: bool = False
    balance: str = "round_robin"                 # round_robin | least_request | random
    retries: int = 0                             # idempotent requests, other targets, before any response byte
    circuit_breaker: BreakerSettings | None = None
    health_check: HealthCheck | None = None
    passive_health: PassiveHealth = PassiveHealth()  # noqa: RUF009 (frozen: one shared default is safe)
    tls: UpstreamTLS | None = None               # for https:// targets (verified by default)


@dataclass(frozen=True)
class HeaderRules:
    """`set` replaces, `add` appends, `remove` deletes by name or `*` glob (lower-case)."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class Route:
    prefix: str
    upstream: str
    rewrite_prefix: str | None = None
    methods: frozenset[bytes] | None = None
    host: str | None = None
    request_headers: HeaderRules = HeaderRules()
    response_headers: HeaderRules = HeaderRules()
    security_headers: tuple[tuple[bytes, bytes], ...] = DEFAULT_SECURITY_HEADERS
    auth: str = "none"                    # none | optional | required
    roles: frozenset[str] | None = None   # any of these roles (implies auth: required)
    rate_limit: RouteLimit | None = None
    index: int = 0


@dataclass(frozen=True)
class Config:
    file: str
    listen: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]   # read-only (MappingProxyType): values are frozen all the way
    routes: tuple[Route, ...]
    limits: Limits = Limits()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    access_log: str = "-"
    drain_timeout: float = 10.0
    auth: AuthConfig | None = None
    rate_limits: LimitsConfig | None = None
    redis: RedisConfig | None = None
    admin: AdminConfig | None = None
    manhole: ManholeConfig | None = None
    redirect_to_https: bool = False


def load_config(path: str) -> Config:
    """Read and validate `path`; raise ConfigError listing every problem."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([ConfigProblem(path, None, "", f"cannot read config: {e.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError([ConfigProblem(path, line, "", f"cannot read config: not UTF-8 text (byte 0x{data[e.start]:02x})")]) from None
    return parse_config(text, path)


def parse_config(text: str, file: str = "<config>", environ: Mapping[str, str] | None = None) -> Config:
    """Validate YAML text; `environ` (default os.environ) supplies `secret_env` values."""
    root = compose(text, file)
    reader = Reader(file)
    if root is None:
        raise ConfigError([ConfigProblem(file, None, "", "the file is empty")])
    config = reader.attempt(lambda: _config(reader, root, environ), None)
    if reader.problems or config is None:
        # In line order; a file the config names (API keys) after the config's own lines.
        raise ConfigError(sorted(reader.problems, key=lambda p: (p.file != file, p.file, p.line or 0)))
    return config


_TOP_KEYS = {
    "listen": "listeners", "redirect_to_https": "", "admin": "", "manhole": "", "redis": "",
    "trusted_proxies": "", "limits": "", "drain_timeout": "", "auth": "", "rate_limits": "",
    "upstreams": "", "routes": "", "access_log": "",
}


def _config(r: Reader, root: yaml.Node, environ: Mapping[str, str] | None) -> Config:
    top = r.mapping(root, "", _TOP_KEYS)
    manhole = r.attempt(lambda: parse_manhole(r, top["manhole"]), None) if "manhole" in top else None
    admin = r.attempt(lambda: parse_admin(r, top["admin"], environ), None) if "admin" in top else None
    for key in ("listen", "upstreams", "routes"):
        if key not in top:
            r.fail(root, key, "missing (required)")
    no_listeners: tuple[Listener, ...] = ()
    no_upstreams: dict[str, Upstream] = {}
    no_routes: tuple[Route, ...] = ()
    listen = r.attempt(lambda: _listeners(r, top["listen"]), no_listeners) if "listen" in top else no_listeners
    upstreams = r.attempt(lambda: _upstreams(r, top["upstreams"]), no_upstreams) if "upstreams" in top else no_upstreams
    declared = ({k.value for k, _ in top["upstreams"].value if isinstance(k, yaml.ScalarNode)}
                if isinstance(top.get("upstreams"), yaml.MappingNode) else set())
    auth = r.attempt(lambda: parse_auth(r, top["auth"], environ), None) if "auth" in top else None
    rate_limits = r.attempt(lambda: parse_rate_limits(r, top["rate_limits"]), None) if "rate_limits" in top else None
    sections = frozenset(k for k in ("auth", "rate_limits") if k in top)
    redis = r.attempt(lambda: parse_redis(r, top["redis"], environ), None) if "redis" in top else None
    backend = _scalar_at(top.get("rate_limits"), "backend")
    if backend is not None and backend.value in ("redis", "hybrid") and "redis" not in top:
        r.fail(backend, "rate_limits.backend", f"{backend.value} needs a redis: section (url or sentinel)")
    routes = r.attempt(lambda: _routes(r, top["routes"], upstreams, declared, sections), no_routes) if "routes" in top else no_routes
    redirect = r.attempt(lambda: r.boolean(top["redirect_to_https"], "redirect_to_https"), False) \
        if "redirect_to_https" in top else False
    # Declared, even if its certificates failed to load: that failure is the error to show.
    declared_tls = isinstance(top.get("listen"), yaml.SequenceNode) and any(
        isinstance(item, yaml.MappingNode) and any(isinstance(k, yaml.ScalarNode) and k.value == "tls"
                                                   for k, _ in item.value)
        for item in top["listen"].value)
    if redirect and not declared_tls:
        r.fail(top["redirect_to_https"], "redirect_to_https", "needs a listener with tls: to redirect to")
    _shared_ports(r, top, admin, manhole)
    limits = r.attempt(lambda: _limits(r, top["limits"]), Limits()) if "limits" in top else Limits()
    proxies = r.attempt(lambda: _networks(r, top["trusted_proxies"], "trusted_proxies"), ()) if "trusted_proxies" in top else ()
    access_log = r.attempt(lambda: _access_log(r, top["access_log"]), "-") if "access_log" in top else "-"
    drain = r.attempt(lambda: r.parsed(top["drain_timeout"], "drain_timeout", parse_duration), 10.0) if "drain_timeout" in top else 10.0
    return Config(file=r.file, listen=listen, upstreams=MappingProxyType(upstreams), routes=routes, limits=limits,
                  trusted_proxies=proxies, access_log=access_log, drain_timeout=drain, auth=auth,
                  rate_limits=rate_limits, redis=redis, admin=admin, manhole=manhole,
                  redirect_to_https=redirect)


def _access_log(r: Reader, node: yaml.Node) -> str:
    """`-` (stdout), `off`, or a file the gateway can append to (created if missing)."""
    if r.string(node, "access_log") in ("-", "off"):
        return str(node.value)
    file = r.file_path(node, "access_log")
    problem = cannot_write(file)
    if problem is not None:
        raise r.fail(node, "access_log", f"cannot write {file}: {problem}")
    return file


def _shared_ports(r: Reader, top: dict[str, yaml.Node], admin: AdminConfig | None, manhole: ManholeConfig | None) -> None:
    """Two of the gateway's own listeners (listen, admin, manhole) on one port: the second
    would fail to bind at start."""
    items = top["listen"].value if isinstance(top.get("listen"), yaml.SequenceNode) else []
    named: list[tuple[str, yaml.Node, str]] = [
        (f"listen[{i}].endpoint", scalar, str(scalar.value)) for i, item in enumerate(items)
        if (scalar := _scalar_at(item, "endpoint")) is not None]
    for key, section in (("admin", admin), ("manhole", manhole)):
        if section is not None:
            named.append((f"{key}.endpoint", _scalar_at(top[key], "endpoint") or top[key], section.endpoint))
    valid = [(path, node, endpoint) for path, node, endpoint in named if endpoint_problem(endpoint) is None]
    for i, (path, node, endpoint) in enumerate(valid):
        taken = next(((p, e) for p, _, e in valid[:i] if overlapping(e, endpoint)), None)
        if taken is not None:
            r.fail(node, path, f'"{endpoint}" binds the same port as {taken[0]} ("{taken[1]}"): only one can listen there')


def _scalar_at(node: yaml.Node | None, key: str) -> yaml.ScalarNode | None:
    """The scalar under `key` in a mapping node, whatever else is wrong with the mapping."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key and isinstance(v, yaml.ScalarNode):
                return v
    return None


def _listeners(r: Reader, node: yaml.Node) -> tuple[Listener, ...]:
    out = []
    before = len(r.problems)
    for path, item in r.sequence(node, "listen"):
        fields = r.attempt(lambda: r.mapping(item, path, {"endpoint": "", "tls": ""}), None)
        if fields is None:
            continue
        tls = r.attempt(lambda: parse_listener_tls(r, fields["tls"], f"{path}.tls"), None) if "tls" in fields else None
        if "endpoint" not in fields:
            r.fail(item, f"{path}.endpoint", "missing (required)")
            continue
        endpoint = r.attempt(lambda: r.endpoint(fields["endpoint"], f"{path}.endpoint"), None)
        if endpoint is not None and ("tls" not in fields or tls is not None):
            out.append(Listener(endpoint, tls))
    if not out and len(r.problems) == before:
        raise r.fail(node, "listen", "expected at least one listener")
    return tuple(out)


def _limits(r: Reader, node: yaml.Node) -> Limits:
    keys = {"max_body_size": "", "max_header_bytes": "", "header_timeout": "", "idle_timeout": ""}
    fields = r.mapping(node, "limits", keys)
    values: dict[str, Any] = {}
    for key in ("max_body_size", "max_header_bytes"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"limits.{key}", parse_size), getattr(Limits, key))
    for key in ("header_timeout", "idle_timeout"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"limits.{key}", parse_duration), getattr(Limits, key))
    if values.get("max_header_bytes", Limits.max_header_bytes) < 1024:
        r.fail(fields.get("max_header_bytes"), "limits.max_header_bytes", "expected at least 1KiB")
    return Limits(**values)


def _networks(r: Reader, node: yaml.Node, path: str) -> tuple[Any, ...]:
    out = []
    for item_path, item in r.sequence(node, path):
        text = r.attempt(lambda: r.string(item, item_path), None)
        if text is None:
            continue
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            r.fail(item, item_path, f'expected an address or CIDR like "10.0.0.0/8", got "{text}"')
    return tuple(out)


_UPSTREAM_KEYS = {
    "targets": "", "balance": "", "connect_timeout": "", "timeout": "", "retries": "",
    "circuit_breaker": "", "health_check": "", "tls": "", "max_connections": "", "preserve_host": "",
    "passive_health": "",
}


def _upstreams(r: Reader, node: yaml.Node) -> dict[str, Upstream]:
    out = {}
    for name, _, value in r.free_mapping(node, "upstreams"):
        upstream = r.attempt(lambda: _upstream(r, name, value), None)
        if upstream is not None:
            out[name] = upstream
    return out


def _upstream(r: Reader, name: str, node: yaml.Node) -> Upstream:
    path = f"upstreams.{name}"
    fields = r.mapping(node, path, _UPSTREAM_KEYS)
    values: dict[str, Any] = {}
    if "tls" in fields:
        tls = r.attempt(lambda: parse_upstream_tls(r, fields["tls"], f"{path}.tls"), None)
        if tls is not None:
            values["tls"] = tls
    if "balance" in fields:
        values["balance"] = r.attempt(lambda: r.choice(fields["balance"], f"{path}.balance",
                                                       ("round_robin", "least_request", "random")), "round_robin")
    if "retries" in fields:
        values["retries"] = r.attempt(lambda: r.integer(fields["retries"], f"{path}.retries"), 0)
        if values["retries"] > 10:
            r.fail(fields["retries"], f"{path}.retries", f"expected at most 10, got {values['retries']}")
    sections = (("circuit_breaker", parse_circuit_breaker), ("health_check", parse_health_check),
                ("passive_health", parse_passive_health))
    for key, parse in sections:
        if key in fields:
            parsed = r.attempt(lambda: parse(r, fields[key], f"{path}.{key}"), None)  # type: ignore[operator]
            if parsed is not None:
                values[key] = parsed
    targets: tuple[Target, ...] = ()
    if "targets" not in fields:
        r.fail(node, f"{path}.targets", "missing (required)")
    else:
        before = len(r.problems)
        items: list[tuple[str, yaml.Node]] = r.attempt(lambda: list(r.sequence(fields["targets"], f"{path}.targets")), [])
        targets = tuple(t for t in (r.attempt(lambda: _target(r, p, n), None) for p, n in items) if t)
        if not targets and len(r.problems) == before:
            r.fail(fields["targets"], f"{path}.targets", "expected at least one target URL")
    for key in ("connect_timeout", "timeout"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"{path}.{key}", parse_duration), getattr(Upstream, key))
    if "max_connections" in fields:
        values["max_connections"] = r.attempt(lambda: r.integer(fields["max_connections"], f"{path}.max_connections", 1), 1024)
    if "preserve_host" in fields:
        values["preserve_host"] = r.attempt(lambda: r.boolean(fields["preserve_host"], f"{path}.preserve_host"), False)
    if not targets:
        raise _Invalid()
    return Upstream(name=name, targets=targets, **values)


def _target(r: Reader, path: str, node: yaml.Node) -> Target:
    url = r.string(node, path)
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if (parts.scheme not in ("http", "https") or not parts.hostname or port in (-1, 0) or parts.path not in ("", "/")
            or parts.query or parts.fragment):
        raise r.fail(node, path, f'expected a URL like "http://10.0.0.11:3001" or "https://api.internal", got "{url}"')
    https = parts.scheme == "https"
    return Target(url=url, host=parts.hostname, port=port or (443 if https else 80), https=https)


_ROUTE_KEYS = {
    "prefix": "", "upstream": "", "rewrite_prefix": "", "methods": "", "host": "", "auth": "",
    "roles": "", "rate_limit": "", "cache": "", "request_headers": "", "response_headers": "",
    "security_headers": "",
}


def _routes(r: Reader, node: yaml.Node, upstreams: dict[str, Upstream], declared: set[str],
            sections: frozenset[str]) -> tuple[Route, ...]:
    out: list[Route] = []
    seen: dict[tuple[str, str | None, frozenset[bytes] | None], str] = {}
    scopes: dict[str, tuple[Any, Any, str]] = {}
    for path, item in r.sequence(node, "routes"):
        route = r.attempt(lambda: _route(r, path, item, upstreams, declared, len(out), sections), None)
        if route is None:
            continue
        limit = route.rate_limit
        if limit is not None and limit.scope is not None:
            first = scopes.setdefault(limit.scope, (limit.rate, limit.burst, path))
            if first[:2] != (limit.rate, limit.burst):
                r.fail(item, f"{path}.rate_limit", f'routes sharing scope "{limit.scope}" must share rate and burst '
                                                   f"(differs from {first[2]})")
        key = (route.prefix, route.host, route.methods)
        if key in seen:
            r.fail(item, f"{path}.prefix", f'duplicate prefix "{route.prefix}" (already used by {seen[key]})')
            continue
        seen[key] = path
        out.append(route)
    return tuple(out)


def _route(r: Reader, path: str, node: yaml.Node, upstreams: dict[str, Upstream], declared: set[str],
           index: int, sections: frozenset[str]) -> Route:
    fields = r.mapping(node, path, _ROUTE_KEYS)
    before = len(r.problems)
    if "cache" in fields:
        r.fail(fields["cache"], f"{path}.cache", _NOT_YET)
    no_policy: dict[str, Any] = {}
    policy = r.attempt(lambda: _route_auth(r, fields, path, "auth" in sections), no_policy)
    if "rate_limit" in fields:
        policy["rate_limit"] = r.attempt(
            lambda: parse_route_limit(r, fields["rate_limit"], f"{path}.rate_limit", "rate_limits" in sections), None)
    for key in ("prefix", "upstream"):
        if key not in fields:
            r.fail(node, f"{path}.{key}", "missing (required)")
    prefix = r.attempt(lambda: _path_prefix(r, fields["prefix"], f"{path}.prefix"), None) if "prefix" in fields else None
    upstream = r.attempt(lambda: r.string(fields["upstream"], f"{path}.upstream"), None) if "upstream" in fields else None
    if upstream is not None and upstream not in upstreams and upstream not in declared:
        known = ", ".join(sorted(declared)) or "none defined"
        r.fail(fields["upstream"], f"{path}.upstream", f'no upstream named "{upstream}" (defined: {known})')
    values: dict[str, Any] = {}
    if "rewrite_prefix" in fields:
        values["rewrite_prefix"] = r.attempt(lambda: _path_prefix(r, fields["rewrite_prefix"], f"{path}.rewrite_prefix"), None)
    if "methods" in fields:
        values["methods"] = r.attempt(lambda: _methods(r, fields["methods"], f"{path}.methods"), None)
    if "host" in fields:
        values["host"] = r.attempt(lambda: _host(r, fields["host"], f"{path}.host"), None)
    for key in ("request_headers", "response_headers"):
        if key in fields:
            values[key] = r.attempt(lambda: _header_rules(r, fields[key], f"{path}.{key}"), HeaderRules())
    if "security_headers" in fields:
        values["security_headers"] = r.attempt(
            lambda: _security_headers(r, fields["security_headers"], f"{path}.security_headers"), None)
    values.update(policy)
    if len(r.problems) != before or prefix is None or upstream not in upstreams:
        raise _Invalid()  # every problem is recorded already (an invalid upstream reports its own)
    return Route(prefix=prefix, upstream=upstream, index=index, **values)


def _route_auth(r: Reader, fields: dict[str, yaml.Node], path: str, has_auth: bool) -> dict[str, Any]:
    """`auth: none | optional | required` and `roles` (which imply required)."""
    out: dict[str, Any] = {}
    if "auth" in fields:
        out["auth"] = r.attempt(lambda: r.choice(fields["auth"], f"{path}.auth", ("none", "optional", "required")), "none")
    if "roles" in fields:
        roles = [r.string(n, p) for p, n in r.sequence(fields["roles"], f"{path}.roles")]
        if not roles:
            r.fail(fields["roles"], f"{path}.roles", "expected at least one role")
        if out.get("auth", "required") != "required":
            r.fail(fields["roles"], f"{path}.roles", f'roles need auth: required, got auth: {out["auth"]}')
        out["roles"] = frozenset(roles)
        out["auth"] = "required"
    if out.get("auth", "none") != "none" and not has_auth:
        key = "auth" if "auth" in fields else "roles"
        r.fail(fields[key], f"{path}.{key}", "this route needs credentials but the config has no auth: section")
    return out


def _methods(r: Reader, node: yaml.Node, path: str) -> frozenset[bytes]:
    methods = []
    for item_path, item in r.sequence(node, path):
        method = r.string(item, item_path)
        if not _METHOD.match(method):
            raise r.fail(item, item_path, f'expected an upper-case HTTP method like "GET", got "{method}"')
        methods.append(method.encode())
    return frozenset(methods)


def _host(r: Reader, node: yaml.Node, path: str) -> str:
    host = r.string(node, path).lower()
    if not _HOST.match(host):
        raise r.fail(node, path, f'expected a host name like "api.example.com" or "*.example.com", got "{host}"')
    return host


def _path_prefix(r: Reader, node: yaml.Node, path: str) -> str:
    text = r.string(node, path)
    if not text.startswith("/") or "?" in text or "#" in text or "/../" in f"{text}/" or "/./" in f"{text}/":
        raise r.fail(node, path, f'expected an absolute path like "/api/users", got "{text}"')
    return text.rstrip("/") or "/"


def _header_name(r: Reader, node: yaml.Node, path: str, glob: bool = False) -> bytes:
    name = r.string(node, path)
    valid = _HEADER_GLOB.match(name) if glob else _TOKEN.match(name.encode())
    if not valid:
        raise r.fail(node, path, f'expected a header name like "X-Api-Version", got "{name}"')
    return name.encode()


def _header_value(r: Reader, node: yaml.Node, path: str) -> bytes:
    value = r.scalar(node, path)
    text = value if isinstance(value, str) else ("" if value is None else str(value).lower() if isinstance(value, bool) else str(value))
    if _BAD_VALUE.search(text):
        raise r.fail(node, path, "header values must not contain control characters (CR, LF, NUL...)")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise r.fail(node, path, f'header values must be Latin-1 text, got "{text}"') from None


def _header_rules(r: Reader, node: yaml.Node, path: str) -> HeaderRules:
    fields = r.mapping(node, path, {"set": "", "add": "", "remove": ""})
    pairs: dict[str, tuple[tuple[bytes, bytes], ...]] = {}
    before = len(r.problems)
    for key in ("set", "add"):
        if key in fields:
            pairs[key] = r.attempt(lambda: tuple(
                (_header_name(r, k, f"{path}.{key}.{name}"), _header_value(r, v, f"{path}.{key}.{name}"))
                for name, k, v in r.free_mapping(fields[key], f"{path}.{key}")), ())
    remove: tuple[bytes, ...] = ()
    if "remove" in fields:
        remove = r.attempt(lambda: tuple(_header_name(r, item, item_path, glob=True).lower()
                                         for item_path, item in r.sequence(fields["remove"], f"{path}.remove")), ())
    if len(r.problems) != before:
        raise _Invalid()
    return HeaderRules(set=pairs.get("set", ()), add=pairs.get("add", ()), remove=remove)


def _security_headers(r: Reader, node: yaml.Node, path: str) -> tuple[tuple[bytes, bytes], ...]:
    """Per-route overrides of the default security headers; `null` turns one off."""
    merged = {name.lower(): (name, value) for name, value in DEFAULT_SECURITY_HEADERS}
    for name, key_node, value_node in r.free_mapping(node, path):
        header = _header_name(r, key_node, f"{path}.{name}")
        if r.scalar(value_node, f"{path}.{name}") is None:
            merged.pop(header.lower(), None)
        else:
            merged[header.lower()] = (header, _header_value(r, value_node, f"{path}.{name}"))
    return tuple(merged.values())
