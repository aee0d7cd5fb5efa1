"""`compose:` as the config writes it: a route answered by several upstream calls.

    - prefix: /api/profile
      compose:
        path: /{id}                    # the request path after the prefix, parameters named
        deadline: 3s                   # the whole composition (default 10s)
        max_body_size: 1MiB            # per call answer (default 1 MiB)
        calls:
          user:   {upstream: users, path: "/users/{id}"}
          orders: {upstream: orders, path: "/orders?customer={user.id}", after: user,
                   group: orders, required: false, fallback: []}

Checked here, with file:line:key: upstream names, templates (every `{...}` names a value that
exists, answers only of calls the call waits for), `after:` names and cycles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import Scope, TerminalKind
from txgateway.config.reader import Reader, _Invalid
from txgateway.config.units import parse_duration, parse_size
from txgateway.filters.headerconfig import header_name, header_value
from txgateway.filters.reshape import RESHAPE_KEYS, Reshape, parse_reshape
from txgateway.terminals.compose.template import PathPattern, Template, parse_template
from txgateway.upstream.config import upstream_name

__all__ = ["COMPOSE", "Call", "ComposeSettings"]

_CALL_KEYS = {"upstream": "", "path": "", "method": "", "headers": "", "after": "", "group": "", "required": "",
              "fallback": "", "transform": ""}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
_RESERVED = frozenset({"query", "user_id", "user_role", "user_tier"})
_HOP = frozenset({b"host", b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade", b"te",
                  b"trailer"})


@dataclass(frozen=True)
class Call:
    """One upstream call of a composed route."""

    name: str
    upstream: str
    template: Template
    method: bytes = b"GET"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    after: tuple[str, ...] = ()
    group: str | None = None           # None: the answer's fields go to the top level
    required: bool = True
    fallback: Any = None
    has_fallback: bool = False
    transform: Reshape | None = None    # applied to the call's answer before it is merged


@dataclass(frozen=True)
class ComposeSettings:
    calls: tuple[Call, ...]
    pattern: PathPattern | None = None
    deadline: float = 10.0
    max_body_size: int = 2**20


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> ComposeSettings:
    path = f"{path}.compose"
    node = fields["compose"]
    f = r.mapping(node, path, {"path": "", "deadline": "", "max_body_size": "", "calls": ""})
    before = len(r.problems)
    pattern = None
    if "path" in f:
        pattern = r.attempt(lambda: r.parsed(f["path"], f"{path}.path", PathPattern.parse), None)
    values: dict[str, Any] = {}
    if "deadline" in f:
        values["deadline"] = r.attempt(lambda: r.parsed(f["deadline"], f"{path}.deadline", parse_duration), 10.0)
    if "max_body_size" in f:
        values["max_body_size"] = r.attempt(lambda: r.parsed(f["max_body_size"], f"{path}.max_body_size", parse_size),
                                            2**20)
    if "calls" not in f:
        raise r.fail(node, f"{path}.calls", "missing (required): the upstream calls, by name")
    entries = r.free_mapping(f["calls"], f"{path}.calls")
    if len(entries) < 2:
        r.fail(f["calls"], f"{path}.calls", "expected at least two calls (one call is a proxied route)")
    names = tuple(name for name, _, _ in entries)
    params = pattern.names if pattern is not None else ()
    calls: list[Call] = []
    after_nodes: dict[str, yaml.Node] = {}
    for name, key_node, value in entries:
        call_path = f"{path}.calls.{name}"
        if name in _RESERVED or name in params:
            r.fail(key_node, call_path, f'"{name}" names a template value already: pick another call name')
            continue
        call = r.attempt(lambda: _call(r, name, value, call_path, scope, params, names, after_nodes), None)
        if call is not None:
            calls.append(call)
    if len(r.problems) == before:
        _check_cycles(r, calls, after_nodes, path)
    if len(r.problems) != before:
        raise _Invalid()
    return ComposeSettings(tuple(calls), pattern, **values)


def _call(r: Reader, name: str, node: yaml.Node, path: str, scope: Scope, params: tuple[str, ...],
          names: tuple[str, ...], after_nodes: dict[str, yaml.Node]) -> Call:
    f = r.mapping(node, path, _CALL_KEYS)
    before = len(r.problems)
    r.require(node, f, path, ("upstream", "path"))
    upstream = r.attempt(lambda: upstream_name(r, f["upstream"], f"{path}.upstream", scope), None) \
        if "upstream" in f else None
    after: tuple[str, ...] = ()
    if "after" in f:
        after_nodes[name] = f["after"]
        after = r.attempt(lambda: _after(r, f["after"], f"{path}.after", name, names), ())
    others = tuple(n for n in names if n != name)
    template = None
    if "path" in f:
        template = r.attempt(lambda: r.parsed(f["path"], f"{path}.path",
                                              lambda text: parse_template(str(text), params, others)), None)
    if template is not None:
        for token in template.tokens:
            if token.source == "answer" and token.name not in after:
                r.fail(f["path"], f"{path}.path", f"{token.text} uses the answer of {token.name}: "
                                                  f"add after: {token.name}")
    values: dict[str, Any] = {}
    if "method" in f:
        values["method"] = r.attempt(lambda: r.choice(f["method"], f"{path}.method", _METHODS), "GET").encode()
    if "headers" in f:
        values["headers"] = tuple(r.attempt(lambda: _headers(r, f["headers"], f"{path}.headers"), []))
    if "group" in f:
        values["group"] = r.attempt(lambda: r.string(f["group"], f"{path}.group"), None)
    if "required" in f:
        values["required"] = r.attempt(lambda: r.boolean(f["required"], f"{path}.required"), True)
    if "transform" in f:
        values["transform"] = r.attempt(lambda: parse_reshape(
            r, r.mapping(f["transform"], f"{path}.transform", RESHAPE_KEYS), f"{path}.transform"), None)
    if "fallback" in f:
        values["fallback"] = yaml.safe_load(yaml.serialize(f["fallback"]))
        values["has_fallback"] = True
        if values.get("required", True):
            r.fail(f["fallback"], f"{path}.fallback", "a fallback is for an optional call: add required: false")
        elif "group" not in values and not isinstance(values["fallback"], dict):
            r.fail(f["fallback"], f"{path}.fallback", "merged at the top level, a fallback is a mapping")
    if len(r.problems) != before or upstream is None or template is None:
        raise _Invalid()
    if upstream not in scope.upstreams:
        raise _Invalid()          # an invalid upstream reports its own problems
    return Call(name, upstream, template, after=after, **values)


def _after(r: Reader, node: yaml.Node, path: str, name: str, names: tuple[str, ...]) -> tuple[str, ...]:
    items = [(path, node)] if isinstance(node, yaml.ScalarNode) else list(r.sequence(node, path))
    out: list[str] = []
    for item_path, item in items:
        other = r.string(item, item_path)
        if other == name:
            raise r.fail(item, item_path, f"{name} cannot wait for itself")
        if other not in names:
            raise r.fail(item, item_path, f'no call named "{other}" (calls: {", ".join(names)})')
        out.append(other)
    return tuple(out)


def _headers(r: Reader, node: yaml.Node, path: str) -> list[tuple[bytes, bytes]]:
    out = []
    for name, key_node, value_node in r.free_mapping(node, path):
        header = header_name(r, key_node, f"{path}.{name}")
        if header.lower() in _HOP:
            raise r.fail(key_node, f"{path}.{name}", "framing and Host headers are the gateway's to set")
        out.append((header.lower(), header_value(r, value_node, f"{path}.{name}")))
    return out


def _check_cycles(r: Reader, calls: list[Call], after_nodes: dict[str, yaml.Node], path: str) -> None:
    """Calls waiting for each other would never start: name the cycle, at its first `after:`."""
    waits = {call.name: call.after for call in calls}
    done: set[str] = set()

    def visit(name: str, trail: list[str]) -> list[str] | None:
        if name in trail:
            return [*trail[trail.index(name):], name]
        if name in done:
            return None
        for other in waits.get(name, ()):
            cycle = visit(other, [*trail, name])
            if cycle is not None:
                return cycle
        done.add(name)
        return None

    for call in calls:
        cycle = visit(call.name, [])
        if cycle is not None:
            first = cycle[0]
            r.fail(after_nodes[first], f"{path}.calls.{first}.after",
                   f"calls wait for each other in a cycle: {' -> '.join(cycle)}")
            return


def _build(resources: Any, config: Any) -> Any:
    if not any(route.terminal == "compose" for route in config.routes):
        return None
    from txgateway.terminals.compose.composer import Composer
    from txgateway.upstream.config import proxy_for
    return Composer(proxy_for(resources), resources)


def _make(composer: Any, settings: ComposeSettings, route: Any) -> Any:
    return composer.terminal(settings, route)


COMPOSE = TerminalKind(name="compose", route_key="compose", parse_route=_parse_route, build=_build, make=_make,
                       answers_later=True)
