"""The cache's memory: stored responses by key, least recently used evicted beyond `max_memory`.

One store serves every cached route (the bound is the gateway's), and it outlives reloads:
the gateway keeps it, so a reload drops only the entries of routes whose `cache:` changed.
A key holds up to `MAX_VARIANTS` responses that differ by their `Vary`ed request headers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from typing import Any, Final, cast

from txgateway.filters.cache.rules import Directives

__all__ = ["Entry", "RouteCounts", "Store", "cache_key", "key_parts"]

MAX_VARIANTS: Final = 8
# What a stored response costs beyond the bytes of its body, fields and key: CPython's objects
# around them. Measured, not guessed (bench/cache_footprint.py: tracemalloc over 20,000
# entries made as a miss makes them, sizes rounded up to pymalloc's 16-byte blocks; the
# daemon's RSS under a flood agrees, docs/cache.md); tests/integration/test_cache.py fails
# when the memory a flood leaves outgrows max_memory.
_PER_ENTRY: Final = 640 + 112   # the Entry, its list of fields, its body object and times, the key's
                                # object, the store's slot; + its first hit's `hit_head` (filter.py's
                                # _HitHead and its bytes object, the slot)
_PER_FIELD: Final = 152 + 4      # a field: its (name, value) tuple, two bytes objects, a list slot;
                                # + its `: ` and CRLF in `hit_head`
_PER_SHARED_FIELD: Final = 8 + 4  # a field whose objects an earlier entry holds: its list slot;
                                  # + its `: ` and CRLF in `hit_head`
_PER_DIRECTIVES: Final = 216  # a parsed Cache-Control: the Directives and its dict
_PER_DIRECTIVE: Final = 96  # a directive: its name and value objects, a dict slot
_PER_OBJECT: Final = 48     # a tuple beyond its length (Vary'ed values)
_NO_FIELDS: Final[list[tuple[bytes, bytes]]] = []


def cache_key(route: bytes, host: bytes, path: bytes, query: bytes, identity: str | None = None,
              extra: tuple[bytes | None, ...] = ()) -> bytes:
    """A stored response's key: route (its prefix), host as routed, path, the query the route
    keys on, then the identity and the `key.headers` values when there are any. One bytes
    string: it keeps its hash (a tuple is hashed again at each of a miss's six dict
    operations) and is no object for the garbage collector to track. NUL separates the parts:
    no host, path or query can hold one (the parsers refuse it); the identity and the values
    that follow carry their lengths."""
    key = b"%s\x00%s\x00%s\x00%s" % (route, host, path, query)
    if identity is None and len(extra) == 0:
        return key
    tail = [key, b"\x00"]
    if identity is not None:
        user = identity.encode()
        tail.append(b"u%d:%s" % (len(user), user))
    if len(extra) != 0:
        tail.append(b"h")
        for value in extra:
            tail.append(b"-" if value is None else b"%d:%s" % (len(value), value))
    return b"".join(tail)


def key_parts(key: bytes) -> list[bytes]:
    """route, host, path, query, and the identity and values' encoding when the key has them."""
    return key.split(b"\x00", 4)


def key_route(key: bytes) -> str:
    return key[:key.index(0)].decode()


