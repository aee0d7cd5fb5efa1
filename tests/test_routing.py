"""The route table: longest prefix on a segment boundary, host/method narrowing, rewriting,
the canonical path (escapes, slashes, dot-segments), traversal refusal. Then the same through
a real gateway (tests/integration/test_routing_agreement.py checks what upstreams receive)."""

from __future__ import annotations

import pytest
import pytest_twisted

from tests.conftest import assert_envelope, parse_responses, raw
from txgateway.config.schema import parse_config
from txgateway.filters.routing import BadPath, RouteTable, canonical_path, normalize_path

ROUTES = """
listen: [{endpoint: "tcp:0"}]
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
  admin: {targets: ["http://127.0.0.1:3002"]}
  orders: {targets: ["http://127.0.0.1:3003"]}
  api: {targets: ["http://127.0.0.1:3004"]}
  wild: {targets: ["http://127.0.0.1:3005"]}
  writes: {targets: ["http://127.0.0.1:3006"]}
  static: {targets: ["http://127.0.0.1:3007"]}
  root: {targets: ["http://127.0.0.1:3008"]}
  exact: {targets: ["http://127.0.0.1:3009"]}
routes:
  - {prefix: /api/users, upstream: users, rewrite_prefix: /users}
  - {prefix: /api/users/admin, upstream: admin, rewrite_prefix: /}
  - {prefix: /api/orders, upstream: orders}
  - {prefix: /api, upstream: api, methods: [GET, HEAD]}
  - {prefix: /api, upstream: wild, host: "*.example.com", rewrite_prefix: /wild}
  - {prefix: /api/users, upstream: writes, methods: [POST, PUT]}
  - {prefix: /static/, upstream: static, rewrite_prefix: /}
  - {prefix: /, upstream: root, host: catchall.test, rewrite_prefix: /c}
  - {prefix: /api/exact, upstream: exact, host: api.example.com}
"""


@pytest.fixture(scope="module")
def table() -> RouteTable:
    return RouteTable(parse_config(ROUTES, "routes.yaml").routes)


def route(table: RouteTable, path: bytes, method: bytes = b"GET", host: bytes | None = b"a.test") -> tuple[str, bytes] | None:
    match = table.match(method, path, host)
    return None if match is None else (match.route.upstream, match.upstream_path)


# --- prefixes -----------------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    (b"/api/users", ("users", b"/users")),
    (b"/api/users/", ("users", b"/users/")),
    (b"/api/users/7", ("users", b"/users/7")),
    (b"/api/users/7/orders/1", ("users", b"/users/7/orders/1")),
    (b"/api/users/admin", ("admin", b"/")),                  # longer prefix wins
    (b"/api/users/admin/", ("admin", b"/")),
    (b"/api/users/admin/keys", ("admin", b"/keys")),
    (b"/api/users/administrator", ("users", b"/users/administrator")),  # not on a boundary
    (b"/api/orders/1", ("orders", b"/api/orders/1")),        # no rewrite_prefix: path unchanged
    (b"/api/usersx", ("api", b"/api/usersx")),               # /api/users does not match /api/usersx
    (b"/api/ordersx/1", ("api", b"/api/ordersx/1")),
    (b"/api", ("api", b"/api")),
])
def test_longest_prefix_on_segment_boundary(table, path, expected):
    assert route(table, path) == expected


@pytest.mark.parametrize("path", [b"/", b"/apix", b"/ap", b"/other/api/users", b"/API/users", b"/statics"])
def test_no_route(table, path):
    assert route(table, path, b"POST") is None


def test_routes_are_found_regardless_of_order_in_the_file():
    text = ROUTES.replace("  - {prefix: /api/users, upstream: users, rewrite_prefix: /users}\n", "") + \
        "  - {prefix: /api/users, upstream: users, rewrite_prefix: /users}\n"
    table = RouteTable(parse_config(text, "r.yaml").routes)
    assert route(table, b"/api/users/7") == ("users", b"/users/7")
    assert route(table, b"/api/users/admin/x") == ("admin", b"/x")


# --- methods and host ---------------------------------------------------------------------

def test_methods_narrow_a_route(table):
    assert route(table, b"/api/users/7", b"POST") == ("writes", b"/api/users/7")
    assert route(table, b"/api/users/7", b"PUT") == ("writes", b"/api/users/7")
    assert route(table, b"/api/users/7", b"DELETE") == ("users", b"/users/7")    # falls back to the catch-all
    assert route(table, b"/api/x", b"GET") == ("api", b"/api/x")
    assert route(table, b"/api/x", b"HEAD") == ("api", b"/api/x")
    assert route(table, b"/api/x", b"POST") is None                              # /api is GET/HEAD only
    assert route(table, b"/api/x", b"get") is None                               # methods are case-sensitive


