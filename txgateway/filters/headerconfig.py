"""Routes' `request_headers`, `response_headers` and `security_headers`, validated at load."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader, _Invalid

if TYPE_CHECKING:
    from txgateway.core.pipeline import Filter
    from txgateway.core.route import Route

__all__ = ["DEFAULT_SECURITY_HEADERS", "HEADER_RULES", "HeaderRules", "RouteHeaders", "header_name", "header_value", "refuse_dropped"]

_TOKEN = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_HEADER_GLOB = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")

DEFAULT_SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"X-Content-Type-Options", b"nosniff"),
    (b"X-Frame-Options", b"DENY"),
    (b"Referrer-Policy", b"no-referrer"),
)


@dataclass(frozen=True)
class HeaderRules:
    """`set` replaces, `add` appends, `remove` deletes by name or `*` glob (lower-case)."""

    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()
    remove: tuple[bytes, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True)
class RouteHeaders:
    """A route's header policy: rules each way and the security headers its responses get."""

    request: HeaderRules = HeaderRules()
    response: HeaderRules = HeaderRules()
    security: tuple[tuple[bytes, bytes], ...] = DEFAULT_SECURITY_HEADERS


def header_name(r: Reader, node: yaml.Node, path: str, glob: bool = False, from_clients: bool = False) -> bytes:
    """A header name as written. `from_clients`: a header the gateway reads from requests, so one
    with `_` is refused unless underscores_in_headers is on (it is dropped before any filter)."""
    name = r.string(node, path)
    valid = _HEADER_GLOB.match(name) if glob else _TOKEN.match(name.encode())
    if not valid:
        raise r.fail(node, path, f'expected a header name like "X-Api-Version", got "{name}"')
    if from_clients:
        refuse_dropped(r, node, path, name)
    return name.encode()


def refuse_dropped(r: Reader, node: yaml.Node, path: str, name: str) -> None:
    """Fail on a request header name with `_` while such headers are dropped at the edge."""
    if "_" in name and not r.underscores_in_headers:
        raise r.fail(node, path, f'"{name}" has a "_": request headers with one are dropped unless '
                                 "underscores_in_headers: true, so it would never be seen")


def header_names(r: Reader, node: yaml.Node, path: str, from_clients: bool = False) -> tuple[bytes, ...]:
    """A list of header names as written; each bad one is reported and left out."""
    return tuple(name for name in (r.attempt(lambda: header_name(r, item, item_path, from_clients=from_clients), None)
                                   for item_path, item in r.sequence(node, path)) if name is not None)


def header_value(r: Reader, node: yaml.Node, path: str) -> bytes:
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
                (header_name(r, k, f"{path}.{key}.{name}"), header_value(r, v, f"{path}.{key}.{name}"))
                for name, k, v in r.free_mapping(fields[key], f"{path}.{key}")), ())
    remove: tuple[bytes, ...] = ()
    if "remove" in fields:
        remove = r.attempt(lambda: tuple(header_name(r, item, item_path, glob=True).lower()
                                         for item_path, item in r.sequence(fields["remove"], f"{path}.remove")), ())
    if len(r.problems) != before:
        raise _Invalid()
    return HeaderRules(set=pairs.get("set", ()), add=pairs.get("add", ()), remove=remove)


def _security_headers(r: Reader, node: yaml.Node, path: str) -> tuple[tuple[bytes, bytes], ...]:
    """Per-route overrides of the default security headers; `null` turns one off."""
    merged = {name.lower(): (name, value) for name, value in DEFAULT_SECURITY_HEADERS}
    for name, key_node, value_node in r.free_mapping(node, path):
        header = header_name(r, key_node, f"{path}.{name}")
        if r.scalar(value_node, f"{path}.{name}") is None:
            merged.pop(header.lower(), None)
        else:
            merged[header.lower()] = (header, header_value(r, value_node, f"{path}.{name}"))
    return tuple(merged.values())


def parse_route_headers(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> RouteHeaders:
    """Every route has a header policy: without keys, the default security headers."""
    values: dict[str, Any] = {}
    for key, field in (("request_headers", "request"), ("response_headers", "response")):
        if key in fields:
            values[field] = r.attempt(lambda: _header_rules(r, fields[key], f"{path}.{key}"), HeaderRules())
    if "security_headers" in fields:
        values["security"] = r.attempt(
            lambda: _security_headers(r, fields["security_headers"], f"{path}.security_headers"), DEFAULT_SECURITY_HEADERS)
    return RouteHeaders(**values)


def _build(resources: Any, policy: RouteHeaders, route: Route) -> Filter:
    from txgateway.filters.headers import HeaderRulesFilter
    return HeaderRulesFilter(policy)


HEADER_RULES = FilterKind(
    name="header_rules", build=_build, route_keys=("request_headers", "response_headers", "security_headers"),
    parse_route=parse_route_headers)