class Entry:
    """One stored response, with what RFC 9111 §4.2.3 needs to compute its age."""

    __slots__ = ("status", "headers", "body", "counts", "response_time", "corrected_age", "lifetime",
                 "vary", "size", "directives", "etag", "last_modified", "date", "hit_head")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, response_time: float,
                 corrected_age: float, lifetime: float, vary: tuple[tuple[bytes, bytes | None], ...],
                 directives: Directives, date: float, key: bytes,
                 like: list[tuple[bytes, bytes]] | None = None) -> None:
        self.status = status
        self.headers = headers            # end-to-end, lower-case names, Age and Set-Cookie left out
        self.body = body
        self.counts: RouteCounts | None = None   # its route's, once stored: an eviction needs no key parsing
        self.response_time = response_time
        self.corrected_age = corrected_age
        self.lifetime = lifetime
        self.vary = vary                  # (name, the request's value) for each Vary'ed header
        self.directives = directives
        self.date = date
        self.etag: bytes | None = None
        self.last_modified: bytes | None = None
        # The fields as HTTP/1.1 writes them, made by the first hit (filter.py's _HitHead):
        # counted in `size` from the start, so a hit never grows the store past max_memory.
        self.hit_head: Any = None
        # What storing it costs (max_memory's unit): the objects, not only their bytes, and
        # its key's (each variant of a key counts the key: at most 8, a small overcount).
        size = len(body) + _PER_ENTRY + len(key)
        # `like`: the fields of the route's previous entry. A field equal to the one at its place
        # there (Server, Content-Type, Date within a second...) takes that one's tuple: one copy
        # of its three objects for both, counted by the entry that made it, here as a list slot.
        # Every field's text counts once more for `hit_head`, shared or not.
        last = like if like is not None else _NO_FIELDS
        shared = len(last)
        # The lists again as lists of objects: mypyc reads a tuple[bytes, bytes] item as two
        # pointers and would box it anew (a new tuple) when stored back.
        mine, theirs = cast(list[object], headers), cast(list[object], last)
        for i, field in enumerate(headers):
            name, value = field
            text = len(name) + len(value)
            if i < shared:
                old = last[i]
                if old[1] == value and old[0] == name:     # the value first: it differs more often
                    mine[i] = theirs[i]
                    size += text + _PER_SHARED_FIELD
                else:
                    size += 2 * text + _PER_FIELD
            else:
                size += 2 * text + _PER_FIELD
            first = name[0] if len(name) != 0 else 0     # by the first byte first: most are neither
            if first == 101 and name == b"etag":                 # 101: "e"
                self.etag = value
            elif first == 108 and name == b"last-modified":      # 108: "l"
                self.last_modified = value
        d = directives.d
        if len(d) != 0:      # copies of Cache-Control's parts: at most its length again
            size += _PER_DIRECTIVES + _PER_DIRECTIVE * len(d)
            for name, value in headers:
                if name == b"cache-control":
                    size += len(value)
        if len(vary) != 0:   # (name, the request's value) pairs: tuples and objects as fields
            size += _PER_OBJECT + 8 * len(vary)
            for name, wanted in vary:
                size += _PER_FIELD + len(name) + (len(wanted) if wanted is not None else 0)
        self.size = size

    def filled(self, body: bytes) -> None:
        """The body, once all of it arrived: a miss's entry is made from its head."""
        self.body = body
        self.size += len(body)

    def age(self, now: float) -> float:
        return self.corrected_age + max(0.0, now - self.response_time)


class RouteCounts:
    """What /metrics and /status show for one cached route."""

    __slots__ = ("hits", "misses", "stale", "revalidated", "bytes", "entries")

    def __init__(self) -> None:
        self.hits = self.misses = self.stale = self.revalidated = 0
        self.bytes = 0
        self.entries = 0