@pytest.mark.parametrize(("host", "expected"), [
    (b"x.example.com", ("wild", b"/wild/x")),
    (b"a.b.example.com", ("wild", b"/wild/x")),
    (b"X.Example.COM", ("wild", b"/wild/x")),
    (b"x.example.com:8443", ("wild", b"/wild/x")),
    (b"example.com", None),            # "*.example.com" needs a subdomain
    (b".example.com", None),
    (b"badexample.com", None),
    (b"x.example.com.evil.test", None),
    (b"x.example.org", None),
    (None, None),                      # no Host header: host-bound routes do not match
])
def test_host_wildcard_narrows_a_route(table, host, expected):
    assert route(table, b"/api/x", b"POST", host) == expected


def test_host_constrained_route_is_tried_before_the_catch_all(table):
    # Same prefix /api: GET goes to `api` unless the host matches `wild` (more specific).
    assert route(table, b"/api/x", b"GET", b"shop.example.com") == ("wild", b"/wild/x")
    assert route(table, b"/api/x", b"GET", b"shop.example.org") == ("api", b"/api/x")


def test_exact_host(table):
    assert route(table, b"/api/exact/1", b"GET", b"api.example.com") == ("exact", b"/api/exact/1")
    assert route(table, b"/api/exact/1", b"GET", b"API.EXAMPLE.COM:80") == ("exact", b"/api/exact/1")
    assert route(table, b"/api/exact/1", b"POST", b"www.api.example.com") == ("wild", b"/wild/exact/1")
    assert route(table, b"/api/exact/1", b"GET", b"other.test") == ("api", b"/api/exact/1")


def test_bracketed_ipv6_host_with_port():
    text = ROUTES + '  - {prefix: /v6, upstream: exact, host: "[::1]"}\n'
    table = RouteTable(parse_config(text, "r.yaml").routes)
    assert route(table, b"/v6/x", b"GET", b"[::1]") == ("exact", b"/v6/x")
    assert route(table, b"/v6/x", b"GET", b"[::1]:8080") == ("exact", b"/v6/x")
    assert route(table, b"/v6/x", b"GET", b"[::2]:8080") is None


def test_catch_all_prefix_with_host(table):
    assert route(table, b"/anything/at/all", b"DELETE", b"catchall.test") == ("root", b"/c/anything/at/all")
    assert route(table, b"/", b"GET", b"catchall.test") == ("root", b"/c/")
    assert route(table, b"/api/users/7", b"GET", b"catchall.test") == ("users", b"/users/7")  # longer prefix still wins


# --- rewrite_prefix -----------------------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    (b"/static", b"/"),
    (b"/static/", b"/"),
    (b"/static/app.js", b"/app.js"),
    (b"/static/css/site.css", b"/css/site.css"),
])
def test_rewrite_to_root_strips_the_prefix(table, path, expected):
    assert route(table, path, b"GET", b"a.test") == ("static", expected)


def test_rewrite_from_root_adds_the_prefix():
    text = ROUTES.replace("host: catchall.test, rewrite_prefix: /c", "rewrite_prefix: /v2")
    table = RouteTable(parse_config(text, "r.yaml").routes)
    assert route(table, b"/x/y", b"DELETE") == ("root", b"/v2/x/y")
    assert route(table, b"/api/users/7") == ("users", b"/users/7")


def test_root_to_root_keeps_the_path():
    text = ROUTES.replace("host: catchall.test, rewrite_prefix: /c", "rewrite_prefix: /")
    table = RouteTable(parse_config(text, "r.yaml").routes)
    assert route(table, b"/x/y", b"DELETE") == ("root", b"/x/y")
    assert route(table, b"/", b"DELETE") == ("root", b"/")


def test_rewrite_keeps_encoded_bytes(table):
    assert route(table, b"/api/users/a%3fb/%20x") == ("users", b"/users/a%3Fb/%20x")


# --- the canonical path: what is matched is what is forwarded -----------------------------

@pytest.mark.parametrize(("path", "expected"), [
    (b"/api/%70rivate/x", b"/api/private/x"),                       # unreserved: decoded
    (b"/%61%70%69/%7Euser/%2d%2E%5f", b"/api/~user/-._"),
    (b"/a%20b/%c3%a9", b"/a%20b/%C3%A9"),                            # the rest: upper-case hex
    (b"/a%2fb/c%5cd", b"/a%2Fb/c%5Cd"),                              # escaped slashes stay opaque
    (b"/a\\b", b"/a%5Cb"),                                           # a raw backslash is escaped
    (b"//a///b//", b"/a/b/"),                                        # slashes merged
    (b"/a/%2e%2E/b", b"/b"),                                         # decoded dots are dot-segments
    (b"/a/b%2F..", b"/a/b%2F.."),                                    # ...but not after an opaque slash
    (b"/a;p=1/b", b"/a;p=1/b"),
    (b"/plain/path.js", b"/plain/path.js"),
])
def test_canonical_path(path, expected):
    assert canonical_path(path) == expected


