"""The route table: longest prefix on a segment boundary, then host and method.

The path the gateway matches is exactly the path it forwards: `canonical_path` brings the
request path to one RFC 3986 form first (escapes of unreserved characters decoded, the rest
in upper case, `\\` escaped, `//` merged, dot-segments resolved), so an upstream that
decodes or normalises sees the route's prefix where the gateway saw it. Escaped slashes
(`%2F`, `%5C`, `\\`) are refused unless the route keeps them opaque (`escaped_slashes:
keep`); a path whose `..` would carry it out of the route its raw path names
(`/api/users/../../admin`) is refused, and so is one whose `;params` would pick another
route than the path without them (the route would depend on how the upstream reads them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from txgateway.core.pipeline import Chain, LocalResponse, RequestContext, error_response
from txgateway.core.route import Route

__all__ = ["BadPath", "RouteTable", "RoutingFilter", "canonical_path", "normalize_path"]

# RFC 3986 2.3: an escape of one of these is the character itself (6.2.2.2).
_UNRESERVED: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")
# Bytes looked for on every request, as ints: `int in bytes` is one memchr, where `bytes in
# bytes` first fails to read its needle as an int (an exception: ~2k instructions on 3.11).
_PERCENT: Final = 0x25
_BACKSLASH: Final = 0x5C
_SEMICOLON: Final = 0x3B
_DOT: Final = 0x2E
_HASH: Final = 0x23
_SLASH: Final = 0x2F


class BadPath(ValueError):
    """The request target cannot be routed safely (400)."""


def canonical_path(path: bytes) -> bytes:
    """`path` in the one form it is matched and forwarded in (RFC 3986 6.2.2), plus `//`
    merged (as nginx's merge_slashes) and `\\` escaped. Raises BadPath on a malformed escape
    or a `..` above the root."""
    path = _canonical_escapes(path)
    return normalize_path(path) if b"/." in path else path


def _canonical_escapes(path: bytes) -> bytes:
    """Escapes of unreserved characters decoded, the others in upper case, `\\` escaped,
    `//` merged; dot-segments left in place."""
    if b"%" in path:
        parts = path.split(b"%")
        out = [parts[0]]
        for part in parts[1:]:
            if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
                raise BadPath("malformed percent-encoding")
            value = int(part[:2], 16)
            out.append((bytes((value,)) if value in _UNRESERVED else b"%%%02X" % value) + part[2:])
        path = b"".join(out)
    if b"\\" in path:
        path = path.replace(b"\\", b"%5C")
    while b"//" in path:
        path = path.replace(b"//", b"/")
    return path


def normalize_path(path: bytes) -> bytes:
    """Remove `.` and `..` segments (RFC 3986 5.2.4) of a path whose escapes are canonical.

    Raises BadPath when `..` climbs above the root.
    """
    segments = path.split(b"/")
    out: list[bytes] = []
    for segment in segments[1:]:
        if segment == b".":
            continue
        if segment == b"..":
            if not out:
                raise BadPath("path climbs above the root")
            out.pop()
            continue
        out.append(segment)
    result = b"/" + b"/".join(out)
    if segments[-1] in (b".", b"..") and result != b"/":
        result += b"/"
    return result


def _drop_single_dots(path: bytes) -> bytes:
    """`path` without its `.` segments, `..` left in place: the route the raw path names."""
    segments = path.split(b"/")
    kept = [s for s in segments[1:] if s != b"."]
    if len(kept) < len(segments) - 1 and segments[-1] == b".":
        kept.append(b"")
    return b"/" + b"/".join(kept)


def _without_params(path: bytes) -> bytes:
    """`path` with each segment's `;params` cut (as Servlet containers read it)."""
    return b"/".join(segment.partition(b";")[0] for segment in path.split(b"/"))


class Match:
    """A routing decision (a plain slotted class: compiled, made natively once per request,
    where a NamedTuple's constructor is interpreted Python)."""

    __slots__ = ("route", "upstream_path")

    def __init__(self, route: Route, upstream_path: bytes) -> None:
        self.route = route
        self.upstream_path = upstream_path


class RouteTable:
    """Routes indexed by prefix; lookup walks the path's ancestors, longest first.

    Case-insensitive routes are indexed by their lower-case prefix apart, and tried after
    the exact ones at each length (a table without any costs nothing more)."""

    def __init__(self, routes: tuple[Route, ...]) -> None:
        self.routes = routes
        by_prefix: dict[bytes, list[Route]] = {}
        folded: dict[bytes, list[Route]] = {}
        for route in routes:
            if route.case_insensitive:
                folded.setdefault(route.prefix.lower().encode(), []).append(route)
            else:
                by_prefix.setdefault(route.prefix.encode(), []).append(route)
        self._by_prefix = _constrained_first(by_prefix)
        self._folded = _constrained_first(folded) or None
        self._rewrites = {r.index: (r.prefix.encode(), (r.rewrite_prefix or r.prefix).encode()) for r in routes}

    def match(self, method: bytes, path: bytes, host: bytes | None) -> Match | None:
        """The route for this request, or None (404). Raises BadPath on a path that cannot be
        routed safely. A path with none of `%`, `\\`, `//`, `/.`, `;` is already canonical."""
        if not _plain(path):
            return self._match_canonical(method, path, host)
        route = self._lookup(method, path, host)
        return None if route is None else self._rewrite(route, path)

    def _match_canonical(self, method: bytes, path: bytes, host: bytes | None) -> Match | None:
        named = _canonical_escapes(path)
        clean = normalize_path(named) if b"/." in named else named
        route = self._lookup(method, clean, host)
        # Only `..` can leave a route; `.` segments (`/api/./users/7`) are harmless.
        if b"/.." in named and route is not self._lookup(method, _drop_single_dots(named), host):
            raise BadPath("path escapes its route prefix")
        if route is None:
            return None
        if route.escaped_slashes == "reject" and (b"%2F" in clean or b"%5C" in clean):
            raise BadPath("escaped slash or backslash in the path")
        if b";" in clean and self._lookup(method, _without_params(clean), host) is not route:
            raise BadPath("path parameters change the route")
        return self._rewrite(route, clean)

    def _rewrite(self, route: Route, path: bytes) -> Match:
        prefix, rewrite = self._rewrites[route.index]
        rest = path[len(prefix):] if prefix != b"/" else path
        if rewrite == b"/":
            return Match(route, rest or b"/")
        return Match(route, rewrite + rest)

    def _lookup(self, method: bytes, path: bytes, host: bytes | None) -> Route | None:
        by_prefix = self._by_prefix
        folded = self._folded
        candidate = path
        while True:
            routes = by_prefix.get(candidate)
            if routes is not None:
                route = _first_allowed(routes, method, host)
                if route is not None:
                    return route
            if folded is not None:
                routes = folded.get(candidate.lower())
                if routes is not None:
                    route = _first_allowed(routes, method, host)
                    if route is not None:
                        return route
            if candidate == b"/":
                return None
            cut = len(candidate) - 1        # the last "/": compiled, a loop costs less than `rfind`'s call
            while cut > 0 and candidate[cut] != _SLASH:
                cut -= 1
            candidate = candidate[:cut] if cut > 0 else b"/"


def _plain(path: bytes) -> bool:
    """Whether `path` has none of `%`, `\\`, `;`, `//`, `/.`: one pass, compiled to a loop over
    its bytes (three memchr and two `find` calls, a generic method call each, cost ~1.5k)."""
    previous = 0
    for i in range(len(path)):
        byte = path[i]
        if byte == _PERCENT or byte == _BACKSLASH or byte == _SEMICOLON:
            return False
        if previous == _SLASH and (byte == _SLASH or byte == _DOT):
            return False
        previous = byte
    return True


def _constrained_first(by_prefix: dict[bytes, list[Route]]) -> dict[bytes, tuple[Route, ...]]:
    """Constrained routes (host/methods) are tried before the catch-all for the prefix."""
    return {prefix: tuple(sorted(rs, key=lambda r: (r.host is None, r.methods is None, r.index)))
            for prefix, rs in by_prefix.items()}


def _first_allowed(routes: tuple[Route, ...], method: bytes, host: bytes | None) -> Route | None:
    for route in routes:
        if route.methods is not None and method not in route.methods:
            continue
        if route.host is not None and not _host_matches(route.host, host):
            continue
        return route
    return None


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
        if _HASH in ctx.target:
            # A client never sends a fragment; an upstream would drop it and see another path.
            return error_response(ctx, 400, "BAD_REQUEST", "a fragment (#) in the request target")
        if ctx.method == b"CONNECT":
            return error_response(ctx, 405, "METHOD_NOT_ALLOWED", "CONNECT is not supported",
                                  [(b"allow", b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")])
        try:
            match = self.table.match(ctx.method, ctx.path, ctx.host)
        except BadPath as e:
            return error_response(ctx, 400, "BAD_REQUEST", f"the request path is not allowed: {e}")
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
