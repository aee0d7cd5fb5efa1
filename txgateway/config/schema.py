"""The config file: YAML in, frozen and validated values out.

Loaded once (at start, and on reload later); nothing downstream re-validates. Every error
names the file, the key path and the line. Sections that later work implements are
recognised so that using them fails loudly ("not supported yet") instead of being ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from txgateway.config import registry
from txgateway.config.contract import Scope
from txgateway.config.reader import ConfigError, ConfigProblem, IPNetwork, Reader, _Invalid, cannot_write, compose
from txgateway.config.units import parse_duration, parse_size
from txgateway.core.route import Route
from txgateway.filters.auth.config import AuthConfig
from txgateway.filters.headerconfig import DEFAULT_SECURITY_HEADERS, HeaderRules
from txgateway.filters.ratelimit.config import LimitsConfig
from txgateway.filters.ratelimit.redisconfig import RedisConfig, parse_redis
from txgateway.filters.routing import BadPath, canonical_path
from txgateway.ops.accesslog import DEFAULT_REDACT, FIELDS
from txgateway.ops.config import AdminConfig, ManholeConfig, parse_admin, parse_manhole
from txgateway.ops.tracingconfig import TracingConfig, parse_tracing
from txgateway.transport.endpoints import endpoint_problem, overlapping
from txgateway.transport.tlsconfig import ListenerTLS, UpstreamTLS, parse_listener_tls, parse_upstream_tls
from txgateway.upstream.breaker import BreakerSettings
from txgateway.upstream.resilienceconfig import (
    HealthCheck,
    PassiveHealth,
    parse_circuit_breaker,
    parse_health_check,
    parse_passive_health,
)

__all__ = [
    "DEFAULT_SECURITY_HEADERS", "Config", "ConfigError", "ConfigProblem", "HeaderRules", "Limits", "Listener",
    "Route", "Target", "Upstream", "load_config", "parse_config",
]

_HOST = re.compile(r"^(\*\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*$|^\[[0-9a-f:.]+\]$")


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
    buffer_request_body: int = 64 * 2**10   # bodies up to this size are read whole before an upstream connection is taken
    body_timeout: float = 10.0              # a request body gets this long, plus 1 s per min_body_rate bytes it delivered
    min_body_rate: int = 1024               # bytes per second; 0: no rate (idle_timeout between reads only)
    max_connections_per_ip: int = 0         # 0: no cap
    # max_body_size, or a route's larger one: what the transports let in before routing
    # (derived from the routes, not a key of limits:)
    largest_body: int = field(default=10 * 2**20, compare=False)


@dataclass(frozen=True)
class Target:
    url: str
    host: str
    port: int
    https: bool = False
    weight: int = 1                  # its share under the balancing policy (relative to the others')

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
class Config:
    file: str
    listen: tuple[Listener, ...]
    upstreams: Mapping[str, Upstream]   # read-only (MappingProxyType): values are frozen all the way
    routes: tuple[Route, ...]
    limits: Limits = Limits()
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    access_log: str = "-"
    access_log_fields: tuple[str, ...] = FIELDS       # which fields a line holds, in order
    access_log_redact: tuple[str, ...] = DEFAULT_REDACT   # query parameters logged as REDACTED
    drain_timeout: float = 10.0
    sections: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))  # filters' sections, by key
    redis: RedisConfig | None = None
    admin: AdminConfig | None = None
    manhole: ManholeConfig | None = None
    tracing: TracingConfig | None = None   # OpenTelemetry spans (ops/tracing.py); read at start only
    redirect_to_https: bool = False
    underscores_in_headers: bool = False   # forward header names with `_` (else dropped)
    source: str = field(default="", repr=False, compare=False)   # the text it was read from (GET /config)

    @property
    def auth(self) -> AuthConfig | None:
        return self.sections.get("auth")

    @property
    def rate_limits(self) -> LimitsConfig | None:
        return self.sections.get("rate_limits")


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
    return replace(config, source=text)


_TOP_KEYS = {
    "listen": "listeners", "redirect_to_https": "", "admin": "", "manhole": "", "redis": "",
    "trusted_proxies": "", "underscores_in_headers": "", "limits": "", "drain_timeout": "", "upstreams": "", "routes": "", "access_log": "",
    "access_log_fields": "", "access_log_redact": "", "tracing": "",
}


def _config(r: Reader, root: yaml.Node, environ: Mapping[str, str] | None) -> Config:
    top = r.mapping(root, "", {**_TOP_KEYS, **{k.section: "" for k in registry.FILTERS if k.section is not None}})
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
    underscores = r.attempt(lambda: r.boolean(top["underscores_in_headers"], "underscores_in_headers"), False) \
        if "underscores_in_headers" in top else False
    r.underscores_in_headers = underscores      # before the sections and routes that name headers
    sections = {}
    for kind in registry.FILTERS:
        if kind.section in top and kind.parse_section is not None:
            parse, node = kind.parse_section, top[kind.section]
            value = r.attempt(lambda: parse(r, node, top, environ), None)
            if value is not None:
                sections[kind.section] = value
    redis = r.attempt(lambda: parse_redis(r, top["redis"], environ), None) if "redis" in top else None
    tracing = r.attempt(lambda: parse_tracing(r, top["tracing"]), None) if "tracing" in top else None
    scope = Scope(frozenset(top), upstreams, frozenset(declared))
    routes = r.attempt(lambda: _routes(r, top["routes"], scope), no_routes) if "routes" in top else no_routes
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
    limits, routes = _route_body_limits(limits, routes)
    no_networks: tuple[IPNetwork, ...] = ()
    proxies = r.attempt(lambda: r.networks(top["trusted_proxies"], "trusted_proxies"), no_networks) \
        if "trusted_proxies" in top else no_networks
    access_log = r.attempt(lambda: _access_log(r, top["access_log"]), "-") if "access_log" in top else "-"
    fields = r.attempt(lambda: _names(r, top["access_log_fields"], "access_log_fields", FIELDS), FIELDS) \
        if "access_log_fields" in top else FIELDS
    redact = r.attempt(lambda: _names(r, top["access_log_redact"], "access_log_redact", None), DEFAULT_REDACT) \
        if "access_log_redact" in top else DEFAULT_REDACT
    drain = r.attempt(lambda: r.parsed(top["drain_timeout"], "drain_timeout", parse_duration), 10.0) if "drain_timeout" in top else 10.0
    return Config(file=r.file, listen=listen, upstreams=MappingProxyType(upstreams), routes=routes, limits=limits,
                  trusted_proxies=proxies, access_log=access_log, access_log_fields=fields,
                  access_log_redact=redact, drain_timeout=drain,
                  sections=MappingProxyType(sections), redis=redis, admin=admin, manhole=manhole,
                  tracing=tracing, redirect_to_https=redirect, underscores_in_headers=underscores)


def _access_log(r: Reader, node: yaml.Node) -> str:
    """`-` (stdout), `off`, or a file the gateway can append to (created if missing)."""
    if r.string(node, "access_log") in ("-", "off"):
        return str(node.value)
    file = r.file_path(node, "access_log")
    problem = cannot_write(file)
    if problem is not None:
        raise r.fail(node, "access_log", f"cannot write {file}: {problem}")
    return file


def _names(r: Reader, node: yaml.Node, path: str, allowed: tuple[str, ...] | None) -> tuple[str, ...]:
    """A list of distinct names (each one of `allowed` unless that is None); empty only for
    access_log_redact (no parameter redacted), not for the fields of a line."""
    names: list[str] = []
    for item_path, item in r.sequence(node, path):
        name = r.string(item, item_path)
        if allowed is not None and name not in allowed:
            raise r.fail(item, item_path, f"expected one of {', '.join(allowed)}, got {name!r}")
        if name in names:
            raise r.fail(item, item_path, f"{name!r} is listed twice")
        names.append(name)
    if allowed is not None and not names:
        raise r.fail(node, path, "expected at least one field")
    return tuple(names)


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
    keys = {"max_body_size": "", "max_header_bytes": "", "header_timeout": "", "idle_timeout": "",
            "buffer_request_body": "", "body_timeout": "", "min_body_rate": "", "max_connections_per_ip": ""}
    fields = r.mapping(node, "limits", keys)
    values: dict[str, Any] = {}
    for key in ("max_body_size", "max_header_bytes", "buffer_request_body", "min_body_rate"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"limits.{key}", parse_size), getattr(Limits, key))
    for key in ("header_timeout", "idle_timeout", "body_timeout"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"limits.{key}", parse_duration), getattr(Limits, key))
    if "max_connections_per_ip" in fields:
        values["max_connections_per_ip"] = r.attempt(
            lambda: r.integer(fields["max_connections_per_ip"], "limits.max_connections_per_ip"), 0)
    if values.get("max_header_bytes", Limits.max_header_bytes) < 1024:
        r.fail(fields.get("max_header_bytes"), "limits.max_header_bytes", "expected at least 1KiB")
    return Limits(**values)


def _route_body_limits(limits: Limits, routes: tuple[Route, ...]) -> tuple[Limits, tuple[Route, ...]]:
    """A route's max_body_size above the global one raises what the transports let in before
    a request is routed; every other route then carries the global limit itself."""
    largest = max([limits.max_body_size, *(r.max_body_size for r in routes if r.max_body_size is not None)])
    if largest == limits.max_body_size:
        return replace(limits, largest_body=largest), routes
    routes = tuple(r if r.max_body_size is not None else replace(r, max_body_size=limits.max_body_size)
                   for r in routes)
    return replace(limits, largest_body=largest), routes


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
    """A URL, or {url: URL, weight: N}: weighted round robin, least_request and random take
    the weight as the target's share."""
    weight = 1
    if isinstance(node, yaml.MappingNode):
        fields = r.mapping(node, path, {"url": "", "weight": ""})
        if "url" not in fields:
            raise r.fail(node, f"{path}.url", "missing (required)")
        if "weight" in fields:
            weight = r.integer(fields["weight"], f"{path}.weight", 1)
            if weight > 1000:
                raise r.fail(fields["weight"], f"{path}.weight", f"expected at most 1000, got {weight}")
        node, path = fields["url"], f"{path}.url"
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
    return Target(url=url, host=parts.hostname, port=port or (443 if https else 80), https=https, weight=weight)