@pytest.mark.parametrize("path", [b"/a%zz", b"/a%4", b"/a%", b"/%%41", b"/a%g0/b"])
def test_malformed_escapes_are_refused(table, path):
    with pytest.raises(BadPath, match="malformed percent-encoding"):
        table.match(b"GET", path, b"a.test")


def test_encoded_path_routes_and_is_forwarded_decoded(table):
    assert route(table, b"/api/%75sers/7") == ("users", b"/users/7")
    assert route(table, b"/%61pi/%75%73%65%72%73/admin/k") == ("admin", b"/k")
    assert route(table, b"/api//users///7") == ("users", b"/users/7")


@pytest.mark.parametrize("path", [b"/api/users%2F7", b"/api/users%2f7", b"/api/users/a%5cb", b"/api/users\\7",
                                  b"/api/users/7%2F..%2F..%2Fadmin"])
def test_escaped_slashes_are_refused_by_default(table, path):
    with pytest.raises(BadPath, match="escaped slash"):
        table.match(b"GET", path, b"a.test")


OPTIONS = """
listen: [{endpoint: "tcp:0"}]
upstreams:
  a: {targets: ["http://127.0.0.1:3001"]}
routes:
  - {prefix: /api, upstream: a}
  - {prefix: /api/private, upstream: a, case_insensitive: true}
  - {prefix: /files, upstream: a, escaped_slashes: keep, rewrite_prefix: /store}
  - {prefix: /api/exact, upstream: a}
"""


@pytest.fixture(scope="module")
def options() -> RouteTable:
    return RouteTable(parse_config(OPTIONS, "options.yaml").routes)


def prefix(table: RouteTable, path: bytes) -> tuple[str, bytes] | None:
    match = table.match(b"GET", path, b"a.test")
    return None if match is None else (match.route.prefix, match.upstream_path)


def test_escaped_slashes_kept_opaque_on_a_route_that_asks(options):
    assert prefix(options, b"/files/a%2fb%5Cc") == ("/files", b"/store/a%2Fb%5Cc")
    assert prefix(options, b"/files/a\\b") == ("/files", b"/store/a%5Cb")
    with pytest.raises(BadPath):
        options.match(b"GET", b"/api/private%2Fx", b"a.test")


def test_case_insensitive_route_matches_any_case_and_forwards_its_own(options):
    assert prefix(options, b"/api/PRIVATE/x") == ("/api/private", b"/api/private/x")
    assert prefix(options, b"/api/Private") == ("/api/private", b"/api/private")
    assert prefix(options, b"/API/private/x") == ("/api/private", b"/api/private/x")   # the whole prefix
    assert prefix(options, b"/api/EXACT/1") == ("/api", b"/api/EXACT/1")    # case-sensitive by default


def test_path_params_that_would_change_the_route_are_refused(options):
    with pytest.raises(BadPath, match="parameters"):
        options.match(b"GET", b"/api/private;jsessionid=1/x", b"a.test")
    assert options.match(b"GET", b"/api;x/private", b"a.test") is None     # no route either way: 404
    # The same route either way: served, the parameters forwarded.
    assert prefix(options, b"/api/public;v=1/x") == ("/api", b"/api/public;v=1/x")
    assert prefix(options, b"/api/private/x;v=1") == ("/api/private", b"/api/private/x;v=1")


# --- dot-segments and traversal -----------------------------------------------------------

@pytest.mark.parametrize(("path", "expected"), [
    (b"/api/users/./7", ("users", b"/users/7")),
    (b"/api/users/7/.", ("users", b"/users/7/")),
    (b"/api/users/7/..", ("users", b"/users/")),
    (b"/api/users/7/../8", ("users", b"/users/8")),
    (b"/api/users/x/../../users/7", ("users", b"/users/7")),   # leaves and re-enters the same route
    (b"/api/users/%2e/7", ("users", b"/users/7")),
    (b"/api/users/7/%2E%2E/8", ("users", b"/users/8")),
    (b"/./api/users/7", ("users", b"/users/7")),             # `.` never leaves a route...
    (b"/api/./users/7", ("users", b"/users/7")),
    (b"/api/%2E/users/./admin/./x", ("admin", b"/x")),
    (b"/api/users/7/./", ("users", b"/users/7/")),
    (b"/api/users/.hidden", ("users", b"/users/.hidden")),     # only whole segments are dot-segments
    (b"/api/users/..x", ("users", b"/users/..x")),
    (b"/api/users/...", ("users", b"/users/...")),
])
def test_dot_segments_are_normalised(table, path, expected):
    assert route(table, path) == expected


