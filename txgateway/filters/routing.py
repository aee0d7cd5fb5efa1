"""The route table: longest prefix on a segment boundary, then host and method.

Paths are bytes as they came off the wire. Dot-segments are removed before matching, and a
request whose dot-segments would carry it out of the route its raw path names is refused
(`/api/users/../../admin`), so a prefix is a real boundary.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from txgateway.core.pipeline import Chain, LocalResponse, RequestContext, error_response
from txgateway.core.route import Route

__all__ = ["BadPath", "RouteTable", "RoutingFilter", "normalize_path"]


class BadPath(ValueError):
    """The request target cannot be routed safely (400)."""


def normalize_path(path: bytes) -> bytes:
    """Remove `.` and `..` segments (RFC 3986 5.2.4); `%2e` counts as a dot.

    Raises BadPath when `..` climbs above the root.
    """
    if b"." not in path and b"%2" not in path:
        return path
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments[1:]:
        plain = segment.replace(b"%2e", b".").replace(b"%2E", b".")
        if plain == b".":
            continue
        if plain == b"..":
            if not out:
                raise BadPath("path climbs above the root")
            out.pop()
            continue
        out.append(segment)
    trailing = segments[-1].replace(b"%2e", b".").replace(b"%2E", b".") in (b".", b"..")
    result = b"/" + b"/".join(out)
    if trailing and result != b"/":
        result += b"/"
    return result


def _drop_single_dots(path: bytes) -> bytes:
    """`path` without its `.` segments, `..` left in place: the route the raw path names."""
    segments = path.split(b"/")
    kept = [s for s in segments[1:] if s.replace(b"%2e", b".").replace(b"%2E", b".") != b"."]
    if len(kept) < len(segments) - 1 and segments[-1].replace(b"%2e", b".").replace(b"%2E", b".") == b".":
        kept.append(b"")
    return b"/" + b"/".join(kept)


class Match(NamedTuple):
    """A routing decision (a tuple: built once per request, cheaper than a dataclass)."""

    route: Route
    upstream_path: bytes


class RouteTable:
    """Routes indexed by prefix; lookup walks the path's ancestors, longest first."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        by_prefix: dict[bytes, list[Route]] = {}
        for route in routes:
            by_prefix.setdefault(route.prefix.encode(), []).append(route)
        # Constrained routes (host/methods) are tried before the catch-all for the prefix.
        self._by_prefix = {
            prefix: tuple(sorted(rs, key=lambda r: (r.host is None, r.methods is None, r.index)))
            for prefix, rs in by_prefix.items()
        }
        self._rewrites = {r.index: (r.prefix.encode(), (r.rewrite_prefix or r.prefix).encode()) for r in routes}

    def match(self, method: bytes, path: bytes, host: bytes | None) -> Match | None:
        """The route for this request, or None (404). Raises BadPath on traversal."""
        clean = normalize_path(path)
        route = self._lookup(method, clean, host)
        # Only `..` can leave a route; `.` segments (`/api/./users/7`) are harmless.
        if clean != path and route is not self._lookup(method, _drop_single_dots(path), host):
            raise BadPath("path escapes its route prefix")
        if route is None:
            return None
        prefix, rewrite = self._rewrites[route.index]
        rest = clean[len(prefix):] if prefix != b"/" else clean
        if rewrite == b"/":
            upstream_path = rest or b"/"
        else:
            upstream_path = rewrite + rest
        return Match(route, upstream_path)

    def _lookup(self, method: bytes, path: bytes, host: bytes | None) -> Route | None:
        by_prefix = self._by_prefix
        candidate = path
        while True:
            routes = by_prefix.get(candidate)
            if routes is not None:
                for route in routes:
                    if route.methods is not None and method not in route.methods:
                        continue
                    if route.host is not None and not _host_matches(route.host, host):
                        continue
                    return route
            if candidate == b"/":
                return None
            cut = candidate.rfind(b"/")
            candidate = candidate[:cut] if cut > 0 else b"/"


def _host_matches(pattern: str, host: bytes | None) -> bool:
    if host is None:
        return False
    # Drop the port: "api.example.com:8080" -> "api.example.com", "[::1]:8080" -> "[::1]".
    name = (host.partition(b"]")[0] + b"]" if host.startswith(b"[") else host.split(b":", 1)[0]).decode("latin-1").lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:]) and len(name) > len(pattern) - 1
    return name == pattern


class RoutingFilter:
    """The edge's last step: which route, the upstream path, and the route's chain, which
    the request goes on with (pipeline.Pipeline._run)."""

    name = "routing"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, table: RouteTable, chains: Sequence[Chain]) -> None:
        self.table = table
        self.chains = tuple(chains)      # by route index

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        try:
            match = self.table.match(ctx.method, ctx.path, ctx.host)
        except BadPath:
            return error_response(ctx, 400, "BAD_REQUEST", "the request path is not allowed")
        if match is None:
            return error_response(ctx, 404, "NO_ROUTE", "no route matches this request")
        route = match.route
        ctx.route = route
        ctx.upstream = route.upstream
        ctx.upstream_path = match.upstream_path
        limit = route.max_body_size
        if limit is not None and (ctx.content_length or ctx.bytes_in) > limit:
            # The transports let in up to the largest route's limit; this route's is known now.
            return error_response(ctx, 413, "PAYLOAD_TOO_LARGE", "request body is larger than max_body_size")
        ctx.chain = self.chains[route.index]
        return None
