#!/usr/bin/env python3
"""What a stored response really holds in memory, against what the store counts for it
(`Entry.size`, max_memory's unit): the source of store.py's `_PER_*` constants.

Makes `--entries` responses as a miss makes them (a key built from fresh path and query objects, the
upstream parser's fresh field tuples, parsed Cache-Control, the entry's times) and puts them
in a Store, then twice as many more, each evicting the oldest (the store's table under
churn holds its deleted slots until it resizes); tracemalloc's allocations, each rounded up as pymalloc does
(16-byte blocks up to 512 bytes), give the bytes held per entry. Run for a few shapes, the
differences give the cost of a field and of a directive; each shape twice: every field its own
object, and each entry made with the one before as `like` (a route's misses share the objects
of the fields they repeat: `_PER_SHARED_FIELD`):

    .venv/bin/python bench/cache_footprint.py                  # compiled (after make compile)
    .venv/bin/python bench/cache_footprint.py --hit            # each entry also as its first hit leaves it
    TXGATEWAY_PURE=1 make install && .venv/bin/python bench/cache_footprint.py
"""

from __future__ import annotations

import argparse
import gc
import time
import tracemalloc

from txgateway.filters.cache.filter import _HitHead
from txgateway.filters.cache.rules import Directives, parse_directives
from txgateway.filters.cache.store import Entry, Store, cache_key

_NONE = Directives({})


def fresh(value: bytes) -> bytes:
    """A new bytes object, as the parser makes one per field (bytes(b) would be b itself)."""
    return bytes(bytearray(value))


def make(i: int, extra_fields: int, cache_control: bool, body: int,
         like: list[tuple[bytes, bytes]] | None, hit: bool) -> tuple[bytes, Entry]:
    fields = [(b"date", b"Sun, 06 Dec 2026 19:30:00 GMT"), (b"server", b"nginx/1.22.1"),
              (b"content-type", b"application/json")]
    fields += [(b"x-extra-%d" % n, b"value %d" % n) for n in range(extra_fields)]
    if cache_control:
        fields.append((b"cache-control", b"max-age=600, public"))
    parsed = [(fresh(k), fresh(v)) for k, v in fields]
    key = cache_key(b"/api", b"a.example", fresh(b"/api/users/1"), b"?n=%d" % i)
    resp = parse_directives([v for k, v in parsed if k == b"cache-control"]) if cache_control else _NONE
    now = time.time() + i
    entry = Entry(200, list(parsed), b"", now, float(i % 7), 3600.0, (), resp, 1.0e9, key, like)
    entry.filled(b'{"ok":%d}' % i if body else b"")
    if hit:         # what its first hit keeps (filter.py's _prepare)
        entry.hit_head = _HitHead(b"".join([b"%s: %s\r\n" % field for field in entry.headers]))
    return key, entry


def held() -> int:
    gc.collect()
    return sum((t.size + 15) & ~15 if t.size <= 512 else t.size for t in tracemalloc.take_snapshot().traces)


def measure(entries: int, extra_fields: int, cache_control: bool, body: int, share: bool,
            hit: bool) -> tuple[float, float]:
    """(bytes held, bytes counted) per entry. `share`: each entry made with the previous one's fields
    as `like`, as a route's misses are (its equal fields share their objects); else every field its own.
    `hit`: each entry also holds what its first hit keeps."""
    store = Store(max_memory=2**40)
    counts = store.counts("/api")
    tracemalloc.start()
    try:
        before = held()
        like = None
        for i in range(3 * entries):
            key, entry = make(i, extra_fields, cache_control, body, like, hit)
            like = entry.headers if share else None
            store.put(key, entry, counts)
            if i >= entries:
                store.remove(next(store.keys()))
        grown = held() - before
    finally:
        tracemalloc.stop()
    return grown / entries, store.bytes / entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20000)
    parser.add_argument("--hit", action="store_true", help="each entry also with what its first hit keeps (hit_head)")
    args = parser.parse_args()
    for share in (False, True):
        for extra, cc in ((0, False), (8, False), (0, True)):
            real, counted = measure(args.entries, extra, cc, 1, share, args.hit)
            print(f"3 + {extra} fields{', Cache-Control (2 directives)' if cc else ''}"
                  f"{', the fields shared with the entry before' if share else ''}: "
                  f"{real:.0f} bytes held per entry, {counted:.0f} counted ({counted / real:.2f})")

if __name__ == "__main__":
    main()
