"""The response cache's pieces in memory: RFC 9111 arithmetic, the store's bounds, the config."""

from __future__ import annotations

import pytest

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config
from txgateway.filters.cache.config import CacheSettings, RouteCache
from txgateway.filters.cache.rules import MAX_DELTA, directives, field_values, parse_delta, parse_http_date
from txgateway.filters.cache.store import _PER_FIELD, _PER_SHARED_FIELD, Entry, Store, cache_key, key_parts


@pytest.mark.parametrize(("text", "value"), [
    (b"60", 60), (b'"60"', 60), (b"0", 0), (b"18446744073709551616", MAX_DELTA),
    (b"-1", None), (b"soon", None), (b"1.5", None), (b"", None), (None, None),
])
def test_delta_seconds_are_clamped_or_invalid(text, value):
    assert parse_delta(text) == value


def test_directives_are_case_insensitive_and_a_repeated_lifetime_is_invalid():
    d = directives([(b"cache-control", b"Max-Age=10, public"), (b"cache-control", b"max-age=20, no-cache")])
    assert b"public" in d and b"no-cache" in d and d.delta(b"max-age") is None
    assert directives([(b"cache-control", b'max-age="30"')]).delta(b"max-age") == 30
    assert field_values([(b"vary", b"A, b"), (b"vary", b" ,c")], b"vary") == [b"A", b"b", b"c"]


def test_http_dates_in_the_three_formats_and_garbage():
    assert parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
    assert parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0
    assert parse_http_date(b"Sun Nov  6 08:49:37 1994") == 784111777.0
    assert parse_http_date(b"yesterday") is None and parse_http_date(b"0") is None


def entry(size: int, vary: tuple = (), key: bytes = cache_key(b"/", b"h", b"/", b"")) -> Entry:
    return Entry(200, [(b"content-type", b"text/plain")], b"x" * size, 0.0, 0.0, 60.0, vary, directives([]), 0.0,
                 key)


def test_an_entry_counts_the_objects_it_holds_and_its_key_not_only_its_body():
    plain = entry(0)
    assert plain.size > 300                         # the objects around an empty body and one field
    assert entry(0, key=cache_key(b"/", b"h", b"/", b"?q=" + b"x" * 1000)).size >= plain.size + 1000
    assert entry(0, key=cache_key(b"/", b"h", b"/", b"", "alice", (b"en", None))).size > plain.size + 5 + 2
    fields = Entry(200, [(b"content-type", b"text/plain")] * 11, b"", 0.0, 0.0, 60.0, (), directives([]), 0.0,
                   cache_key(b"/", b"h", b"/", b""))
    assert fields.size - plain.size > 10 * (12 + 10 + 64)    # a field's tuple and objects, not only its bytes
    controlled = [(b"cache-control", b"max-age=60, public")]
    parsed = Entry(200, controlled, b"", 0.0, 0.0, 60.0, (), directives(controlled), 0.0, cache_key(b"/", b"h", b"/", b""))
    unparsed = Entry(200, controlled, b"", 0.0, 0.0, 60.0, (), directives([]), 0.0, cache_key(b"/", b"h", b"/", b""))
    assert parsed.size > unparsed.size + 2 * 64              # the parsed directives: their own objects


def test_an_entry_shares_the_fields_it_repeats_from_the_one_before_and_counts_them_as_slots():
    # A route's misses mostly repeat their fields (Server, Content-Type, Date within a second):
    # one copy of their objects serves all, counted by the entry that made it.
    key = cache_key(b"/", b"h", b"/", b"")
    first = Entry(200, [(b"server", b"s"), (b"date", b"d1"), (b"etag", b'"a"')], b"", 0.0, 0.0, 60.0, (),
                  directives([]), 0.0, key)
    fields = [(b"server", b"s"), (b"date", b"d2"), (b"etag", b'"a"'), (b"content-type", b"text/plain")]
    second = Entry(200, list(fields), b"", 0.0, 0.0, 60.0, (), directives([]), 0.0, key, first.headers)
    alone = Entry(200, list(fields), b"", 0.0, 0.0, 60.0, (), directives([]), 0.0, key)
    assert second.headers == fields and second.etag == b'"a"'
    assert [second.headers[i] is first.headers[i] for i in range(3)] == [True, False, True]
    assert second.size == alone.size - (len(b"server") + len(b"s") + len(b"etag") + len(b'"a"')
                                        + 2 * (_PER_FIELD - _PER_SHARED_FIELD))


def test_the_store_evicts_least_recently_used_to_stay_under_max_memory():
    store = Store(max_memory=3 * entry(1000).size)
    for i in range(3):
        store.put(cache_key(b"/", b"h", b"/%d" % i, b""), entry(1000))
    store.variants(cache_key(b"/", b"h", b"/0", b""))           # used: the oldest is now /1
    store.put(cache_key(b"/", b"h", b"/3", b""), entry(1000))
    assert [key_parts(k)[2] for k in store.keys()] == [b"/2", b"/0", b"/3"]
    assert store.bytes <= store.max_memory and store.evictions == 1
    assert store.counts("/").entries == 3 and store.counts("/").bytes == store.bytes


