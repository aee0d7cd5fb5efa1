"""`cors:`: a route browsers on other origins may call (the Fetch standard's CORS protocol).

The gateway answers a preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`)
itself, 204, before auth: a browser never sends credentials on a preflight, so a protected
route could not be preflighted otherwise, and the upstream never sees it. An allowed origin
is echoed in `Access-Control-Allow-Origin` (never `*`, so the answer is the same with
credentials), and every answer on the route says `Vary: Origin` so caches keep one copy per
origin. A disallowed origin gets no CORS headers (its browser then hides the answer from the
page) and its preflight a 403 envelope.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader
from txgateway.config.units import parse_duration
from txgateway.core.pipeline import LocalResponse, RequestContext, ResponseHead, error_response
from txgateway.filters.headerconfig import header_names

__all__ = ["CORS", "CorsFilter", "CorsPolicy"]

_KEYS = {"origins": "", "methods": "", "headers": "", "expose_headers": "", "credentials": "", "max_age": ""}
_ORIGIN = re.compile(r"(https?)://([A-Za-z0-9.*-]+|\[[0-9A-Fa-f:.]+\])(:[0-9]{1,5})?")
_DECIDED = frozenset({b"access-control-allow-origin", b"access-control-allow-credentials",
                      b"access-control-expose-headers", b"access-control-allow-methods",
                      b"access-control-allow-headers", b"access-control-max-age"})
_ANSWERED = True                                   # the request state of an answered preflight
_LABELS = "[A-Za-z0-9-]+(?:\\.[A-Za-z0-9-]+)*"    # what `*` stands for in an origin pattern


@dataclass(frozen=True)
class CorsPolicy:
    """A route's `cors:`, as the filter uses it."""

    exact: frozenset[bytes]                    # origins written out
    patterns: tuple[re.Pattern[bytes], ...]    # origins with `*` in the host
    any_origin: bool                           # origins: ["*"]
    methods: bytes                             # Access-Control-Allow-Methods
    allowed_methods: frozenset[bytes]
    headers: bytes                             # Access-Control-Allow-Headers ("" for none)
    allowed_headers: frozenset[bytes]          # lower case
    expose: bytes                              # Access-Control-Expose-Headers ("" for none)
    credentials: bool
    max_age: int                               # seconds

    def allows(self, origin: bytes) -> bool:
        return self.any_origin or origin in self.exact or any(p.fullmatch(origin) for p in self.patterns)


def _origin(r: Reader, node: yaml.Node, path: str) -> str:
    text = r.string(node, path)
    if text == "*":
        return text
    if not _ORIGIN.fullmatch(text) or ("*" in text and (text.count("*") > 1 or "://*." not in text)):
        raise r.fail(node, path, f'expected an origin like "https://app.example.com" or "https://*.example.com" '
                                 f'(scheme and host, no path; "*." only before the domain), or "*", got "{text}"')
    return text.lower()                # as browsers send it


def _pattern(origin: str) -> re.Pattern[bytes]:
    """`https://*.example.com`: any subdomain of example.com, over https, on the default port."""
    before, after = origin.split("*")
    return re.compile(f"{re.escape(before)}{_LABELS}{re.escape(after)}".encode())


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> CorsPolicy | None:
    if "cors" not in fields:
        return None
    node = fields["cors"]
    path = f"{path}.cors"
    f = r.mapping(node, path, _KEYS)
    if "origins" not in f:
        raise r.fail(node, f"{path}.origins", 'missing (required): the origins allowed, e.g. ["https://app.example.com"]')
    items = list(r.sequence(f["origins"], f"{path}.origins"))
    if not items:
        raise r.fail(f["origins"], f"{path}.origins", "expected at least one origin")
    origins = [o for o in (r.attempt(lambda: _origin(r, item, item_path), None) for item_path, item in items)
               if o is not None]
    credentials = r.attempt(lambda: r.boolean(f["credentials"], f"{path}.credentials"), False) \
        if "credentials" in f else False
    if credentials and "*" in origins:
        r.fail(f["origins"], f"{path}.origins",
               'credentials: true with any origin ("*") would let every web site call this route as its visitors; '
               "list the origins")
    no_methods: tuple[bytes, ...] = ()
    methods = r.attempt(lambda: r.methods(f["methods"], f"{path}.methods"), no_methods) if "methods" in f \
        else (b"GET", b"HEAD", b"POST")
    headers = header_names(r, f["headers"], f"{path}.headers", from_clients=True) if "headers" in f else ()
    expose = header_names(r, f["expose_headers"], f"{path}.expose_headers") if "expose_headers" in f else ()
    max_age = r.attempt(lambda: r.parsed(f["max_age"], f"{path}.max_age", parse_duration), 600.0) \
        if "max_age" in f else 600.0
    return CorsPolicy(
        exact=frozenset(o.encode() for o in origins if "*" not in o),
        patterns=tuple(_pattern(o) for o in origins if "*" in o and o != "*"),
        any_origin="*" in origins,
        methods=b", ".join(methods), allowed_methods=frozenset(methods),
        headers=b", ".join(headers), allowed_headers=frozenset(h.lower() for h in headers),
        expose=b", ".join(expose), credentials=credentials, max_age=int(max_age))


