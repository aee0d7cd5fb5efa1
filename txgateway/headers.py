"""Header transformations: what the gateway adds, removes and vouches for.

Two filters. `ForwardingHeaders` runs first: it removes what a client must never be able to
assert (identity, gateway and forwarding headers), fixes the correlation id and trace
context, and states where the request came from. `HeaderRules` runs last before the proxy:
the route's own `request_headers` / `response_headers`, `X-Internal-*` stripping and the
security headers.
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from typing import Any, Callable, Sequence

from txgateway.config import DEFAULT_SECURITY_HEADERS, HeaderRules, Route

__all__ = ["ForwardingHeaders", "HeaderRulesFilter", "TrustedProxies", "correlation_id", "traceparent"]

_CORRELATION_ID = re.compile(rb"^[A-Za-z0-9._-]{1,128}$")
_TRACEPARENT = re.compile(rb"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
# Never accepted from a client: the gateway alone sets these (SPEC "Identity").
_CLIENT_FORBIDDEN_PREFIXES = (b"x-user-", b"x-gateway-")
_REPLACED = frozenset({b"x-correlation-id", b"traceparent", b"x-forwarded-for", b"x-forwarded-proto",
                       b"x-forwarded-host", b"x-user-id", b"x-user-role", b"x-user-tier"})


def correlation_id(value: bytes | None) -> str:
    """Keep a well-formed client id (1-128 of [A-Za-z0-9._-]), else a new UUID4."""
    if value is not None and _CORRELATION_ID.match(value):
        return value.decode("ascii")
    return str(uuid.uuid4())


def traceparent(value: bytes | None) -> bytes:
    """W3C trace context: continue the caller's trace with a new span id, or start one."""
    span = os.urandom(8).hex().encode()
    if value is not None:
        match = _TRACEPARENT.match(value.strip())
        if match and match.group(1) != b"ff" and match.group(2) != b"0" * 32 and match.group(3) != b"0" * 16:
            return b"00-" + match.group(2) + b"-" + span + b"-" + match.group(4)
    return b"00-" + os.urandom(16).hex().encode() + b"-" + span + b"-01"


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


class ForwardingHeaders:
    """Sanitise client headers and add correlation, trace and X-Forwarded-* headers."""

    def __init__(self, trusted: TrustedProxies) -> None:
        self.trusted = trusted

    def on_request(self, ctx: Any) -> None:
        incoming_cid = incoming_trace = xff = xfp = xfh = None
        kept = []
        for name, value in ctx.headers:
            if name in _REPLACED or name.startswith(_CLIENT_FORBIDDEN_PREFIXES):
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
            kept.append((name, value))
        ctx.correlation_id = cid = correlation_id(incoming_cid)
        peer = ctx.peer_ip
        trusted = peer in self.trusted
        if trusted:
            ctx.client_ip = self.trusted.client_ip(peer, xff)
        peer_bytes = peer.encode()
        kept.append((b"x-correlation-id", cid.encode()))
        kept.append((b"traceparent", traceparent(incoming_trace)))
        kept.append((b"x-forwarded-for", xff + b", " + peer_bytes if trusted and xff else peer_bytes))
        kept.append((b"x-forwarded-proto", xfp if trusted and xfp else ctx.scheme))
        host = xfh if trusted and xfh else ctx.host
        if host:
            kept.append((b"x-forwarded-host", host))
        ctx.headers = kept

    def on_response(self, ctx: Any, head: Any) -> None:
        head.headers.append((b"X-Correlation-ID", ctx.correlation_id.encode()))


def _matcher(patterns: Sequence[bytes]) -> Callable[[bytes], bool]:
    """Lower-case header name -> removed? (`*` globs)."""
    exact = frozenset(p for p in patterns if b"*" not in p)
    globs = [p for p in patterns if b"*" in p]
    if not globs:
        return exact.__contains__
    regex = re.compile(b"^(?:" + b"|".join(re.escape(g).replace(b"\\*", b".*") for g in globs) + b")$")
    return lambda name: name in exact or regex.match(name) is not None


class _CompiledRules:
    __slots__ = ("set_names", "set", "add", "remove", "security")

    def __init__(self, rules: HeaderRules, lower_names: bool, security: tuple[tuple[bytes, bytes], ...] = ()) -> None:
        pairs = [(n.lower() if lower_names else n, v) for n, v in rules.set]
        self.set = pairs
        self.set_names = frozenset(n.lower() for n, _ in rules.set)
        self.add = [(n.lower() if lower_names else n, v) for n, v in rules.add]
        self.remove = _matcher(rules.remove) if rules.remove else None
        self.security = security

    def apply(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        remove, set_names = self.remove, self.set_names
        if remove is not None or set_names:
            headers = [(n, v) for n, v in headers
                       if not ((low := n.lower()) in set_names or (remove is not None and remove(low)))]
        headers.extend(self.set)
        headers.extend(self.add)
        return headers


_DEFAULT_RESPONSE = _CompiledRules(HeaderRules(remove=(b"x-internal-*",)), False, DEFAULT_SECURITY_HEADERS)


class HeaderRulesFilter:
    """Per-route header rules both ways, `X-Internal-*` removal and security headers."""

    def __init__(self, routes: Sequence[Route]) -> None:
        self._request = {r.index: _CompiledRules(r.request_headers, True) for r in routes if r.request_headers}
        self._response = {
            r.index: _CompiledRules(HeaderRules(r.response_headers.set, r.response_headers.add,
                                                r.response_headers.remove + (b"x-internal-*",)),
                                    False, r.security_headers)
            for r in routes
        }

    def on_request(self, ctx: Any) -> None:
        rules = self._request.get(ctx.route.index)
        if rules is not None:
            ctx.headers = rules.apply(ctx.headers)

    def on_response(self, ctx: Any, head: Any) -> None:
        rules = self._response[ctx.route.index] if ctx.route is not None else _DEFAULT_RESPONSE
        headers = rules.apply(head.headers)
        present = {n.lower() for n, _ in headers} if rules.security else ()
        for name, value in rules.security:
            if name.lower() not in present:
                headers.append((name, value))
        head.headers = headers