@pytest.mark.parametrize("path", [
    b"/api/users/../../admin",
    b"/api/users/../orders",
    b"/api/users/../orders/1",
    b"/api/users/%2e%2e/orders",
    b"/api/users/%2E%2E/%2e%2e/admin",
    b"/api/users/.%2e/orders",
    b"/api/users/./../orders",
    b"/api/./users/../orders",
    b"/api/users/..",
    b"/api/users/admin/../../orders",
    b"/api/users/admin/..",                  # back into /api/users: a different route
    b"/api/orders/../users/7",
    b"/static/../api/users/7",
])
def test_traversal_out_of_a_route_is_refused(table, path):
    with pytest.raises(BadPath, match="escapes its route prefix"):
        table.match(b"GET", path, b"a.test")


@pytest.mark.parametrize("path", [b"/..", b"/../api/users", b"/api/../../etc/passwd", b"/%2e%2e/x", b"/a/b/../../../c"])
def test_climbing_above_the_root_is_refused(table, path):
    with pytest.raises(BadPath, match="climbs above the root"):
        table.match(b"GET", path, b"a.test")


@pytest.mark.parametrize(("path", "expected"), [
    (b"/a/b", b"/a/b"),
    (b"/a/./b", b"/a/b"),
    (b"/a/../b", b"/b"),
    (b"/a/b/..", b"/a/"),
    (b"/a/b/.", b"/a/b/"),
    (b"/a/.b/c.", b"/a/.b/c."),
    (b"/.", b"/"),
    (b"/a/..", b"/"),
])
def test_normalize_path(path, expected):
    assert normalize_path(path) == expected


def test_normalize_path_refuses_climbing_above_root():
    with pytest.raises(BadPath):
        normalize_path(b"/a/../..")


def test_traversal_between_paths_without_routes_is_just_no_route(table):
    assert route(table, b"/nothing/../else", b"POST") is None


# --- through a real gateway: the query is not part of matching ----------------------------

GATEWAY_ROUTES = """
upstreams:
  users: {{targets: ["{url}"], connect_timeout: 1s, timeout: 2s}}
routes:
  - {{prefix: /api/users, upstream: users, rewrite_prefix: /users}}
"""


def _get(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n"


@pytest_twisted.ensureDeferred
async def test_query_is_not_part_of_matching_and_is_kept(reactor, echo, gateway):
    gw = await gateway(GATEWAY_ROUTES.format(url=echo.url))
    (r,) = parse_responses(await raw(gw.port, _get(b"/api/users?next=/../../admin&x=%2e%2e")))
    assert r.status == 200, r.body
    assert r.json()["path"] == "/users" and r.json()["query"] == "next=/../../admin&x=%2e%2e"
    (r,) = parse_responses(await raw(gw.port, _get(b"/api/users/7/?a=1")))
    assert (r.json()["path"], r.json()["query"]) == ("/users/7/", "a=1")
    # A query that looks like the prefix does not make a non-matching path match.
    (r,) = parse_responses(await raw(gw.port, _get(b"/api/usersx?/api/users")))
    assert_envelope(r, 404, "NO_ROUTE")
    (r,) = parse_responses(await raw(gw.port, _get(b"/?/api/users/7")))
    assert_envelope(r, 404, "NO_ROUTE")
    assert [req.uri for req in echo.requests] == [b"/users?next=/../../admin&x=%2e%2e", b"/users/7/?a=1"]


@pytest_twisted.ensureDeferred
async def test_dot_segments_normalised_and_traversal_refused_over_the_wire(reactor, echo, gateway):
    gw = await gateway(GATEWAY_ROUTES.format(url=echo.url))
    (r,) = parse_responses(await raw(gw.port, _get(b"/api/users/./7/../8?q=1")))
    assert r.status == 200 and (r.json()["path"], r.json()["query"]) == ("/users/8", "q=1")
    for path in (b"/api/users/../../admin", b"/api/users/../orders", b"/api/users/%2e%2e/%2E%2E/admin", b"/../api/users"):
        (r,) = parse_responses(await raw(gw.port, _get(path)))
        assert_envelope(r, 400, "BAD_REQUEST")
    assert [req.uri for req in echo.requests] == [b"/users/8?q=1"]