def test_a_hit_on_the_newest_response_keeps_the_least_recently_used_order():
    # The store skips moving a response that already holds its last slot: the order must be LRU's.
    store = Store(max_memory=3 * entry(1000).size)
    for i in range(3):
        store.put(cache_key(b"/", b"h", b"/%d" % i, b""), entry(1000))
    store.find(cache_key(b"/", b"h", b"/2", b""))           # the newest already: stays last
    store.find(cache_key(b"/", b"h", b"/0", b""))           # moved last
    store.find(cache_key(b"/", b"h", b"/0", b""))
    assert [key_parts(k)[2] for k in store.keys()] == [b"/1", b"/2", b"/0"]
    store.remove(cache_key(b"/", b"h", b"/0", b""))         # the newest gone: the next find moves again
    store.find(cache_key(b"/", b"h", b"/1", b""))
    store.put(cache_key(b"/", b"h", b"/3", b""), entry(1000))
    store.put(cache_key(b"/", b"h", b"/4", b""), entry(1000))
    assert [key_parts(k)[2] for k in store.keys()] == [b"/1", b"/3", b"/4"] and store.evictions == 1


def test_keys_keep_identity_and_key_headers_apart():
    keys = {cache_key(b"/", b"h", b"/", b"", "a", ()), cache_key(b"/", b"h", b"/", b"", None, (b"a",)),
            cache_key(b"/", b"h", b"/", b"", None, (None,)), cache_key(b"/", b"h", b"/", b"", None, (b"",)),
            cache_key(b"/", b"h", b"/", b"", "a", (b"1:b",)), cache_key(b"/", b"h", b"/", b"", "a:1", (b"b",)),
            cache_key(b"/", b"h", b"/", b""), cache_key(b"/", b"h", b"/", b"", "a\x00", ())}
    assert len(keys) == 8
    assert key_parts(cache_key(b"/r", b"h", b"/p", b"?q", "a\x00b", (b"v",)))[:4] == [b"/r", b"h", b"/p", b"?q"]


def test_variants_replace_their_own_vary_values_and_are_bounded():
    store = Store(max_memory=2**20)
    key = cache_key(b"/", b"h", b"/v", b"")
    for i in range(12):
        store.put(key, entry(10, ((b"accept", b"%d" % (i % 10)),)))
    assert len(store.variants(key)) == 8


def test_a_key_goes_from_one_response_to_variants_and_back_with_its_bytes_counted():
    # A key's one response is kept alone (one object fewer for the garbage collector), its
    # variants in a list.
    store = Store(max_memory=2**20)
    key = cache_key(b"/", b"h", b"/v", b"")
    a, b, a2 = entry(10, ((b"accept", b"a"),)), entry(20, ((b"accept", b"b"),)), entry(30, ((b"accept", b"a"),))
    store.put(key, a)
    assert store.variants(key) == [a] and store.find(key) is a     # one response: kept alone
    store.put(key, b)
    assert store.variants(key) == [a, b]
    store.put(key, a2)                                            # same Vary values as a: replaces it
    assert store.variants(key) == [b, a2]
    assert store.counts("/").entries == 2 and store.bytes == store.counts("/").bytes == b.size + a2.size
    store.put(key, entry(1, ((b"accept", b"a"),)))
    store.put(key, entry(1, ((b"accept", b"b"),)))
    assert len(store.variants(key)) == 2
    assert store.remove(key) == 2 and store.bytes == 0 and store.counts("/").entries == 0
    assert store.variants(key) is None and store.remove(key) == 0
    store.put(key, a)
    store.put(key, a2)                                            # replaced: alone again
    assert store.find(key) is a2 and store.bytes == a2.size


def test_purge_by_prefix_or_exact_url_and_a_changed_route_loses_its_entries():
    store = Store(max_memory=2**20)
    for path, query in ((b"/a/1", b""), (b"/a/1", b"?x=1"), (b"/b", b"")):
        store.put(cache_key(b"/", b"h", path, query), entry(10))
    assert store.purge_path(b"/a/1?x=1", exact=True) == 1
    assert store.purge_path(b"/a") == 1
    store.adopt("/", RouteCache(ttl=1.0))
    store.adopt("/", RouteCache(ttl=1.0))
    assert store.bytes > 0
    store.adopt("/", RouteCache(ttl=2.0))
    assert store.bytes == 0 and list(store.keys()) == []


def test_route_and_section_defaults():
    config = parse_config(BASE.replace("upstream: orders}", "upstream: orders, cache: {}}"), "c.yaml")
    assert config.routes[1].policies["cache"] == RouteCache()
    assert config.sections.get("cache") is None
    with_section = parse_config(BASE + "cache: {max_memory: 1MiB, credentials: true}\n", "c.yaml")
    assert with_section.sections["cache"] == CacheSettings(max_memory=2**20, max_object_size=2**20, credentials=True)


def test_key_settings_are_checked():
    assert config_errors(BASE.replace("upstream: orders}", "upstream: orders, cache: {key: {headers: [a b]}}}")) == [
        'c.yaml:8: routes[1].cache.key.headers[0]: expected a header name like "X-Api-Version", got "a b"']
    assert config_errors(BASE + "cache: {max_memory: 0}\n") == [
        "c.yaml:9: cache.max_memory: expected a size above zero, got 0"]