class Store:
    def __init__(self, max_memory: int) -> None:
        self.max_memory = max_memory
        self.bytes = 0
        self.evictions = 0
        # A key's one response, or its variants (a list) once Vary made several: one object
        # fewer per stored response for the garbage collector to count and scan (~0.3k a miss).
        self._lru: OrderedDict[bytes, Entry | list[Entry]] = OrderedDict()
        self.routes: dict[str, RouteCounts] = {}        # by route prefix
        self.policies: dict[str, Any] = {}              # the cache policy each route was built with
        self.inflight: dict[bytes, list[Any]] = {}   # keys being fetched: their waiters
        # What the store's last slot holds: a hit on it (a hot key asked again and again) needs
        # no move to the end, the OrderedDict's `move_to_end` (~1.1k a hit). Exact LRU order still.
        self._newest: Entry | list[Entry] | None = None

    def counts(self, route: str) -> RouteCounts:
        counts = self.routes.get(route)
        if counts is None:
            counts = self.routes[route] = RouteCounts()
        return counts

    def adopt(self, route: str, policy: Any) -> None:
        """A route (re)built: keep its entries if its policy is unchanged, else drop them."""
        if route in self.policies and self.policies[route] != policy:
            prefix = route.encode() + b"\x00"
            self.purge(lambda key: key.startswith(prefix))
        self.policies[route] = policy

    def find(self, key: bytes) -> Entry | list[Entry] | None:
        """The key's response or its variants, now the most recently used."""
        found = self._lru.get(key)
        if found is not None and found is not self._newest:
            self._lru.move_to_end(key)
            self._newest = found
        return found

    def variants(self, key: bytes) -> list[Entry] | None:
        found = self.find(key)
        return None if found is None else _listed(found)

    def put(self, key: bytes, entry: Entry, counts: RouteCounts | None = None) -> None:
        """`counts`: the key's route's, when the caller has them (a miss's filter does)."""
        if entry.size > self.max_memory:
            return
        lru = self._lru
        found = lru.get(key)
        if counts is None:
            counts = self.counts(key_route(key))
        entry.counts = counts
        if found is None:
            lru[key] = self._newest = entry   # a new key (a miss's usual case): nothing to replace
        else:
            lru.move_to_end(key)
            variants = _listed(found)
            for old in [e for e in variants if e.vary == entry.vary]:
                variants.remove(old)
                self._forget(old)
            if len(variants) >= MAX_VARIANTS:
                self._forget(variants.pop(0))
            variants.append(entry)
            lru[key] = self._newest = variants[0] if len(variants) == 1 else variants
        self.bytes += entry.size
        counts.bytes += entry.size
        counts.entries += 1
        while self.bytes > self.max_memory and len(lru) != 0:
            # The oldest slot, taken in one call (no items view and iterator, no second lookup).
            oldest = lru.popitem(False)[1]
            if oldest is self._newest:
                self._newest = None
            if isinstance(oldest, Entry):
                self.evictions += 1
                self._forget(oldest)
            else:
                self.evictions += len(oldest)
                for old in oldest:
                    self._forget(old)

    def _forget(self, entry: Entry) -> None:
        """Its bytes, no longer the store's or its route's."""
        self.bytes -= entry.size
        counts = entry.counts
        if counts is not None:
            counts.bytes -= entry.size
            counts.entries -= 1

    def remove(self, key: bytes) -> int:
        found = self._lru.pop(key, None)
        if found is None:
            return 0
        if found is self._newest:
            self._newest = None
        if isinstance(found, Entry):
            self._forget(found)
            return 1
        for entry in found:
            self._forget(entry)
        return len(found)

    def purge(self, match: Any) -> int:
        """Remove every key `match(key)` accepts; the number of responses removed."""
        return sum(self.remove(key) for key in [k for k in self._lru if match(k)])

    def purge_path(self, path: bytes, exact: bool = False) -> int:
        """The admin's and the Manhole's purge: the responses stored for `path` (with its query
        when `exact`, else every path that starts with it), on every route and host."""
        if exact:
            bare, mark, query = path.partition(b"?")
            return self.purge(lambda key: key_parts(key)[2:4] == [bare, mark + query])
        return self.purge(lambda key: b"".join(key_parts(key)[2:4]).startswith(path))

    def snapshot(self) -> dict[str, Any]:
        """What /status shows: size and hit ratio per route."""
        routes = {}
        for route, c in sorted(self.routes.items()):
            served = c.hits + c.stale + c.revalidated
            asked = served + c.misses
            routes[route] = {"entries": c.entries, "bytes": c.bytes, "hits": c.hits, "misses": c.misses,
                             "stale": c.stale, "revalidated": c.revalidated,
                             "hit_ratio": round(served / asked, 4) if asked else None}
        return {"bytes": self.bytes, "max_memory": self.max_memory, "evictions": self.evictions, "routes": routes}

    def keys(self) -> Iterator[bytes]:
        return iter(self._lru)


def _listed(found: Entry | list[Entry]) -> list[Entry]:
    return found if isinstance(found, list) else [found]
