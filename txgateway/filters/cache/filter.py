"""The cache filter: answers hits in its request hook, stores misses as they stream past.

A hit is a `LocalResponse` from the request hook: the upstream is never asked and the chain's
other response hooks (header rules, the limiter's headers) run on it as on any answer. A miss
goes upstream; the head hook decides whether the response may be stored (RFC 9111 §3), and
the body hook keeps a copy of each chunk as it passes to the client (never store-then-send),
dropping the copy once it outgrows `max_object_size`. Only a body that reached its end is
stored, so a truncated response never is. A stale entry is revalidated with its validators;
a 304 refreshes it (§4.3.4). When the upstream fails, times out, answers 5xx, or the proxy
refuses for an open breaker or no target in rotation, a stale entry allowed by
`stale-if-error` or the route's `serve_stale` is sent instead of the error.

Concurrent misses for one key wait for the first (collapsed forwarding, bounded by
`lock_timeout`); `stale-while-revalidate` answers at once while one background request,
through the route's own terminal, refreshes the entry. When the client of a fill goes away,
the fill goes on without it (`keep`). A HEAD miss is fetched as a GET, so it is stored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from twisted.internet.defer import Deferred

from txgateway.core.nowhere import Nowhere
from txgateway.core.pipeline import REASONS, LocalResponse, PreparedFields, RequestContext, ResponseHead, error_response
from txgateway.filters.cache.config import CacheSettings, RouteCache
from txgateway.filters.cache.rules import (
    DEFAULT_CACHEABLE,
    MAX_DELTA,
    Directives,
    directives,
    field_values,
    members,
    parse_delta,
    parse_directives,
    parse_http_date,
)
from txgateway.filters.cache.store import Entry, Store, cache_key, key_parts
from txgateway.filters.headers import ForwardingHeaders, HeaderRulesFilter

__all__ = ["CacheFilter", "build_filter"]

# Final: mypyc reads these as C statics, not from the module's dict (a miss reads many).
NAME: Final = "cache"
MAX_VARY: Final = 32          # a response varying on more request headers is not stored
_SAFE: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
_COOKIES: Final = frozenset({b"set-cookie", b"set-cookie2"})
# RFC 9111 §3.2: a 304 updates the stored fields, except those describing the stored content.
_NOT_UPDATED: Final = frozenset({b"content-length", b"content-encoding", b"transfer-encoding", b"content-range",
                                 b"content-md5", b"etag", b"age"})
_CONDITIONALS: Final = frozenset({b"if-none-match", b"if-modified-since"})
# The request fields the cache looks at, as bits of one pass over the headers.
_RANGE: Final = 1
_AUTHORIZATION: Final = 2
_CACHE_CONTROL: Final = 4
_PRAGMA: Final = 8
_CONDITIONAL: Final = 16
_WATCHED: Final = {b"range": _RANGE, b"authorization": _AUTHORIZATION, b"cache-control": _CACHE_CONTROL,
                   b"pragma": _PRAGMA, b"if-none-match": _CONDITIONAL, b"if-modified-since": _CONDITIONAL}
# Non-zero at the first byte of a watched name: most request fields (host, user-agent, x-...)
# are passed over by one index, not hashed for a dict lookup (each name is a new bytes object).
_WATCHED_FIRST: Final = bytes(1 if i in {name[0] for name in _WATCHED} else 0 for i in range(256))
_NO_DIRECTIVES: Final = Directives({})
_NO_VARY: Final[list[bytes]] = []     # a response without Vary (most): no list made for it; never changed
# A leader's waiters until one comes (most misses have none): no list made per miss; never changed.
_NO_WAITERS: Final[list[Deferred[Any]]] = []
# RFC 9211 on the cache's own 504: neither `hit` (nothing stored answered) nor `fwd` (not forwarded).
_NOT_CACHED: Final = [(b"cache-status", b"txgateway; detail=only-if-cached"), (b"x-cache", b"MISS")]
# A miss's Cache-Status and X-Cache by stored, fwd and upstream status: formatting them costs more
# than finding them (and nested dicts, keyed by constants and ints, more than a tuple key built and
# hashed each time).
_MISS_FIELDS: Final[tuple[dict[bytes, dict[int, PreparedFields]], dict[bytes, dict[int, PreparedFields]]]] = ({}, {})
_MISS_PROBE: Final = ((b"cache-status", b"txgateway"), (b"x-cache", b"MISS"))


def _miss_fields(stored: bool, fwd: bytes, status: int) -> PreparedFields:
    """A miss's Cache-Status and X-Cache, made once per kind (formatting costs more than finding)."""
    by_status = _MISS_FIELDS[stored].get(fwd)
    if by_status is None:
        by_status = _MISS_FIELDS[stored][fwd] = {}
    fields = by_status.get(status)
    if fields is None:
        line = b"txgateway; fwd=%s; fwd-status=%d%s" % (fwd, status, b"; stored" if stored else b"")
        fields = PreparedFields(((b"cache-status", line), (b"x-cache", b"MISS")))
        if len(by_status) < 1024:
            by_status[status] = fields
    return fields


