"""Forward auth: an auth service decides each request (nginx's `auth_request`, Traefik's ForwardAuth).

The gateway asks the auth service with the request's method, the chosen headers (its
credentials), `X-Forwarded-Method`, `X-Forwarded-Uri` (path and query), `X-Forwarded-For`
(the client address) and the correlation id, never a body. The auth service is an upstream
like the others: the question goes through its breaker (open: 503 at once), its balancer and
a pooled keep-alive connection (`upstream/pool.py`), bounded by its `connect_timeout` and
`timeout` on the gateway's deadline sweep, and each answer is a verdict for its passive
health and breaker.

- 2xx admits: the named response headers go onto the upstream request (client-sent copies
  removed) and `X-User-Id`/`X-User-Role`/`X-User-Tier` become the request's identity, which
  `roles` and the rate limiter use as they use a JWT's.
- 401 and 403 are the client's answer, in the envelope, with the auth service's
  `WWW-Authenticate`.
- anything else, a timeout, a refused connection or an open breaker: 503, never an admit.

Decisions (admits, 401s and 403s) are kept per credential (the values of `headers_to_send`)
for `cache_ttl`, at most `cache_size` of them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txgateway.core.pipeline import LocalResponse, RequestContext, error_response
from txgateway.filters.auth.config import RouteAuth, header_value_problem
from txgateway.filters.auth.forwardconfig import ForwardAuthConfig
from txgateway.filters.auth.tokens import Identity
from txgateway.upstream.config import proxy_for
from txgateway.upstream.pool import UpstreamConnection
from txgateway.upstream.proxy import UpstreamGroup

__all__ = ["Decision", "DecisionCache", "ForwardAuthFilter", "build_forward_auth"]

_IDENTITY = (b"x-user-id", b"x-user-role", b"x-user-tier")
_UNAVAILABLE = "the auth service could not decide"


@dataclass(frozen=True)
class Decision:
    """The auth service's answer, as the gateway keeps it."""

    status: int                                   # 200 (admitted), 401, 403; 503 is never kept
    headers: tuple[tuple[bytes, bytes], ...] = ()  # admitted: what goes upstream; else the challenge
    identity: Identity | None = None


class DecisionCache:
    """Decisions by credential until they expire; the oldest goes when `size` are kept."""

    def __init__(self, ttl: float, size: int, clock: Any) -> None:
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self._kept: dict[bytes, tuple[float, Decision]] = {}

    def get(self, key: bytes) -> Decision | None:
        kept = self._kept.get(key)
        if kept is None:
            return None
        if kept[0] <= self.clock.seconds():
            del self._kept[key]
            return None
        return kept[1]

    def put(self, key: bytes, decision: Decision) -> None:
        if self.ttl <= 0:
            return
        kept = self._kept
        kept.pop(key, None)
        while len(kept) >= self.size:
            del kept[next(iter(kept))]            # insertion order: the oldest first
        kept[key] = (self.clock.seconds() + self.ttl, decision)

    def __len__(self) -> int:
        return len(self._kept)


def decide(status: int, headers: list[tuple[bytes, bytes]], config: ForwardAuthConfig) -> Decision | None:
    """The auth service's answer as a decision; None when it decided nothing (503)."""
    if 200 <= status < 300:
        found = {name: value for name, value in headers if name in config.headers_from_response or name in _IDENTITY}
        identity = None
        if b"x-user-id" in found:
            user_id, role, tier = (found[n].decode("latin-1") if n in found else None for n in _IDENTITY)
            if any(t is not None and header_value_problem(t) is not None for t in (user_id, role, tier)):
                return None                        # an identity that cannot go upstream: not an admit
            identity = Identity(user_id or "", role, tier, "forward")
        copied = tuple((name, found[name]) for name in config.headers_from_response
                       if name in found and name not in _IDENTITY)
        return Decision(200, (identity.headers if identity is not None else ()) + copied, identity)
    if status in (401, 403):
        return Decision(status, tuple((b"www-authenticate", v) for n, v in headers if n == b"www-authenticate"))
    return None


