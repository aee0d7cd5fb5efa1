"""The limit step of the pipeline: token buckets per key, tier and route.

A bucket holds up to `burst` tokens and refills continuously at `rate` (count per window).
A request takes one token; a rejected request takes none (Kong's users complain that
rejected requests count). Buckets are scoped per route unless routes share a `scope`.
`RateLimitStore` is the seam: `LocalStore` here (`backend: local`, and the fallback while
Redis is down), `RedisStore` and `HybridStore` in redisstore.py. When a Redis-backed store
cannot answer (RedisUnavailable, at once or within `redis.timeout`), `on_redis_error`
decides: `local` limits with in-process buckets at this instance's share of the rate,
`allow` lets the request through unlimited, `deny` answers 503.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any, Final, Protocol

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from txgateway.core.periodic import Periodic
from txgateway.core.pipeline import LocalResponse, PreparedFields, RequestContext, ResponseHead, error_response
from txgateway.core.route import Route
from txgateway.filters.ratelimit.config import LimitsConfig, RouteLimit
from txgateway.filters.ratelimit.redislink import RedisUnavailable

__all__ = ["Bucket", "Decision", "Limiter", "LocalStore", "RateLimitFilter", "RateLimitStore", "take"]

_PLAIN_KEY: Final = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")
_OWN_HEADERS: Final = frozenset({b"x-ratelimit-limit", b"x-ratelimit-remaining", b"x-ratelimit-reset",
                                 b"ratelimit-policy", b"ratelimit"})      # 17, 21, 17, 16 and 9 bytes
# Float refill sums land a few ulps off exact values (18 s at 3/minute from 0.1 tokens gives
# 0.9999999999999999 tokens); decisions and whole seconds are taken with this much slack.
_SLACK: Final = 1e-9

# The attributes of a Redis decision's span (the limiter's Lua script, sent with EVALSHA).
_REDIS_SPAN: Final = {"db.system.name": "redis", "db.operation.name": "EVALSHA"}


def route_scope(route: Route) -> str:
    """A route's own bucket scope, named by what the route matches (not its position in the
    file), so that buckets stay with their route across reloads that add or reorder routes."""
    methods = ",".join(sorted(m.decode() for m in route.methods)) if route.methods else ""
    return f"route:{route.host or ''}{route.prefix}" + (f"[{methods}]" if methods else "")


def _sf_string(text: str) -> bytes:
    """A structured-field string body (RFC 8941): escape backslash and quote."""
    return text.replace("\\", "\\\\").replace('"', '\\"').encode("ascii", "replace")


def take(tokens: float, updated: float, now: float, per_second: float, burst: int) -> tuple[bool, float]:
    """One token-bucket decision: (allowed, tokens left). Refill is continuous, capped at burst."""
    tokens = min(float(burst), tokens + max(0.0, now - updated) * per_second)
    if tokens >= 1.0 - _SLACK:
        return True, max(0.0, tokens - 1.0)
    return False, tokens


class Decision:
    """One bucket's answer (a plain slotted class: made on every limited request)."""

    __slots__ = ("allowed", "remaining", "per_second", "burst", "fallback")

    def __init__(self, allowed: bool, remaining: float, per_second: float, burst: int,
                 fallback: str | None = None) -> None:
        self.allowed = allowed
        self.remaining = remaining      # tokens left after this request (below 0: a shared bucket in debt)
        self.per_second = per_second
        self.burst = burst
        self.fallback = fallback        # None, or which on_redis_error policy decided (Redis down)

    @property
    def outcome(self) -> str:
        return outcome(self.allowed, self.fallback)

    def __repr__(self) -> str:
        return f"Decision(allowed={self.allowed}, remaining={self.remaining:.3f}, burst={self.burst})"

    @property
    def reset(self) -> int:
        return reset_seconds(self.remaining, self.per_second, self.burst)

    @property
    def retry_after(self) -> int:
        return retry_seconds(self.remaining, self.per_second)


def outcome(allowed: bool, fallback: str | None) -> str:
    """For the access log: allowed | rejected, or local:allowed / local:rejected / allow / deny
    when Redis was down and on_redis_error decided."""
    if fallback is None:
        return "allowed" if allowed else "rejected"
    if fallback == "local":
        return "local:allowed" if allowed else "local:rejected"
    return fallback


def reset_seconds(remaining: float, per_second: float, burst: int) -> int:
    """Whole seconds until the bucket is full again."""
    return math.ceil((burst - remaining) / per_second - _SLACK)


def retry_seconds(remaining: float, per_second: float) -> int:
    """Whole seconds (>= 1) until one token is back."""
    return max(1, math.ceil((1.0 - remaining) / per_second - _SLACK))