def _add_vary(headers: list[tuple[bytes, bytes]]) -> None:
    for i, (name, value) in enumerate(headers):
        if name == b"vary":
            if b"origin" not in value.lower() and value.strip() != b"*":
                headers[i] = (name, value + b", Origin")
            return
    headers.append((b"vary", b"Origin"))


class CorsFilter:
    """One route's CORS: answers preflights, marks the answers of allowed origins."""

    name = "cors"
    on_response_body = None
    on_finished = None

    def __init__(self, policy: CorsPolicy) -> None:
        self.policy = policy
        common = [(b"access-control-allow-credentials", b"true")] if policy.credentials else []
        self.actual = common + ([(b"access-control-expose-headers", policy.expose)] if policy.expose else [])
        self.preflight = [*common, (b"access-control-allow-methods", policy.methods),
                          (b"access-control-max-age", b"%d" % policy.max_age)]

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        origin = ctx.header(b"origin")
        if origin is None:
            return None                      # not a cross-origin request: nothing to do
        policy = self.policy
        allowed = policy.allows(origin)
        wanted = ctx.header(b"access-control-request-method") if ctx.method == b"OPTIONS" else None
        if wanted is None:                   # an actual request: its answer gets the headers
            if allowed:
                ctx.set_state(self.name, origin)
            else:
                ctx.note("cors", "origin not allowed")
            return None
        if not allowed:
            ctx.note("cors", "origin not allowed")
            return error_response(ctx, 403, "FORBIDDEN", "this origin may not call this route")
        asked = ctx.header(b"access-control-request-headers")
        names = [n.strip().lower() for n in asked.split(b",") if n.strip()] if asked else []
        refused = [n for n in names if n not in policy.allowed_headers]
        if wanted not in policy.allowed_methods or refused:
            ctx.note("cors", "preflight refused")
            what = f"method {wanted.decode('latin-1')}" if wanted not in policy.allowed_methods \
                else "headers " + ", ".join(n.decode("latin-1") for n in refused)
            return error_response(ctx, 403, "FORBIDDEN", f"this route does not allow the {what} across origins")
        headers = [(b"access-control-allow-origin", origin), *self.preflight,
                   (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers")]
        if names:
            headers.append((b"access-control-allow-headers", policy.headers))
        ctx.note("cors", "preflight")
        ctx.set_state(self.name, _ANSWERED)
        return LocalResponse(204, headers, b"")

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        """The route's policy decides, not the upstream: its own CORS headers are dropped."""
        origin = ctx.get_state(self.name)
        if origin is _ANSWERED:
            return                                 # the preflight answer carries its own
        headers = [h for h in head.headers if h[0] not in _DECIDED]
        if origin is not None:
            headers.append((b"access-control-allow-origin", origin))
            headers.extend(self.actual)
        _add_vary(headers)
        head.headers = headers


def _build(resources: Any, policy: CorsPolicy, route: Any) -> CorsFilter:
    return CorsFilter(policy)


CORS = FilterKind(name="cors", build=_build, route_keys=("cors",), parse_route=parse_route)