class AuthCall:
    """One question to the auth service on one pooled connection (the pool's `UpstreamUser`)."""

    def __init__(self, filter: ForwardAuthFilter, ctx: RequestContext, group: UpstreamGroup, member: Any,
                 ticket: int) -> None:
        self.filter = filter
        self.ctx = ctx
        self.group = group
        self.member = member
        self.pool = member.pool
        self.connect_timeout: float = member.pool.connect_timeout   # the pool's backstop on connect attempts
        self.ticket = ticket
        self.conn: UpstreamConnection | None = None
        self.answered = False               # the head came: decided, the body is only drained
        self.done = False
        self.retried = False
        self.deadline = 0.0
        self.result: Deferred[Decision | None] = Deferred(lambda _: self.cancel())

    def start(self) -> None:
        self.member.in_flight += 1
        self.member.requests += 1
        self.deadline = self.filter.deadlines.now + self.connect_timeout
        self.filter.deadlines.add(self)
        self.pool.acquire(self)

    # -- the pool's callbacks --------------------------------------------------------------

    def connected(self, conn: UpstreamConnection) -> None:
        if self.done:
            self.pool.release(conn, True)
            return
        self.conn = conn
        self.deadline = self.filter.deadlines.now + self.pool.timeout
        conn.send(self, self.filter.request_head(self.ctx, self.pool.target.netloc), self.ctx.method == b"HEAD")

    def connecting(self) -> None:
        # Its wait for a free slot is over: the connect gets the whole connect_timeout.
        self.deadline = self.filter.deadlines.now + self.connect_timeout

    def connect_failed(self, reason: Failure) -> None:
        self._fail(f"connect failed: {reason.getErrorMessage()}")

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]],
                      length: int | None) -> None:
        if self.done or self.answered:
            return
        self._judge(f"status {status}" if status in self.group.failure_statuses else None)
        self.result.callback(decide(status, headers, self.filter.config))

    def response_body(self, data: bytes) -> None:
        self.deadline = self.filter.deadlines.now + self.pool.timeout     # drained, not kept

    def read_done(self) -> None:
        pass

    def response_complete(self, reusable: bool) -> None:
        if self.done:
            return
        self.done = True
        self.filter.deadlines.discard(self)
        conn, self.conn = self.conn, None
        if conn is not None:
            self.pool.release(conn, reusable)

    def upstream_failed(self, reason: str, response_started: bool) -> None:
        conn = self.conn
        if not self.answered and not self.retried and conn is not None and conn.reused:
            # A pooled connection the auth service had already closed: once more on a fresh one.
            self.retried = True
            self.conn = None
            self.deadline = self.filter.deadlines.now + self.connect_timeout
            self.pool.connect_new(self)
            return
        self._fail(reason)

    def switched(self, conn: UpstreamConnection, rest: bytes) -> None:
        conn.close()

    def expired(self) -> None:
        self._fail("timeout")

    # -- endings ---------------------------------------------------------------------------

    def cancel(self) -> None:
        """The client left: no verdict on the auth service."""
        if self.done:
            return
        if not self.answered:
            self.answered = True
            self.member.in_flight -= 1
            if self.group.breaker is not None:
                self.group.breaker.release(self.ticket)
        self._close()

    def _fail(self, reason: str) -> None:
        if self.done:
            return
        self._close()
        if not self.answered:
            self._judge(reason)
            self.ctx.note("auth_service_error", reason)
            self.result.callback(None)

    def _close(self) -> None:
        if self.conn is None and not self.done:
            self.pool.forget(self)
        self.done = True
        self.filter.deadlines.discard(self)
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def _judge(self, failure: str | None) -> None:
        """The question's one verdict, for the target's passive health and the breaker."""
        self.answered = True
        self.member.in_flight -= 1
        balancer, breaker = self.group.balancer, self.group.breaker
        if failure is None:
            balancer.succeeded(self.member)
            if breaker is not None:
                breaker.record_success(self.ticket)
        else:
            balancer.failed(self.member, failure)
            if breaker is not None:
                breaker.record_failure(self.ticket, failure)


