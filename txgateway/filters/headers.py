"""Header transformations: what the gateway adds, removes and vouches for.

Two filters. `ForwardingHeaders` runs first: it removes what a client must never be able to
assert (identity, gateway and forwarding headers), fixes the correlation id and trace
context, and states where the request came from. `HeaderRulesFilter` runs last before the
terminal: the route's own `request_headers` / `response_headers`, `X-Internal-*` stripping
and the security headers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import Any, Final, cast

from txgateway.core.ids import RequestIds, correlation_id, traceparent
from txgateway.core.pipeline import LocalResponse, RequestContext, ResponseHead, error_response
from txgateway.filters.headerconfig import DEFAULT_SECURITY_HEADERS, HeaderRules, RouteHeaders
from txgateway.ops.sampling import TraceGate

__all__ = ["ForwardingHeaders", "HeaderRulesFilter", "TrustedProxies"]

# Never accepted from a client: the gateway alone sets these, and upstreams trust them.
_CLIENT_FORBIDDEN_PREFIXES: Final[tuple[bytes, ...]] = (b"x-user-", b"x-gateway-")
_REPLACED: Final = frozenset({b"x-correlation-id", b"traceparent", b"x-forwarded-for", b"x-forwarded-proto",
                              b"x-forwarded-host", b"x-user-id", b"x-user-role", b"x-user-tier"})
# Looked at in the same pass (one set lookup per header): at most one is accepted.
_SINGLE: Final = frozenset({b"authorization"})
# RFC 3986 3.2.2/3.2.3 without userinfo: a DNS-style name or a bracketed IP literal, a port.
_AUTHORITY: Final = re.compile(rb"(?:[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?\Z")
_KNOWN_HOSTS: Final = 4096
# A header read as a tuple of any length: compiled, a `tuple[bytes, bytes]` loop variable is
# unboxed (appending it boxes a new tuple per header) and an `Any` one is indexed generically
# (~100 instructions an item); this is indexed as a tuple and kept as it is.
Field = tuple[bytes, ...]
_UNDERSCORE: Final = 0x5F   # an int: `int in bytes` is a memchr, `bytes in bytes` costs an exception first


class TrustedProxies:
    """Peers whose X-Forwarded-* headers are believed."""

    def __init__(self, networks: Sequence[Any]) -> None:
        self._networks = tuple(networks)
        self._cache: dict[str, bool] = {}

    def __contains__(self, ip: str) -> bool:
        known = self._cache.get(ip)
        if known is None:
            try:
                address = ipaddress.ip_address(ip)
            except ValueError:
                address = None
            known = address is not None and any(address in n for n in self._networks)
            if len(self._cache) < 4096:
                self._cache[ip] = known
        return known

    def client_ip(self, peer_ip: str, forwarded_for: bytes | None) -> str:
        """The first address from the right that is not a trusted proxy."""
        if forwarded_for is None or peer_ip not in self:
            return peer_ip
        for hop in reversed(forwarded_for.split(b",")):
            ip = hop.strip().decode("latin-1")
            if ip and ip not in self:
                return ip
        return peer_ip


# The X-Forwarded-For / -Proto headers of an untrusted peer's requests: the same for every
# request from one address (a connection's is one string object, its hash kept), made once
# per address (bounded; past it, per request) and per scheme.
_FORWARDED_MAX: Final = 4096
# Held as `Field` (an object), not `tuple[bytes, bytes]`: compiled, that one is unboxed and every
# request boxed two new tuples of it, one for the `or` and one to append (docs/performance.md, "foot").
_PROTOS: Final[dict[bytes, Field]] = {s: (b"x-forwarded-proto", s) for s in (b"http", b"https")}


class ForwardingHeaders:
    """Sanitise client headers and add correlation, trace and X-Forwarded-* headers.

    Also refuses (400) the heads an upstream would read otherwise than the gateway: a `Host`
    that is not an authority (`a@evil.test`, `gw.test/../x`), two `Authorization` headers
    (the first verified, the second believed). Header names with `_` are dropped unless
    `underscores` (CGI and WSGI read `X_User_Id` as `X-User-Id`); even then one that reads
    as an identity, gateway or forwarding header is dropped."""

    name = "forwarding"
    on_response_body = None
    on_finished = None

    def __init__(self, trusted: TrustedProxies, underscores: bool = False, gate: TraceGate | None = None) -> None:
        self.trusted = trusted
        self.underscores = underscores
        # A trace it starts is sampled unless tracing is on: then `gate` (ops/sampling.py)
        # decides from the traceparent made here, the ones it records go upstream as their
        # spans', and any other as not sampled.
        self.gate = gate
        self._ids = RequestIds(b"01" if gate is None else b"00")
        self._hosts: set[bytes] = set()     # Host values found valid (bounded)
        self._forwarded_for: dict[str, Field] = {}     # peer address -> its header (bounded; `Field`: see _PROTOS)

    def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        incoming_cid = incoming_trace = xff = xfp = xfh = None
        kept: list[Field] = []
        single = 0
        for h in cast("list[Field]", ctx.headers):
            name: bytes = h[0]
            if name in _SINGLE:
                single += 1
                kept.append(h)
                continue
            if _UNDERSCORE in name and not self._underscore_allowed(name):
                continue
            # Both forbidden prefixes start with "x": other names skip the (generic) startswith call.
            if name in _REPLACED or (name[:1] == b"x" and name.startswith(_CLIENT_FORBIDDEN_PREFIXES)):
                value: bytes = h[1]
                if name == b"x-correlation-id":
                    incoming_cid = incoming_cid or value
                elif name == b"traceparent":
                    incoming_trace = value
                elif name == b"x-forwarded-for":
                    xff = value if xff is None else xff + b", " + value
                elif name == b"x-forwarded-proto":
                    xfp = value
                elif name == b"x-forwarded-host":
                    xfh = value
                continue
            kept.append(h)
        ids = self._ids
        ids.draw()
        ctx.correlation_id = cid = correlation_id(incoming_cid, ids.uuid)
        peer = ctx.peer_ip
        trusted = peer in self.trusted
        if trusted:
            ctx.client_ip = self.trusted.client_ip(peer, xff)
        kept.append((b"x-correlation-id", ids.uuid_bytes if cid is ids.uuid else cid.encode()))
        trace = ids.trace if incoming_trace is None else traceparent(incoming_trace, ids.trace)
        gate = self.gate
        if gate is not None:          # ctx.headers are still the client's: a sampled request's recorder reads them
            trace = gate.decide(ctx, trace, incoming_trace)
        kept.append((b"traceparent", trace))
        ctx.traceparent = trace
        if trusted and xff:
            kept.append((b"x-forwarded-for", xff + b", " + peer.encode()))
        else:
            forwarded = self._forwarded_for.get(peer)
            kept.append(forwarded if forwarded is not None else self._peer_header(peer))
        if trusted and xfp:
            kept.append((b"x-forwarded-proto", xfp))
        else:
            scheme = ctx.scheme
            proto = _PROTOS.get(scheme)
            kept.append(proto if proto is not None else (b"x-forwarded-proto", scheme))
        ctx.headers = cast("list[tuple[bytes, bytes]]", kept)
        if single > 1:
            return error_response(ctx, 400, "BAD_REQUEST", "more than one Authorization header")
        host = ctx.host
        if host and host not in self._hosts and not self._valid_host(host):
            return error_response(ctx, 400, "BAD_REQUEST", "the Host header is not a valid host[:port]")
        host = xfh if trusted and xfh else host
        if host:
            kept.append((b"x-forwarded-host", host))
        return None

    def _peer_header(self, peer: str) -> Field:
        header: Field = (b"x-forwarded-for", peer.encode())
        if len(self._forwarded_for) < _FORWARDED_MAX:
            self._forwarded_for[peer] = header
        return header

    def _underscore_allowed(self, name: bytes) -> bool:
        if not self.underscores:
            return False
        dashed = name.replace(b"_", b"-")
        return not (dashed in _REPLACED or dashed in _SINGLE or dashed.startswith(_CLIENT_FORBIDDEN_PREFIXES))

    def _valid_host(self, host: bytes) -> bool:
        if _AUTHORITY.match(host) is None:
            return False
        if len(self._hosts) < _KNOWN_HOSTS:
            self._hosts.add(host)
        return True

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        head.headers.append((b"x-correlation-id", ctx.correlation_id.encode()))


_DROP: Final = 1        # _CompiledRules.marks: a name removed
_DEFAULT: Final = 2     # a default's name (added only when absent)


class _CompiledRules:
    """One direction's header rules, pre-digested: every name is compared in lower case.

    Header lists on both sides hold lower-case names (the transports lower-case them once
    on parsing), so applying rules costs one pass and no per-name case folding.
    """

    __slots__ = ("drop", "prefixes", "starts", "regex", "extra", "extra_names", "defaults", "default_names", "marks",
                 "lengths", "filters")

    def __init__(self, rules: HeaderRules, defaults: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        exact = {n.lower() for n, _ in rules.set}
        prefixes = []
        patterns = []
        for pattern in rules.remove:
            if b"*" not in pattern:
                exact.add(pattern)
            elif pattern.endswith(b"*") and pattern.count(b"*") == 1:
                prefixes.append(pattern[:-1])
            else:
                patterns.append(re.escape(pattern).replace(b"\\*", b".*"))
        self.drop = frozenset(exact)
        self.prefixes: tuple[bytes, ...] | None = tuple(prefixes) or None
        # First bytes of the prefixes: most names are told apart by one set lookup, without
        # the (generic) startswith call. An empty prefix matches every name.
        self.starts = frozenset(p[0] for p in prefixes if p)
        if b"" in prefixes:
            self.starts = frozenset(range(256))
        self.regex = re.compile(b"^(?:" + b"|".join(patterns) + b")$") if patterns else None
        self.extra = [(n.lower(), v) for n, v in rules.set + rules.add]
        self.extra_names = frozenset(n for n, _ in self.extra)
        # added only when absent; `Field`s, appended as they are (see _PROTOS: a `tuple[bytes, bytes]`
        # item was boxed anew per response, three new tuples a response for the security headers)
        self.defaults: tuple[Field, ...] = tuple((n.lower(), v) for n, v in defaults)
        self.default_names = frozenset(n for n, _ in self.defaults)
        # One dict lookup a header instead of a set lookup for each kind (removal wins).
        self.marks = {**{n: _DEFAULT for n in self.default_names}, **{n: _DROP for n in self.drop}}
        # Bit `len(name) % 32` set for each marked name: most names are told unmarked by a shift,
        # without the dict lookup (~120 instructions; a request's forwarding headers all miss).
        self.lengths = 0
        for n in self.marks:
            self.lengths |= 1 << (len(n) & 31)
        self.filters = bool(self.marks) or self.prefixes is not None or self.regex is not None

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` without the removed ones, with the set/added ones, then the defaults that
        are absent: one pass over the list (no set of every name built for the defaults)."""
        marks, lengths, prefixes, starts, regex = self.marks, self.lengths, self.prefixes, self.starts, self.regex
        present: set[bytes] | None = None        # default names the response has
        if self.filters:
            # A new list, as callers may hold the old one; made by one slice when nothing is
            # removed (no append per header), else from the first removed header on.
            kept: list[Field] | None = None
            fields = cast("list[Field]", headers)
            for i, h in enumerate(fields):
                name: bytes = h[0]
                mark = marks.get(name, 0) if lengths >> (len(name) & 31) & 1 else 0
                if (mark == _DROP or (prefixes is not None and name and name[0] in starts and name.startswith(prefixes))
                        or (regex is not None and regex.match(name))):
                    if kept is None:
                        kept = fields[:i]
                    continue
                if kept is not None:
                    kept.append(h)
                if mark == _DEFAULT:
                    if present is None:
                        present = set()
                    present.add(name)
            headers = cast("list[tuple[bytes, bytes]]", kept if kept is not None else fields[:])
        if self.extra:
            headers.extend(self.extra)
        if self.default_names:
            extra_names = self.extra_names
            for default in self.defaults:   # a loop, not a generator: one object fewer per response
                name = default[0]
                if (present is None or name not in present) and name not in extra_names:
                    cast("list[Field]", headers).append(default)
        return headers