class _Forward:
    """A request the cache sent upstream: what the head and body hooks need to store it."""

    __slots__ = ("key", "entry", "request_time", "req", "fwd", "vary_source", "record", "size", "replace",
                 "leader", "conditional", "background", "as_head", "fill", "length", "cache")

    def __init__(self, cache: CacheFilter, key: bytes, entry: Entry | None, request_time: float,
                 req: Directives, fwd: bytes, vary_source: list[tuple[bytes, bytes]]) -> None:
        self.cache = cache
        self.key = key
        self.entry = entry                 # a stored response this request may refresh or fall back on
        self.request_time = request_time
        self.req = req                     # the request's Cache-Control
        self.fwd = fwd                     # why it went upstream (Cache-Status fwd=)
        self.vary_source = vary_source     # the request's headers, for the entry's Vary values
        self.record: list[bytes] | None = None   # the body's chunks so far, when it comes in several
        self.size = 0
        self.replace: bytes | None = None  # the body sent instead of the upstream's (304, stale)
        self.leader = False                # other requests for the key wait for this one
        self.conditional: list[tuple[bytes, bytes]] | None = None   # the client's, kept aside
        self.background = False            # no client: a refresh, or a fill its client left
        self.as_head = False               # a HEAD request sent upstream as GET, so its answer is stored
        self.fill: Entry | None = None     # the entry being recorded, made from its head: the body comes last
                                           # (None: nothing to store, or stored already)
        self.length: int | None = None     # the length its head announced

    def keep(self, ctx: RequestContext) -> bool:
        """Pipeline.cancel asks the states of a request whose client left (see CacheFilter.keep)."""
        return self.cache.keep(ctx, self)


_X_HIT: Final = (b"x-cache", b"HIT")
_X_STALE: Final = (b"x-cache", b"STALE")
# The names of a hit's own fields, for the header rules' check (_HitHead).
_HIT_PROBE: Final = ((b"age", b"0"), (b"cache-status", b"txgateway; hit"), (b"x-cache", b"HIT"))


class _HitHead:
    """A stored response's fields as HTTP/1.1 writes them, made by its first hit (Entry.hit_head,
    counted in its size), and whether the route's head hooks leave them as they are: then a hit
    sends them in one piece (`LocalResponse.prepared`), past every head hook and the transport's
    loop over fields. `cache`: the filter that decided (a reload's new one decides again)."""

    __slots__ = ("wire", "cache", "ok")

    def __init__(self, wire: bytes) -> None:
        self.wire = wire
        self.cache: CacheFilter | None = None
        self.ok = False


class _Bypass:
    __slots__ = ("why",)

    def __init__(self, why: bytes) -> None:
        self.why = why


class _Invalidate:
    __slots__ = ("key",)

    def __init__(self, key: bytes) -> None:
        self.key = key


def _request_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """A request field's value as the key and Vary compare it: whitespace-insensitive, and
    case- and order-insensitive for Accept-Language."""
    values = [v for k, v in headers if k == name]
    if not values:
        return None
    members = [b"".join(m.split()) for v in values for m in v.split(b",")]
    if name == b"accept-language":
        members = sorted(m.lower() for m in members)
    return b",".join(members)