class ForwardAuthFilter:
    """One route's `auth: {forward: ...}` (and `roles`)."""

    name = "auth"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, policy: RouteAuth, config: ForwardAuthConfig, group: UpstreamGroup, deadlines: Any,
                 clock: Any) -> None:
        self.config = config
        self.roles = policy.roles
        self.group = group
        self.deadlines = deadlines
        self.cache = DecisionCache(config.cache_ttl, config.cache_size, clock)
        self.send = config.headers_to_send
        self.replaced = frozenset(config.headers_from_response)

    def credential(self, ctx: RequestContext) -> bytes:
        """What the decision is kept under: a digest of the headers the auth service sees."""
        digest = hashlib.sha256()
        for name, value in ctx.headers:
            if name in self.send:
                digest.update(b"%s:%d:%s\n" % (name, len(value), value))
        return digest.digest()

    def request_head(self, ctx: RequestContext, host: bytes) -> bytes:
        parts = [b"%s %s HTTP/1.1\r\nhost: %s\r\nx-forwarded-method: %s\r\nx-forwarded-uri: %s%s\r\n"
                 b"x-forwarded-for: %s\r\nx-correlation-id: %s\r\n" % (
                     ctx.method, self.config.path, host, ctx.method, ctx.path, ctx.query,
                     ctx.client_ip.encode("latin-1"), ctx.correlation_id.encode("latin-1"))]
        parts += [b"%s: %s\r\n" % header for header in ctx.headers if header[0] in self.send]
        parts.append(b"\r\n")
        return b"".join(parts)

    def on_request(self, ctx: RequestContext) -> LocalResponse | Deferred[LocalResponse | None] | None:
        if self.replaced:
            ctx.headers = [h for h in ctx.headers if h[0] not in self.replaced]
        key = self.credential(ctx)
        decision = self.cache.get(key)
        if decision is not None:
            ctx.note("auth_service", "cached")
            return self._apply(ctx, decision)
        group = self.group
        ticket = 0
        if group.breaker is not None:
            allowed = group.breaker.allow()
            if allowed is None:
                ctx.note("auth_service_error", "breaker open")
                return error_response(ctx, 503, "UPSTREAM_UNAVAILABLE", _UNAVAILABLE,
                                      [(b"retry-after", b"%d" % group.breaker.retry_after())])
            ticket = allowed
        member = group.balancer.pick()
        if member is None:
            if group.breaker is not None:
                group.breaker.release(ticket)
            ctx.note("auth_service_error", "no healthy target")
            return error_response(ctx, 503, "UPSTREAM_UNAVAILABLE", _UNAVAILABLE,
                                  [(b"retry-after", b"%d" % group.balancer.retry_after())])
        call = AuthCall(self, ctx, group, member, ticket)
        call.start()
        return call.result.addCallback(self._decided, ctx, key)

    def _decided(self, decision: Decision | None, ctx: RequestContext, key: bytes) -> LocalResponse | None:
        if decision is None:
            return error_response(ctx, 503, "UPSTREAM_UNAVAILABLE", _UNAVAILABLE)
        self.cache.put(key, decision)
        return self._apply(ctx, decision)

    def _apply(self, ctx: RequestContext, decision: Decision) -> LocalResponse | None:
        if decision.status == 401:
            return error_response(ctx, 401, "UNAUTHORIZED", "the auth service refused these credentials",
                                  list(decision.headers))
        if decision.status == 403:
            return error_response(ctx, 403, "FORBIDDEN", "the auth service refused this request",
                                  list(decision.headers))
        identity = decision.identity
        if self.roles is not None and (identity is None or identity.role not in self.roles):
            return error_response(ctx, 403, "FORBIDDEN", "this identity lacks the role this route requires")
        ctx.identity = identity
        ctx.headers.extend(decision.headers)
        return None


def build_forward_auth(resources: Any, policy: RouteAuth, config: ForwardAuthConfig) -> ForwardAuthFilter:
    group = proxy_for(resources).groups[config.upstream]
    return ForwardAuthFilter(policy, config, group, resources.deadlines, resources.clock)