class PolicyHeaders:
    """One policy's limit headers, as the fields the transport sends in one piece (their wire
    form made here, not by the transport per request). The parts that never change (label,
    limit, policy) are made once; the rest again only when the numbers change: a bucket that
    stays full or nearly so gives the same numbers request after request."""

    __slots__ = ("label", "limit", "policy", "_wire_head", "_remaining", "_reset", "_fields")

    def __init__(self, name: str, count: int, window: int) -> None:
        self.label = _sf_string(name)
        self.limit = (b"x-ratelimit-limit", b"%d" % count)
        self.policy = (b"ratelimit-policy", b'"%s";q=%d;w=%d' % (self.label, count, window))
        self._wire_head = b"x-ratelimit-limit: %d\r\nx-ratelimit-remaining: " % count
        self._remaining = -1
        self._reset = -1
        self._fields = PreparedFields(())

    def fields(self, remaining: int, reset: int) -> PreparedFields:
        if remaining != self._remaining or reset != self._reset:
            # Numbers as str(int).encode() and pieces joined: a bytes %-format costs several times more.
            left = str(remaining).encode()
            seconds = str(reset).encode()
            label, policy = self.label, self.policy
            self._fields = PreparedFields(
                (self.limit, (b"x-ratelimit-remaining", left), (b"x-ratelimit-reset", seconds), policy,
                 (b"ratelimit", b"".join((b'"', label, b'";r=', left, b";t=", seconds)))),
                b"".join((self._wire_head, left, b"\r\nx-ratelimit-reset: ", seconds, b"\r\nratelimit-policy: ",
                          policy[1], b'\r\nratelimit: "', label, b'";r=', left, b";t=", seconds, b"\r\n")))
            self._remaining = remaining
            self._reset = reset
        return self._fields


class Policy:
    """What a route applies for one tier (or its own rate): its buckets' name, rate and burst,
    its headers, and for `key: user` its buckets' keys by user id (made once per user: a key's
    string and its hash are kept)."""

    def __init__(self, name: str, per_second: float, burst: int, headers: PolicyHeaders) -> None:
        self.name = name
        self.per_second = per_second
        self.burst = burst
        self.headers = headers
        self.user_keys: dict[str, str] = {}

    def user_key(self, scope: str, user_id: str) -> str:
        key = self.user_keys.get(user_id)
        if key is None:
            key = f"{scope}|{self.name}|user:{user_id}"
            if len(self.user_keys) < _MAX_USER_KEYS:
                self.user_keys[user_id] = key
        return key


_MAX_USER_KEYS: Final = 10_000      # per route and policy; beyond, keys are made per request


class RateLimitStore(Protocol):
    """Takes one token from a bucket; a Redis-backed store may answer later (a Deferred) and
    raises (or fails with) RedisUnavailable when Redis cannot answer in time."""

    def take(self, key: str, per_second: float, burst: int) -> Decision | Deferred[Decision]: ...
    def start(self) -> None: ...
    def stop(self) -> Any: ...


class Bucket:
    """One key's tokens, updated in place: native float fields, no boxed floats a request."""

    def __init__(self, tokens: float, updated: float, per_second: float, burst: float) -> None:
        self.tokens = tokens
        self.updated = updated
        self.per_second = per_second
        self.burst = burst

    def level(self, now: float) -> float:
        """Tokens it would hold at `now` without the cap at burst."""
        return self.tokens + (now - self.updated) * self.per_second


