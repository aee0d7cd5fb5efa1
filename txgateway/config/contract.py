"""The extension contract's config side: what a filter or terminal owns, and how it is built.

A filter declares, beside its code, one `FilterKind`: the route keys and the top-level section
it owns, their parsers (which report through the config reader, so every problem says
file:line: key.path), how a route's chain gets an instance from the route's parsed policy,
and what a reload may change in its section. The config parser discovers route keys and
sections through registry.py; the gateway builds each route's chain from them. A
terminal (what answers once a chain let a request through) is declared the same way.

Parsers and kinds live in modules without heavy imports: a filter's own module (and its
libraries, PyJWT say) is imported by `build` only when a config uses it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

    from txgateway.config.reader import Reader
    from txgateway.core.pipeline import Filter, Terminal
    from txgateway.core.route import Route

__all__ = ["FilterKind", "ReloadRefused", "Resources", "Scope", "TerminalKind"]


class ReloadRefused(Exception):
    """The new file needs a restart to mean what it says (applying part of it would leave
    routes unprotected or limited by settings that do not exist)."""


@dataclass(frozen=True)
class Scope:
    """What a route-key parser may know of the rest of the file."""

    sections: frozenset[str]             # the top-level keys present
    upstreams: Mapping[str, Any]         # the valid upstreams (schema.Upstream), by name
    declared: frozenset[str]             # every upstream name written, valid or not


# (reader, the route's keys this filter owns that are present, "routes[3]", scope) -> policy,
# or None when the filter has nothing to do on that route.
RouteParser = Callable[["Reader", "dict[str, yaml.Node]", str, Scope], Any]
# (reader, the section's node, every top-level node, environment) -> the section's value
SectionParser = Callable[["Reader", "yaml.Node", "dict[str, yaml.Node]", "Mapping[str, str] | None"], Any]
# (reader, [(route path, route node, policy)]) -> None: checks across routes
RoutesCheck = Callable[["Reader", "list[tuple[str, yaml.Node, Any]]"], None]
# (running section, new section) -> (the section to apply, names of settings kept until a restart)
ReloadRule = Callable[[Any, Any], "tuple[Any, list[str]]"]


@dataclass(frozen=True)
class FilterKind:
    name: str                                       # log and per-request state name
    build: Callable[[Any, Any, Route], Filter]      # (the gateway's resources, route policy, route)
    route_keys: tuple[str, ...] = ()
    parse_route: RouteParser | None = None
    check_routes: RoutesCheck | None = None
    section: str | None = None
    parse_section: SectionParser | None = None
    reload: ReloadRule | None = None                # None: a reload applies the whole section


@dataclass(frozen=True)
class TerminalKind:
    """A route's answerer: exactly one of the registered keys per route."""

    name: str
    route_key: str
    parse_route: RouteParser
    build: Callable[[Any, Any], Any]                # (the gateway's resources, the Config) -> shared part
    make: Callable[[Any, Any, Route], Terminal]     # (that shared part, route policy, route)
    # A terminal that answers later (from upstream events) answers through the pipeline it
    # is part of: the path builder hands it over as `shared_part.pipeline`.
    answers_later: bool = False


class Resources:
    """What the gateway lends the filters it builds: the clock and its long-lived parts (the
    JWKS fetcher, the bucket stores). `shared` memoises what all routes' filters of one kind
    share within one request path (a token verifier and its cache, say)."""

    def __init__(self, config: Any, clock: Any, **parts: Any) -> None:
        self.config = config            # the schema.Config being built
        self.clock = clock
        self.parts = parts
        self._shared: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return self.parts[name]
        except KeyError:
            raise AttributeError(name) from None

    def shared(self, name: str, make: Callable[[], Any]) -> Any:
        if name not in self._shared:
            self._shared[name] = make()
        return self._shared[name]