_INTERNAL: Final[tuple[bytes, ...]] = (b"x-internal-*",)
_DEFAULT_RESPONSE: Final = _CompiledRules(HeaderRules(remove=_INTERNAL), DEFAULT_SECURITY_HEADERS)


class HeaderRulesFilter:
    """A route's header rules both ways, `X-Internal-*` removal and security headers (the
    defaults alone for answers given before a route is known)."""

    name = "header_rules"
    on_response_body = None
    on_finished = None

    def __init__(self, policy: RouteHeaders | None = None) -> None:
        if policy is None:
            self._request: _CompiledRules | None = None
            self._response = _DEFAULT_RESPONSE
            return
        self._request = _CompiledRules(policy.request) if policy.request else None
        response = policy.response
        self._response = _CompiledRules(HeaderRules(response.set, response.add, response.remove + _INTERNAL),
                                        policy.security)

    def on_request(self, ctx: RequestContext) -> None:
        rules = self._request
        if rules is not None:
            ctx.headers = rules.apply(ctx.headers)

    def response_fields(self, fields: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
        """What the response rules make of `fields` alone (HSTS aside): a filter that would
        add its fields after them asks whether they leave those fields as they are."""
        return self._response.apply(list(fields))

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        head.headers = self._response.apply(head.headers)
        if ctx.scheme == b"https":
            hsts = ctx.downstream.hsts                     # the TLS listener's, or None
            if hsts is not None and not any(name == b"strict-transport-security" for name, _ in head.headers):
                head.headers.append((b"strict-transport-security", hsts))