def _vary_matches(entry: Entry, headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether the request has the values of the fields the entry's response varies on."""
    return all(_request_value(headers, name) == value for name, value in entry.vary)


def _etag_matches(condition: bytes, etag: bytes | None) -> bool:
    """If-None-Match's weak comparison (RFC 9110 §13.1.2)."""
    if etag is None:
        return False
    if condition.strip() == b"*":
        return True
    mine = etag.strip().removeprefix(b"W/")
    return any(tag.strip().removeprefix(b"W/") == mine for tag in condition.split(b","))


class CacheFilter:
    name = NAME

    def __init__(self, store: Store, settings: CacheSettings, policy: RouteCache, route: str, clock: Any,
                 prepared: bool = False) -> None:
        self.store = store
        # A miss's Cache-Status and X-Cache as the head's PreparedFields, past every other head
        # hook: only when the route's header rules leave them alone (`rules_leave`).
        self.prepared = prepared
        self.settings = settings
        self.policy = policy
        # What every request reads, as native attributes (the policy and settings are plain dataclasses).
        self.methods: frozenset[bytes] = policy.methods
        self.by_identity: bool = policy.identity
        self.credentials: bool = policy.identity or settings.credentials
        self.key_query: bool | tuple[bytes, ...] = policy.query
        self.key_headers: tuple[bytes, ...] = policy.headers
        self.max_object_size: int = settings.max_object_size
        self.ttl: float = policy.ttl
        self.route = route
        self.route_key = route.encode()     # the keys' first part
        self.clock = clock
        self.now: Callable[[], float] = clock.seconds     # found once: a method lookup on the reactor each time cost ~250
        self.gets: bool = b"GET" in policy.methods
        self.host_seen = self.host_lower = b""
        # The last key made without identity or key.headers, and its parts (`key`).
        self.key_path = self.key_query_seen = self.key_host = self.key_last = b""
        self.counts = store.counts(route)
        # A hit's Age and Cache-Status fields, kept for the next hit with the same values.
        self.hit_age = self.hit_ttl = -1
        self.hit_age_field = self.hit_status_field = (b"", b"")
        # The route's header rules, when they are the only head hooks that could edit a hit's
        # fields (None: another filter's could; found from the chain at the first hit).
        self.hit_rules: list[HeaderRulesFilter] | None = None
        self.hit_chain_seen = False
        # The last prepared hit's fields, for the next hit of the same entry (known by its
        # _HitHead: holding the entry would keep its body after the store dropped it), Age and verdict.
        self.hit_last: _HitHead | None = None
        self.hit_stale = False
        self.hit_prepared = PreparedFields(())
        # A miss's Cache-Status and X-Cache, kept for the next miss of the same kind (_forwarded).
        self.miss_stored = False
        self.miss_fwd = b""
        self.miss_status = 0
        self.miss_fields = PreparedFields(())
        self.inflight = store.inflight
        # The fields of the last entry made: the next one shares the objects of those it repeats (Entry).
        self.last_fields: list[tuple[bytes, bytes]] = []
        # Set-Cookie is never stored (so never sent to another client) unless the section says so.
        self.not_stored = frozenset({b"age"}) if settings.store_set_cookie else frozenset({b"age"}) | _COOKIES
        self.drop_cookies: bool = not settings.store_set_cookie

    # -- keys ----------------------------------------------------------------------------

    def key(self, ctx: RequestContext) -> bytes:
        """Route, host as routed, path and the query the route keys on, identity and the
        request headers named in `key.headers`: nothing a client can vary outside it."""
        query: bytes = ctx.query
        keep = self.key_query
        if keep is False:
            query = b""
        elif keep is not True and query:
            wanted = [p for p in query[1:].split(b"&") if p.partition(b"=")[0] in keep]  # type: ignore[operator]
            query = b"?" + b"&".join(sorted(wanted)) if wanted else b""
        host = ctx.host or b""
        if host == self.host_seen:       # one host, as a route usually has: its lower case remembered
            host = self.host_lower
        else:
            self.host_seen = host
            host = self.host_lower = host.lower()
        identity = None
        if self.by_identity and ctx.identity is not None:
            identity = ctx.identity.user_id
        if identity is None and not self.key_headers:
            # The last key again when its parts are (a hot URL): no formatting, and the store's
            # lookup finds its hash made.
            path = ctx.path
            if path == self.key_path and query == self.key_query_seen and host is self.key_host:
                return self.key_last
            key = cache_key(self.route_key, host, path, query)
            self.key_path, self.key_query_seen, self.key_host, self.key_last = path, query, host, key
            return key
        extra = tuple(_request_value(ctx.headers, name) for name in self.key_headers) if self.key_headers else ()
        return cache_key(self.route_key, host, ctx.path, query, identity, extra)

    # -- request -------------------------------------------------------------------------

    def on_request(self, ctx: RequestContext) -> LocalResponse | Deferred[Any] | None:
        method = ctx.method
        # GET compared first: `in` hashes the method, a new bytes object each request.
        if not (self.gets if method == b"GET" else method in self.methods):
            if method not in _SAFE:
                ctx.set_state(NAME, _Invalidate(self.key(ctx)))
            else:
                ctx.set_state(NAME, _Bypass(b"method"))
            return None
        seen = 0          # one pass over the headers: which of the fields the cache cares about are there
        for name, _ in ctx.headers:
            if len(name) != 0 and _WATCHED_FIRST[name[0]]:      # len: no generic truth test
                bit = _WATCHED.get(name)
                if bit is not None:
                    seen |= bit
        if seen & _RANGE:
            ctx.set_state(NAME, _Bypass(b"partial"))
            return None
        if (seen & _AUTHORIZATION or ctx.identity is not None) and not self.credentials:
            ctx.set_state(NAME, _Bypass(b"request"))
            return None
        return self._lookup(ctx, True, seen)

    def _lookup(self, ctx: RequestContext, may_wait: bool, seen: int) -> LocalResponse | Deferred[Any] | None:
        key = self.key(ctx)
        req = directives(ctx.headers) if seen & _CACHE_CONTROL else _NO_DIRECTIVES
        now = self.now()
        variants = self.store.find(key)
        entry = self._select(variants, ctx.headers)
        d = req.d            # mostly empty: tested before each `in` (a call even on an empty dict)
        no_cache = (b"no-cache" in d) if d else (
            seen & _PRAGMA != 0 and b"no-cache" in field_values(ctx.headers, b"pragma"))
        fwd = b"uri-miss"
        if entry is not None:
            age = entry.age(now)
            if not no_cache:
                stale = self._usable(entry, req, age)
                if stale is not None:
                    return self._hit(ctx, entry, age, b"STALE" if stale else b"HIT", seen & _CONDITIONAL != 0)
                swr = entry.directives.delta(b"stale-while-revalidate")
                if (swr is not None and age - entry.lifetime <= swr and b"must-revalidate" not in entry.directives
                        and req.delta(b"max-age") is None and b"min-fresh" not in req):
                    self._refresh(ctx, key, entry)
                    return self._hit(ctx, entry, age, b"STALE", seen & _CONDITIONAL != 0)
            fwd = b"request" if no_cache else b"stale"
        elif variants is not None:
            fwd = b"vary-miss"
        if d and b"only-if-cached" in d:
            ctx.log_note(NAME, "MISS")
            return error_response(ctx, 504, "NOT_CACHED", "only-if-cached: no stored response can answer this request",
                                  _NOT_CACHED)
        inflight = self.inflight
        waiters = inflight.get(key)
        if waiters is not None and may_wait and entry is None and not no_cache:
            if waiters is _NO_WAITERS:
                waiters = inflight[key] = []
            return self._wait(ctx, waiters, seen)
        state = _Forward(self, key, entry, now, req, fwd, ctx.headers)
        if waiters is None:
            inflight[key] = _NO_WAITERS
            state.leader = True
        if entry is not None:
            self._ask_validation(ctx, state, entry)
        if ctx.method == b"HEAD" and entry is None:
            # As nginx does: a HEAD miss goes upstream as a GET, whose answer is stored for the
            # HEADs and GETs that follow; the client gets the head (the transports send no body
            # to a HEAD). With a stored entry it stays a HEAD: a 304 to it refreshes the entry.
            ctx.method = b"GET"
            state.as_head = True
        ctx.set_state(NAME, state)
        return None

    def _select(self, variants: Entry | list[Entry] | None, headers: list[tuple[bytes, bytes]]) -> Entry | None:
        if variants is None:
            return None
        if isinstance(variants, Entry):     # a key's one response, mostly without Vary
            return variants if len(variants.vary) == 0 or _vary_matches(variants, headers) else None
        for entry in reversed(variants):
            if _vary_matches(entry, headers):
                return entry
        return None

    def _usable(self, entry: Entry, req: Directives, age: float) -> bool | None:
        """None: must go upstream; False: fresh enough for this request; True: stale but the
        request accepts it (max-stale)."""
        stored = entry.directives
        if len(req.d) == 0:     # no request directives (most requests): the entry's alone decide
            return None if b"no-cache" in stored.d or entry.lifetime <= age else False
        if b"no-cache" in stored:
            return None
        if b"max-age" in req:
            limit = req.delta(b"max-age")
            if limit is None or age > limit:
                return None
        lifetime = entry.lifetime
        if b"min-fresh" in req:
            min_fresh = req.delta(b"min-fresh")
            if min_fresh is None or lifetime - age < min_fresh:
                return None
        if lifetime > age:
            return False
        if b"max-stale" not in req or b"must-revalidate" in stored or b"proxy-revalidate" in stored \
                or b"s-maxage" in stored:
            return None
        limit = req.delta(b"max-stale")
        if req.d[b"max-stale"] is not None and (limit is None or age - lifetime > limit):
            return None
        return True

    def _hit(self, ctx: RequestContext, entry: Entry, age: float, verdict: bytes, conditional: bool) -> LocalResponse:
        # No state: the response hooks have nothing to do for a hit (they find none).
        if verdict == b"HIT":
            ctx.log_note(NAME, "HIT")       # a constant: no str decoded for each hit
            self.counts.hits += 1
            x_cache = _X_HIT
        else:
            ctx.log_note(NAME, "STALE")
            self.counts.stale += 1
            x_cache = _X_STALE
        # Age and Cache-Status as the last hit made them when they are the same (hits in one
        # second of one response mostly are): formatting them cost ~1k a hit.
        same = True
        seconds = int(age)
        if seconds != self.hit_age:
            self.hit_age = seconds
            self.hit_age_field = (b"age", b"%d" % seconds)
            same = False
        ttl = int(entry.lifetime - age)
        if ttl != self.hit_ttl:
            self.hit_ttl = ttl
            self.hit_status_field = (b"cache-status", b"txgateway; hit; ttl=%d" % ttl)
            same = False
        stale = verdict != b"HIT"
        last = self.hit_last
        if same and last is not None and entry.hit_head is last and stale == self.hit_stale:
            prepared: PreparedFields | None = self.hit_prepared      # as the last hit's: nothing to make
        else:
            prepared = self._prepare(ctx, entry, x_cache)
            if prepared is not None:
                self.hit_last, self.hit_stale, self.hit_prepared = entry.hit_head, stale, prepared
            else:
                self.hit_last = None
        if prepared is not None:
            headers: list[tuple[bytes, bytes]] = []
        else:
            headers = [*entry.headers, self.hit_age_field, self.hit_status_field, x_cache]
        if conditional and self._not_modified(ctx.headers, entry):
            return LocalResponse(304, headers, b"", prepared)
        return LocalResponse(entry.status, headers, entry.body, prepared)

    def _prepare(self, ctx: RequestContext, entry: Entry, x_cache: tuple[bytes, bytes]) -> PreparedFields | None:
        """A hit's fields in one piece (the entry's, Age, Cache-Status, X-Cache), or None when a
        head hook of the route could edit them: they then go in the head's headers."""
        if not self.hit_chain_seen:
            self.hit_chain_seen = True
            self.hit_rules = _rules_only(ctx.chain, self)
        rules = self.hit_rules
        if rules is None:
            return None
        head: _HitHead | None = entry.hit_head
        if head is None:
            head = entry.hit_head = _HitHead(b"".join([b"%s: %s\r\n" % field for field in entry.headers]))
        if head.cache is not self:
            head.cache = self
            fields = (*entry.headers, *_HIT_PROBE)
            # HSTS: the rules add theirs on TLS listeners unless the response has one.
            head.ok = (all(rules_leave(r, fields) for r in rules)
                       and not any(name == b"strict-transport-security" for name, _ in entry.headers))
        if not head.ok:
            return None
        age_field, status_field = self.hit_age_field, self.hit_status_field
        return PreparedFields((*entry.headers, age_field, status_field, x_cache),
                              b"%s%s: %s\r\n%s: %s\r\n%s: %s\r\n" % (head.wire, *age_field, *status_field, *x_cache))

    def _not_modified(self, headers: list[tuple[bytes, bytes]], entry: Entry) -> bool:
        """The client's own conditional, answered from the entry (RFC 9110 §13.2.2)."""
        if entry.status != 200:
            return False
        fields = dict(headers)
        inm = fields.get(b"if-none-match")
        if inm is not None:
            return _etag_matches(inm, entry.etag)
        ims = parse_http_date(fields.get(b"if-modified-since"))
        if ims is None:
            return False
        modified = parse_http_date(entry.last_modified)
        return (modified if modified is not None else entry.date) <= ims

    def _ask_validation(self, ctx: RequestContext, state: _Forward, entry: Entry) -> None:
        """Replace the client's conditionals by the entry's validators (§4.3.1); the client's
        are answered from the refreshed entry."""
        if entry.etag is None and entry.last_modified is None:
            return
        state.conditional = [(k, v) for k, v in ctx.headers if k in _CONDITIONALS]
        headers = [(k, v) for k, v in ctx.headers if k not in _CONDITIONALS]
        if entry.etag is not None:
            headers.append((b"if-none-match", entry.etag))
        if entry.last_modified is not None:
            headers.append((b"if-modified-since", entry.last_modified))
        ctx.headers = headers

    # -- collapsed forwarding ------------------------------------------------------------

    def _wait(self, ctx: RequestContext, waiters: list[Deferred[Any]], seen: int) -> Deferred[Any]:
        def cancel(d: Deferred[Any]) -> None:
            if d in waiters:
                waiters.remove(d)
            if timer.active():
                timer.cancel()

        d: Deferred[Any] = Deferred(cancel)
        waiters.append(d)

        def expire() -> None:
            if d in waiters:
                waiters.remove(d)
                d.callback(None)

        timer = self.clock.callLater(self.settings.lock_timeout, expire)

        def resume(_: Any) -> LocalResponse | Deferred[Any] | None:
            if timer.active():
                timer.cancel()
            found = self._lookup(ctx, False, seen)
            state = ctx.get_state(NAME)
            if isinstance(found, LocalResponse):    # a hit (an only-if-cached 504 does not wait)
                ctx.log_note(NAME, "HIT")
            elif isinstance(state, _Forward):
                state.fwd = b"uri-miss; collapsed"
            return found

        d.addCallback(resume)
        return d

    def _release(self, state: _Forward) -> None:
        if state.leader:
            state.leader = False
            inflight = self.inflight
            waiters = inflight.get(state.key)     # get and del: dict.pop is a method call
            if waiters is not None:
                del inflight[state.key]
                for d in waiters:
                    d.callback(None)

    # -- response ------------------------------------------------------------------------

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        state = ctx.get_state(NAME)
        if state is None:           # a hit, or a request the cache did not look at
            return
        if isinstance(state, _Invalidate):
            if 200 <= head.status < 400:
                self._invalidate(ctx, state.key, head)
            head.headers += [(b"cache-status", b"txgateway; fwd=method"), (b"x-cache", b"BYPASS")]
            return
        if isinstance(state, _Bypass):
            ctx.log_note(NAME, "BYPASS")
            head.headers += [(b"cache-status", b"txgateway; fwd=" + state.why), (b"x-cache", b"BYPASS")]
            return
        forward: _Forward = state      # typed: native attribute reads, not getattr on Any
        if forward.as_head:
            ctx.method = b"HEAD"
        self._forwarded(ctx, forward, head)

    def _forwarded(self, ctx: RequestContext, state: _Forward, head: ResponseHead) -> None:
        status = head.status
        entry = state.entry
        if entry is not None:
            now = self.now()
            if status == 304 and state.conditional is not None:
                self._revalidated(ctx, state, head, entry, now)
                return
            if status >= 500 and self._stale_allowed(state, entry, now):
                self._serve_stale(ctx, state, head, entry, now)
                return
        stored = self._start_recording(ctx, state, head)
        if not stored:
            self._release(state)
            if state.background:
                self._give_up(ctx)
        self.counts.misses += 1
        ctx.log_note(NAME, "MISS")
        fwd = state.fwd
        if status == self.miss_status and stored == self.miss_stored and fwd is self.miss_fwd:
            fields = self.miss_fields       # as the last miss's: no dict to look in
        else:
            fields = _miss_fields(stored, fwd, status)
            self.miss_stored, self.miss_fwd, self.miss_status, self.miss_fields = stored, fwd, status, fields
        if self.prepared:
            head.prepared = fields
        else:
            head.headers += fields.pairs

    def _revalidated(self, ctx: RequestContext, state: _Forward, head: ResponseHead, entry: Entry,
                     now: float) -> None:
        """A 304 for the entry's validators: its headers update the entry (§4.3.4), which answers."""
        updates = {k for k, _ in head.headers if k not in _NOT_UPDATED}
        headers = [(k, v) for k, v in entry.headers if k not in updates]
        headers += [(k, v) for k, v in head.headers if k in updates]
        cookies = [(k, v) for k, v in head.headers if k in _COOKIES]   # this client's, stored or not
        fresh = self._entry(entry.status, headers, entry.body, state, now, dict(head.headers).get(b"age"))
        if fresh is None:
            self._release(state)
            self.store.remove(state.key)
            return
        self.store.put(state.key, fresh)
        self._release(state)
        self.counts.revalidated += 1
        ctx.log_note(NAME, "REVALIDATED")
        head.headers = [*fresh.headers, *(c for c in cookies if c not in fresh.headers),
                        (b"age", b"%d" % int(fresh.age(now))),
                        (b"cache-status", b"txgateway; fwd=%s; fwd-status=304" % state.fwd),
                        (b"x-cache", b"REVALIDATED")]
        if state.conditional and self._not_modified(state.conditional, fresh):
            return                                  # the client's own conditional: still a 304
        head.status = fresh.status
        head.reason = REASONS.get(fresh.status, b"Unknown")
        head.length = len(fresh.body)
        state.replace = fresh.body

    def _stale_allowed(self, state: _Forward, entry: Entry, now: float) -> bool:
        stored = entry.directives
        if b"must-revalidate" in stored or b"proxy-revalidate" in stored or b"no-cache" in stored:
            return False
        staleness = entry.age(now) - entry.lifetime
        window = max(self.policy.serve_stale, stored.delta(b"stale-if-error") or 0,
                     state.req.delta(b"stale-if-error") or 0)
        return staleness <= window

    def _serve_stale(self, ctx: RequestContext, state: _Forward, head: ResponseHead, entry: Entry,
                     now: float) -> None:
        notes = ctx.notes or {}
        if notes.get("breaker") == "open":
            why = b"breaker-open"
        elif notes.get("upstream_error") == "no healthy target":
            why = b"no-target"
        elif head.status == 504:
            why = b"upstream-timeout"
        else:
            why = b"upstream-error"
        self._release(state)
        self.counts.stale += 1
        ctx.log_note(NAME, "STALE")
        ctx.error_code = None
        head.headers = [*entry.headers, (b"age", b"%d" % int(entry.age(now))),
                        (b"cache-status", b"txgateway; hit; fwd=stale; fwd-status=%d; detail=%s" % (head.status, why)),
                        (b"x-cache", b"STALE")]
        head.status = entry.status
        head.reason = REASONS.get(entry.status, b"Unknown")
        head.length = len(entry.body)
        state.replace = entry.body

    def _start_recording(self, ctx: RequestContext, state: _Forward, head: ResponseHead) -> bool:
        """Whether this response may be stored (RFC 9111 §3); if so its body is recorded."""
        status = head.status
        req = state.req.d
        if status < 200 or status in (206, 304) or (req and b"no-store" in req) \
                or (ctx.method == b"HEAD" and not state.as_head):
            return False
        if head.length is not None and head.length > self.max_object_size:
            return False
        controls: list[bytes] | None = None    # one pass over the headers for the fields that decide
        varies: list[bytes] | None = None      # (lists made only for fields that are there)
        expires = False
        for name, value in head.headers:
            # By the first byte first: most fields (server, date, content-type) are compared
            # once at most, not with each name.
            first = name[0] if len(name) != 0 else 0
            if first == 99 and name == b"cache-control":        # 99: "c"
                if controls is None:
                    controls = [value]
                else:
                    controls.append(value)
            elif first == 118 and name == b"vary":              # 118: "v"
                if varies is None:
                    varies = [value]
                else:
                    varies.append(value)
            elif first == 101 and name == b"expires":           # 101: "e"
                expires = True
        resp = parse_directives(controls) if controls is not None else _NO_DIRECTIVES
        d = resp.d          # its dict, read directly: each `in resp` is a call through the class's slot
        if d:
            if b"no-store" in d or b"private" in d:
                return False
            if b"must-understand" in d and status not in REASONS:
                return False
            public = b"public" in d
            explicit = b"max-age" in d or b"s-maxage" in d or expires
            shared = public or b"s-maxage" in d or b"must-revalidate" in d
        else:
            public = shared = False
            explicit = expires
        # Without `credentials`, a request with Authorization was bypassed (on_request): no need to look.
        if not self.by_identity and not shared \
                and (ctx.identity is not None or (self.credentials and ctx.header(b"authorization") is not None)):
            return False
        if not (explicit or public or status in DEFAULT_CACHEABLE):
            return False
        vary = [v.lower() for v in members(varies)] if varies is not None else _NO_VARY
        if b"*" in vary or len(vary) > MAX_VARY:
            return False
        fill = self._entry(status, head.headers[:], b"", state, self.now(), None, resp, vary, expires)
        if fill is None:
            return False
        state.fill, state.length = fill, head.length
        return True

    def on_response_body(self, ctx: RequestContext, chunk: bytes, end: bool) -> bytes:
        found = ctx.get_state(NAME)
        if not isinstance(found, _Forward):     # a type check; `.__class__` is an attribute lookup
            return chunk
        state: _Forward = found        # typed: native attribute reads, not getattr on Any
        if state.replace is not None:
            return state.replace if end else b""
        fill = state.fill
        if fill is None:
            return chunk
        if len(chunk) != 0:
            size = state.size + len(chunk)
            if size > self.max_object_size:
                state.fill = state.record = None
                self._release(state)
                if state.background:
                    self._give_up(ctx)
                return chunk
            state.size = size
            # All the length its head announced is here (mostly in the head's own read): stored
            # now, without a list of chunks to join. Otherwise the chunk is kept until the end.
            if not end and size != state.length:
                record = state.record
                if record is None:
                    state.record = [chunk]
                else:
                    record.append(chunk)
                return chunk
        elif not end:
            return chunk
        record = state.record
        state.fill = state.record = None
        if record is not None:
            record.append(chunk)
            self._store(state, fill, b"".join(record))
        else:
            self._store(state, fill, chunk)
        return chunk

    def _store(self, state: _Forward, fill: Entry, body: bytes) -> None:
        if state.length is None or state.length == len(body):
            fill.filled(body)
            self.store.put(state.key, fill, self.counts)
        self._release(state)

    def _entry(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, state: _Forward,
               now: float, age_header: bytes | None, resp: Directives | None = None,
               vary_values: list[bytes] | None = None, has_expires: bool = True) -> Entry | None:
        """An entry with its freshness lifetime and corrected initial age (§4.2.1, §4.2.3).
        `resp`, `vary_values` and `has_expires`: what the head hook's pass found, when it ran."""
        not_stored = self.not_stored
        age_field = age_header
        ages = 0 if age_header is None else 1
        date_field: bytes | None = None
        dropped = False
        drop_cookies = self.drop_cookies
        # One pass: what is not stored, Age, Date (the last one). Names compared, not hashed for
        # `in not_stored` (each is a new bytes object: ~130 a field).
        for k, v in headers:
            first = k[0] if len(k) != 0 else 0       # as in _start_recording: by the first byte first
            if first == 97 and k == b"age":                     # 97: "a"
                dropped = True
                if age_header is None:
                    age_field = v
                    ages += 1
            elif first == 100 and k == b"date":                 # 100: "d"
                date_field = v
            elif first == 115 and drop_cookies and (k == b"set-cookie" or k == b"set-cookie2"):   # 115: "s"
                dropped = True
        # An Age that is not one valid delta-seconds makes the response stale (taken as very old).
        age_value = 0 if not ages else parse_delta(age_field) if ages == 1 else None
        if age_value is None:
            age_value = MAX_DELTA
        kept = [(k, v) for k, v in headers if k not in not_stored] if dropped else headers
        if resp is None:
            resp = directives(kept)
        if vary_values is None:
            vary_values = [v.lower() for v in field_values(kept, b"vary")]
        date = parse_http_date(date_field)
        date_value = date if date is not None else now
        apparent_age = now - date_value           # comparisons, not max(): a call each
        if apparent_age < 0.0:
            apparent_age = 0.0
        corrected_age = age_value + (now - state.request_time)
        if corrected_age < apparent_age:
            corrected_age = apparent_age
        lifetime = self._lifetime(status, kept, resp, date_value, has_expires)
        vary: tuple[tuple[bytes, bytes | None], ...] = ()
        if vary_values:
            if b"*" in vary_values:
                return None
            vary = tuple((name, _request_value(state.vary_source, name)) for name in sorted(set(vary_values)))
        entry = Entry(status, kept, body, now, corrected_age, lifetime, vary, resp, date_value, state.key,
                      self.last_fields)
        self.last_fields = kept
        return entry

    def _lifetime(self, status: int, headers: list[tuple[bytes, bytes]], resp: Directives, date: float,
                  has_expires: bool) -> float:
        """`has_expires` False: the head hook's pass found no Expires (no need to look)."""
        d = resp.d
        if d:
            for name in (b"s-maxage", b"max-age"):
                if name in d:
                    value = resp.delta(name)
                    return float(value) if value is not None else 0.0
        expires = [v for k, v in headers if k == b"expires"] if has_expires else None
        if expires:
            when = parse_http_date(expires[0])
            return max(0.0, when - date) if when is not None and len(expires) == 1 else 0.0
        if status not in DEFAULT_CACHEABLE and b"public" not in d:
            return 0.0
        if self.ttl:
            return self.ttl
        modified = parse_http_date(dict(headers).get(b"last-modified"))
        if modified is not None and modified < date:
            return (date - modified) / 10.0     # RFC 9111 §4.2.2's suggested heuristic
        return 0.0

    # -- invalidation (§4.4) --------------------------------------------------------------

    def _invalidate(self, ctx: RequestContext, key: bytes, head: ResponseHead) -> None:
        self.store.remove(key)
        parts = key_parts(key)
        host = parts[1]
        for name in (b"location", b"content-location"):
            for k, v in head.headers:
                if k != name:
                    continue
                target = v
                for scheme in (b"http://", b"https://"):
                    if target.startswith(scheme):
                        rest = target[len(scheme):]
                        authority, slash, path = rest.partition(b"/")
                        if authority.lower() != host:
                            target = b""
                        else:
                            target = slash + path
                if target.startswith(b"/"):
                    path, mark, query = target.partition(b"?")
                    self.store.remove(b"\x00".join([parts[0], host, path, mark + query, *parts[4:]]))

    # -- end -----------------------------------------------------------------------------

    def on_finished(self, ctx: RequestContext) -> None:
        """A leader that ended without storing (upstream cut, client gone before its fill could
        be kept) lets its waiters go."""
        state = ctx.get_state(NAME)
        if isinstance(state, _Forward) and state.leader:
            self._release(state)

    # -- the client left: the fill goes on -------------------------------------------------

    def keep(self, ctx: RequestContext, state: _Forward) -> bool:
        """Pipeline.cancel, its client gone: a response being stored, or one that others wait
        for, is read on to its end by a request of the cache's own (bounded like any fill: by
        `max_object_size` and the upstream's timeouts). False: the pipeline drops it."""
        if state.background or ctx.get_state(NAME) is not state:
            return False
        if state.fill is None and (ctx.response_started or not state.leader):
            return False            # nothing to store, nobody waiting
        hand_over = getattr(ctx.forwarding, "hand_over", None)
        if hand_over is None:
            return False
        fill = self._own_request(ctx, ctx.method, ctx.headers, "-fill")
        fill.response_started, fill.status = ctx.response_started, ctx.status
        state.background = True
        fill.set_state(NAME, state)
        ctx.set_state(NAME, None)   # its finish hooks must not release the waiters: the fill will
        if state.as_head:
            ctx.method = b"HEAD"
        hand_over(fill)
        return True

    def _give_up(self, ctx: RequestContext) -> None:
        """A request without a client whose answer will not be stored: stop reading it."""
        chain = ctx.chain
        if chain is not None and chain.terminal is not None:
            chain.terminal.cancel(ctx)

    def _own_request(self, ctx: RequestContext, method: bytes, headers: list[tuple[bytes, bytes]],
                     suffix: str) -> RequestContext:
        """A request of the cache's own on `ctx`'s route and upstream, with no client (`_Refresh`)."""
        own = RequestContext(method, ctx.target, ctx.path, ctx.query, b"1.1", headers, ctx.host, ctx.scheme,
                             ctx.peer_ip, _Refresh(self), self.now())
        own.correlation_id = ctx.correlation_id + suffix
        own.client_ip, own.route, own.chain = ctx.client_ip, ctx.route, ctx.chain
        own.upstream, own.upstream_path, own.identity = ctx.upstream, ctx.upstream_path, ctx.identity
        return own

    # -- background refresh (stale-while-revalidate) ---------------------------------------

    def _refresh(self, ctx: RequestContext, key: bytes, entry: Entry) -> None:
        """One request upstream, through the route's terminal, whose answer refreshes `entry`."""
        if key in self.inflight:
            return
        chain = ctx.chain
        terminal = chain.terminal if chain is not None else None
        pipeline = getattr(terminal, "pipeline", None)
        if terminal is None or pipeline is None:
            return
        bg = self._own_request(ctx, b"GET", list(ctx.headers), "-refresh")
        state = _Forward(self, key, entry, bg.start, directives(bg.headers), b"stale", bg.headers)
        state.leader = True
        state.background = True
        self.inflight[key] = _NO_WAITERS
        self._ask_validation(bg, state, entry)
        state.conditional = []
        bg.set_state(NAME, state)
        terminal.forward(bg)


class _Refresh(Nowhere):
    """The client side of the cache's own requests (a background refresh, a fill whose client
    left): the answer only updates the store."""

    def __init__(self, cache: CacheFilter) -> None:
        self.cache = cache

    def ended(self, ctx: RequestContext) -> None:
        ctx.done = True
        state = ctx.get_state(NAME)
        if isinstance(state, _Forward):
            self.cache._release(state)


def build_filter(resources: Any, policy: RouteCache, route: Any) -> CacheFilter:
    settings = resources.config.sections.get(NAME) or CacheSettings()
    durable = resources.parts.get("durable")
    holder: dict[str, Any] = durable if durable is not None else resources.shared("durable", dict)
    store = holder.get(NAME)
    if store is None:
        store = holder[NAME] = Store(settings.max_memory)
    store.max_memory = settings.max_memory
    store.adopt(route.prefix, policy)
    header_rules = route.policies.get("header_rules")
    prepared = header_rules is None or rules_leave(HeaderRulesFilter(header_rules), _MISS_PROBE)
    return CacheFilter(store, settings, policy, route.prefix, resources.clock, prepared)


def _rules_only(chain: Any, cache: CacheFilter) -> list[HeaderRulesFilter] | None:
    """The header rules of `chain`, when they are its only head hooks besides the cache's own
    and the correlation id's echo (which adds a field of its own and edits none); None when any
    other filter has a head hook (it may read or edit the fields it finds)."""
    if chain is None:
        return None
    rules = []
    for f in chain.response_filters:
        if getattr(f, "on_response_head", None) is None or f is cache or isinstance(f, ForwardingHeaders):
            continue
        if not isinstance(f, HeaderRulesFilter):
            return None
        rules.append(f)
    return rules


def rules_leave(rules: HeaderRulesFilter, fields: tuple[tuple[bytes, bytes], ...]) -> bool:
    """Whether a route's response header rules leave `fields` as they are: they neither remove
    nor set them, nor add fields of those names (the security headers included)."""
    names = {name for name, _ in fields}
    return ([h for h in rules.response_fields(fields) if h[0] in names] == list(fields)
            and not any(h[0] in names for h in rules.response_fields(())))