class LocalStore:
    """In-process buckets with bounded memory: full buckets are forgotten (they equal a
    new one), and beyond `max_buckets` the least recently used are dropped. Those have
    refilled the longest, so a fresh bucket gives them the least they did not have; dropping
    the oldest-created instead would hand a client hammering its limit a new burst."""

    def __init__(self, clock: Any, max_buckets: int = 100_000, sweep_every: float = 10.0) -> None:
        self.clock = clock
        self._seconds: Callable[[], float] = clock.seconds    # called bound: a method call on Any is generic
        self.max_buckets = max_buckets
        self.buckets: dict[str, Bucket] = {}
        # The bucket used last, already last in the dict's order: the same key again (a client's
        # next request) needs no move (a pop and an insert). Forgotten whenever buckets go.
        self._recent_key = ""
        self._recent: Bucket | None = None
        self._sweeper = Periodic(clock, sweep_every, self.sweep)

    def start(self) -> None:
        self._sweeper.start()

    def stop(self) -> None:
        self._sweeper.stop()

    def take(self, key: str, per_second: float, burst: int) -> Decision:
        allowed, left = self.take_token(key, per_second, burst)
        return Decision(allowed, left, per_second, burst)

    def take_token(self, key: str, per_second: float, burst: int) -> tuple[bool, float]:
        """`take` as (allowed, tokens left), no Decision: the limit step's own call."""
        now = self._seconds()
        bucket = self._recent
        if bucket is None or key != self._recent_key:
            buckets = self.buckets
            bucket = buckets.pop(key, None)
            if bucket is None:
                if len(buckets) >= self.max_buckets:
                    self._evict()
                bucket = Bucket(float(burst), now, per_second, float(burst))
            buckets[key] = bucket      # last in the dict's order: the most recently used
            self._recent_key, self._recent = key, bucket
        allowed, left = take(bucket.tokens, bucket.updated, now, per_second, burst)
        bucket.tokens = left
        bucket.updated = now
        bucket.per_second = per_second
        bucket.burst = float(burst)
        return allowed, left

    def peek(self, key: str) -> float | None:
        """Tokens a bucket holds now (for status pages and the Manhole), None if unknown."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return None
        return min(bucket.burst, bucket.level(self.clock.seconds()))

    def sweep(self) -> None:
        now = self.clock.seconds()
        full = [k for k, bucket in self.buckets.items() if bucket.level(now) >= bucket.burst - _SLACK]
        for key in full:
            del self.buckets[key]
        self._recent = None

    def _evict(self) -> None:
        self.sweep()
        excess = len(self.buckets) - self.max_buckets + 1
        if excess > 0:
            for key in list(self.buckets)[:max(excess, self.max_buckets // 100)]:
                del self.buckets[key]


class Limiter:
    """What every limited route's filter shares: the stores, the tiers and each policy's limit
    headers."""

    def __init__(self, config: LimitsConfig | None, own_rates: Sequence[tuple[str, int, int]], store: RateLimitStore,
                 local_buckets: LocalStore | None = None) -> None:
        self.config = config
        self.store = store
        self.local_buckets = local_buckets       # for on_redis_error: local
        self.on_redis_error = config.on_redis_error if config is not None else "local"
        self.instances = config.instances if config is not None else 1
        self.tiers = ({name: (name, t.rate.per_second, t.burst, t.rate.count, t.rate.window)
                       for name, t in config.tiers.items()} if config is not None else {})
        # Per policy, its headers. Keyed by count and window too: a route's scope may be named
        # like a tier, or shared by routes with different rates.
        self.headers = {
            (name, count, window): PolicyHeaders(name, count, window)
            for name, count, window in [*((n, c, w) for n, _, _, c, w in self.tiers.values()), *own_rates]
        }


class RateLimitFilter:
    """One route's limit step (`rate_limit:`): its key, scope and rate (its own or the tier's)."""

    name = "rate_limit"
    on_response_body = None
    on_finished = None

    def __init__(self, limiter: Limiter, limit: RouteLimit, route: Route) -> None:
        self.limiter = limiter
        self.store = limiter.store
        # The in-process store called natively (a Protocol-typed call is a generic one).
        self.local_store = limiter.store if isinstance(limiter.store, LocalStore) else None
        headers = limiter.headers
        self.tiers: dict[str, Policy] = {tier: Policy(name, per_second, burst, headers[name, count, window])
                                         for tier, (name, per_second, burst, count, window) in limiter.tiers.items()}
        self.default_tier = limiter.config.default_tier if limiter.config is not None else ""
        self.key = limit.key
        self.header = limit.header
        self.scope = limit.scope or route_scope(route)
        self.own: Policy | None = None
        if limit.rate is not None:
            name = limit.scope or route.prefix
            self.own = Policy(name, limit.rate.per_second, limit.burst or limit.rate.count,
                              headers[name, limit.rate.count, limit.rate.window])
        # `key: user`: the last identity's policy and bucket key. A cached token's identity is
        # the same object request after request: one identity check instead of the lookups.
        # (An object here: typing it Identity would import PyJWT with this module, on routes
        # without auth too.)
        self.last_identity: object = None
        self.last_policy: Policy | None = None
        self.last_key = ""

    def on_request(self, ctx: RequestContext) -> LocalResponse | Deferred[LocalResponse | None] | None:
        identity = ctx.identity
        policy = self.last_policy
        if identity is None or identity is not self.last_identity or policy is None:
            policy = self.own
            if policy is None:
                tier = identity.tier if identity is not None and identity.tier in self.tiers else None
                policy = self.tiers[tier or self.default_tier]
            if self.key == "user" and identity is not None:
                key = policy.user_key(self.scope, identity.user_id)
                self.last_identity, self.last_policy, self.last_key = identity, policy, key
            else:
                key = f"{self.scope}|{policy.name}|{self._key(ctx)}"
        else:
            key = self.last_key
        per_second, burst = policy.per_second, policy.burst
        local_store = self.local_store
        if local_store is not None:
            allowed, left = local_store.take_token(key, per_second, burst)
            return self._answer(ctx, policy.headers, allowed, left, per_second, burst, None)
        try:
            decision = self.store.take(key, per_second, burst)
        except RedisUnavailable:
            decision = self._redis_error(key, per_second, burst)
        if not isinstance(decision, Decision):     # a Deferred (Redis); a native type check, not Deferred's
            spans = ctx.get_state("tracing")
            if spans is not None:       # tracing: on (ops/tracing.py): the Redis call is a span of the request
                spans.around(decision, "EVALSHA", _REDIS_SPAN)
            decision.addErrback(self._redis_failed, key, per_second, burst)
            return decision.addCallback(self._decided, ctx, policy.headers)
        return self._decided(decision, ctx, policy.headers)

    def _decided(self, decision: Decision, ctx: RequestContext, headers: PolicyHeaders) -> LocalResponse | None:
        return self._answer(ctx, headers, decision.allowed, decision.remaining, decision.per_second, decision.burst,
                            decision.fallback)

    def _answer(self, ctx: RequestContext, headers: PolicyHeaders, allowed: bool, remaining: float,
                per_second: float, burst: int, fallback: str | None) -> LocalResponse | None:
        """A decision's effects: the limit headers for the response (none when on_redis_error
        let the request through unlimited or refused it: no numbers to tell), the outcome the
        access log and stats read, and a refusal's answer. The fields are the request's state: the head hook sends them."""
        if fallback is None or fallback == "local":
            # A shared bucket in debt shows 0 remaining.
            ctx.set_state("rate_limit", headers.fields(max(0, int(remaining + _SLACK)),
                                                       reset_seconds(remaining, per_second, burst)))
        ctx.rate_limit = outcome(allowed, fallback)
        if allowed:
            return None
        if fallback == "deny":
            return error_response(ctx, 503, "RATE_LIMITER_UNAVAILABLE",
                                  "the rate limiter's shared state is unreachable; retry later", [(b"retry-after", b"1")])
        return error_response(ctx, 429, "RATE_LIMITED", "rate limit exceeded; retry later",
                              [(b"retry-after", b"%d" % retry_seconds(remaining, per_second))])

    def _redis_failed(self, failure: Failure, key: str, per_second: float, burst: int) -> Decision:
        failure.trap(RedisUnavailable)      # anything else (the client left: cancelled) goes on
        return self._redis_error(key, per_second, burst)

    def _redis_error(self, key: str, per_second: float, burst: int) -> Decision:
        """Redis could not answer in time: on_redis_error decides, never a stalled request."""
        limiter = self.limiter
        policy = limiter.on_redis_error
        if policy == "local" and limiter.local_buckets is not None:
            n = limiter.instances
            decision = limiter.local_buckets.take(key, per_second / n, max(1, burst // n))
            decision.fallback = "local"
            return decision
        return Decision(policy != "deny", 0.0, per_second, burst, policy)

    def _key(self, ctx: RequestContext) -> str:
        """Whose bucket, when it is not a known user's (on_request keeps those)."""
        identity = ctx.identity
        kind = self.key
        if kind == "api_key" and identity is not None and identity.source == "api_key":
            return "key:" + identity.user_id
        if kind == "header":
            value = ctx.host if self.header == b"host" else ctx.header(self.header)  # type: ignore[arg-type]
            if value is not None:
                if _PLAIN_KEY.match(value):
                    return "h:" + value.decode("ascii")
                # Long or binary values: bounded, and never echoed into keys or logs as is.
                return "h#" + hashlib.sha256(value).hexdigest()
        return "ip:" + ctx.client_ip

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        limited = ctx.get_state("rate_limit")
        if limited is None:
            return
        ours: PreparedFields = limited      # typed (checked once): compiled, then native reads
        headers = head.headers
        for name, _ in headers:
            size = len(name)            # a native length first: few names have one of ours
            if (size == 17 or size == 21 or size == 16 or size == 9) and name in _OWN_HEADERS:
                # An upstream's own limit headers: ours replace them, never two conflicting values.
                headers = head.headers = [h for h in headers if h[0] not in _OWN_HEADERS]
                break
        if head.prepared is None:
            # No later head hook edits them (the edge's adds the correlation id): one piece of the head.
            head.prepared = ours
        else:
            headers.extend(ours.pairs)