_ROUTE_KEYS = {"prefix": "", "rewrite_prefix": "", "methods": "", "host": "", "escaped_slashes": "",
               "case_insensitive": "", "max_body_size": "", "timeout": "", "connect_timeout": ""}


def _routes(r: Reader, node: yaml.Node, scope: Scope) -> tuple[Route, ...]:
    out: list[Route] = []
    seen: dict[tuple[str, str | None, frozenset[bytes] | None], str] = {}
    parsed: list[tuple[str, yaml.Node, Route]] = []
    for path, item in r.sequence(node, "routes"):
        route = r.attempt(lambda: _route(r, path, item, scope, len(out)), None)
        if route is None:
            continue
        key = (route.prefix, route.host, route.methods)
        if key in seen:
            r.fail(item, f"{path}.prefix", f'duplicate prefix "{route.prefix}" (already used by {seen[key]})')
            continue
        seen[key] = path
        parsed.append((path, item, route))
        out.append(route)
    for kind in registry.FILTERS:
        if kind.check_routes is not None:
            kind.check_routes(r, [(p, n, rt.policies[kind.name]) for p, n, rt in parsed if kind.name in rt.policies])
    return tuple(out)


def _route(r: Reader, path: str, node: yaml.Node, scope: Scope, index: int) -> Route:
    fields = r.mapping(node, path, {**_ROUTE_KEYS, **registry.route_keys()})
    before = len(r.problems)
    policies: dict[str, Any] = {}
    for kind in registry.FILTERS:
        owned = {key: fields[key] for key in kind.route_keys if key in fields}
        parse = kind.parse_route
        policy = r.attempt(lambda: parse(r, owned, path, scope), None) if parse is not None else None
        if policy is not None:
            policies[kind.name] = policy
    if "prefix" not in fields:
        r.fail(node, f"{path}.prefix", "missing (required)")
    terminals = [kind for kind in registry.TERMINALS if kind.route_key in fields]
    if not terminals:
        r.fail(node, f"{path}.upstream", "missing (required; or respond: to answer from the gateway)")
    elif len(terminals) > 1:
        names = " and ".join(kind.route_key for kind in terminals)
        r.fail(fields[terminals[1].route_key], f"{path}.{terminals[1].route_key}",
               f"a route has one answerer: {names} exclude each other")
    terminal = terminals[0] if len(terminals) == 1 else None
    answer = r.attempt(lambda: terminal.parse_route(r, fields, path, scope), None) if terminal is not None else None  # type: ignore[union-attr]
    prefix = r.attempt(lambda: _path_prefix(r, fields["prefix"], f"{path}.prefix"), None) if "prefix" in fields else None
    values: dict[str, Any] = {}
    if "rewrite_prefix" in fields:
        values["rewrite_prefix"] = r.attempt(lambda: _path_prefix(r, fields["rewrite_prefix"], f"{path}.rewrite_prefix"), None)
    if "methods" in fields:
        values["methods"] = r.attempt(lambda: frozenset(r.methods(fields["methods"], f"{path}.methods")), None)
    if "host" in fields:
        values["host"] = r.attempt(lambda: _host(r, fields["host"], f"{path}.host"), None)
    if "escaped_slashes" in fields:
        values["escaped_slashes"] = r.attempt(
            lambda: r.choice(fields["escaped_slashes"], f"{path}.escaped_slashes", ("reject", "keep")), "reject")
    if "case_insensitive" in fields:
        values["case_insensitive"] = r.attempt(
            lambda: r.boolean(fields["case_insensitive"], f"{path}.case_insensitive"), False)
    if "max_body_size" in fields:
        values["max_body_size"] = r.attempt(lambda: r.parsed(fields["max_body_size"], f"{path}.max_body_size", parse_size), None)
    for key in ("timeout", "connect_timeout"):
        if key in fields:
            values[key] = r.attempt(lambda: r.parsed(fields[key], f"{path}.{key}", parse_duration), None)
    if terminal is not None and terminal.name != "proxy":
        for key in ("timeout", "connect_timeout"):
            if key in fields:
                r.fail(fields[key], f"{path}.{key}", "a timeout for the upstream: this route has no upstream")
    if len(r.problems) != before or prefix is None or terminal is None or answer is None:
        raise _Invalid()  # every problem is recorded already
    if terminal.name == "proxy" and answer not in scope.upstreams:
        raise _Invalid()  # an invalid upstream reports its own problems
    return Route(prefix=prefix, upstream=answer if terminal.name == "proxy" else None, terminal=terminal.name,
                 answer=answer, policies=MappingProxyType(policies), index=index, **values)


def _host(r: Reader, node: yaml.Node, path: str) -> str:
    host = r.string(node, path).lower()
    if not _HOST.match(host):
        raise r.fail(node, path, f'expected a host name like "api.example.com" or "*.example.com", got "{host}"')
    return host


def _path_prefix(r: Reader, node: yaml.Node, path: str) -> str:
    text = r.string(node, path)
    if not text.startswith("/") or "?" in text or "#" in text or "/../" in f"{text}/" or "/./" in f"{text}/":
        raise r.fail(node, path, f'expected an absolute path like "/api/users", got "{text}"')
    try:
        canonical = canonical_path(text.encode("utf-8")).decode("utf-8")
    except (BadPath, UnicodeDecodeError):
        canonical = None
    if canonical != text:
        # Requests are matched in their canonical form: another form would never match.
        expected = f' ("{canonical}")' if canonical is not None else ""
        raise r.fail(node, path, f"expected the path in the form requests are matched in{expected}, got \"{text}\"")
    return text.rstrip("/") or "/"
