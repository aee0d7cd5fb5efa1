"""The config loader: one test per error class, with the exact text and line users see."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import textwrap
from pathlib import Path

import pytest

from txgateway.config import (
    DEFAULT_SECURITY_HEADERS,
    ConfigError,
    ConfigProblem,
    HeaderRules,
    Limits,
    Listener,
    Route,
    Target,
    Upstream,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "txgateway.yaml"
NOT_YET = "not supported yet in this version of txgateway; remove it or upgrade"
LIMITS_NOT_YET = "not supported yet in this version of txgateway (only backend: local); remove it or upgrade"
TIERS = "  tiers: {free: {rate: 100/hour}}\n"
TOP_KEYS = ("access_log, admin, auth, drain_timeout, limits, listen, manhole, rate_limits, "
            "redirect_to_https, redis, routes, trusted_proxies, upstreams")
ROUTE_KEYS = ("auth, cache, host, methods, prefix, rate_limit, request_headers, response_headers, "
              "rewrite_prefix, roles, security_headers, upstream")
UPSTREAM_KEYS = ("balance, circuit_breaker, connect_timeout, health_check, max_connections, "
                 "preserve_host, retries, targets, timeout, tls")

# Line numbers matter: tests add lines after these 8.
BASE = """\
listen:
  - endpoint: "tcp:8080"
upstreams:
  users: {targets: ["http://127.0.0.1:3001"]}
  orders: {targets: ["http://127.0.0.1:3003"]}
routes:
  - {prefix: /api/users, upstream: users}
  - {prefix: /api/orders, upstream: orders}
"""


def cfg(text: str) -> str:
    return textwrap.dedent(text)


def errors(text: str, file: str = "c.yaml") -> list[str]:
    """The problems parse_config reports, as check-config prints them."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, file)
    problems = info.value.problems
    assert problems, "a ConfigError must list at least one problem"
    assert all(isinstance(p, ConfigProblem) for p in problems)
    assert str(info.value) == "\n".join(str(p) for p in problems)
    return [str(p) for p in problems]


def test_base_is_valid():
    config = parse_config(BASE, "c.yaml")
    assert [r.prefix for r in config.routes] == ["/api/users", "/api/orders"]
    assert set(config.upstreams) == {"users", "orders"}


# --- unknown keys -------------------------------------------------------------------------

def test_unknown_top_level_key():
    assert errors(BASE + "listn: x\n") == [
        f"c.yaml:9: listn: unknown key (expected one of: {TOP_KEYS})",
    ]


def test_unknown_key_in_a_route_names_its_index():
    text = cfg("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"]}
          orders: {targets: ["http://127.0.0.1:3003"]}
        routes:
          - prefix: /api/users
            upstream: users
          - prefix: /api/orders
            upstrem: orders
        """)
    assert errors(text) == [
        f"c.yaml:9: routes[1].upstrem: unknown key (expected one of: {ROUTE_KEYS})",
        "c.yaml:8: routes[1].upstream: missing (required)",
    ]


def test_unknown_key_in_limits_and_upstream():
    text = BASE.replace('users: {targets:', 'users: {target: x, targets:') + "limits: {max_body: 1MiB}\n"
    assert errors(text) == [
        f"c.yaml:4: upstreams.users.target: unknown key (expected one of: {UPSTREAM_KEYS})",
        ("c.yaml:9: limits.max_body: unknown key (expected one of: header_timeout, idle_timeout, "
         "max_body_size, max_header_bytes)"),
    ]


def test_unknown_key_in_header_rules_and_listener():
    text = BASE.replace('- endpoint: "tcp:8080"', '- {endpoint: "tcp:8080", tsl: x}').replace(
        "upstream: orders}", "upstream: orders, request_headers: {sett: {X-A: b}}}")
    assert errors(text) == [
        "c.yaml:2: listen[0].tsl: unknown key (expected one of: endpoint, tls)",
        "c.yaml:8: routes[1].request_headers.sett: unknown key (expected one of: add, remove, set)",
    ]


# --- wrong types --------------------------------------------------------------------------

def test_wrong_types():
    text = cfg("""\
        listen: "tcp:8080"
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"], max_connections: many, preserve_host: "yes"}
          orders: {targets: "http://127.0.0.1:3003"}
        routes: {prefix: /api/users}
        trusted_proxies: 127.0.0.1
        access_log: 5
        redirect_to_https: maybe
        limits: [1MiB]
        """)
    assert errors(text) == [
        "c.yaml:8: redirect_to_https: expected true or false, got 'maybe'",
        "c.yaml:1: listen: expected a list, got 'tcp:8080'",
        "c.yaml:3: upstreams.users.max_connections: expected an integer >= 1, got 'many'",
        "c.yaml:3: upstreams.users.preserve_host: expected true or false, got 'yes'",
        "c.yaml:4: upstreams.orders.targets: expected a list, got 'http://127.0.0.1:3003'",
        "c.yaml:5: routes: expected a list, got a mapping",
        "c.yaml:9: limits: expected a mapping, got a list",
        "c.yaml:6: trusted_proxies: expected a list, got '127.0.0.1'",
        "c.yaml:7: access_log: expected a string, got 5",
    ]


def test_root_must_be_a_mapping():
    assert errors("- listen\n") == ["c.yaml:1: expected a mapping, got a list"]
    assert errors("hello\n") == ["c.yaml:1: expected a mapping, got 'hello'"]


def test_bad_trusted_proxy_and_method():
    text = BASE.replace("upstream: users}", "upstream: users, methods: [GET, post]}") + "trusted_proxies: [10.0.0.0/8, nowhere]\n"
    assert errors(text) == [
        'c.yaml:7: routes[0].methods[1]: expected an upper-case HTTP method like "GET", got "post"',
        'c.yaml:9: trusted_proxies[1]: expected an address or CIDR like "10.0.0.0/8", got "nowhere"',
    ]


def test_yaml_tags_and_impossible_dates_are_config_errors_not_crashes():
    text = BASE + "access_log: !foo bar\ndrain_timeout: 2024-13-45\n"
    assert errors(text) == [
        "c.yaml:9: access_log: invalid value: could not determine a constructor for the tag '!foo'",
        "c.yaml:10: drain_timeout: invalid value '2024-13-45': month must be in 1..12",
    ]


def test_python_tags_are_refused():
    text = BASE + "access_log: !!python/object/apply:os.system [echo hi]\n"
    assert errors(text) == ["c.yaml:9: access_log: expected a single value, got a list"]
    text = BASE + "access_log: !!python/name:os.system ''\n"
    assert errors(text) == [
        ("c.yaml:9: access_log: invalid value: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/name:os.system'"),
    ]


# --- units --------------------------------------------------------------------------------

def test_bad_durations():
    text = cfg("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"], connect_timeout: 1 s, timeout: 5}
        routes:
          - {prefix: /api/users, upstream: users}
        limits:
          header_timeout: 10
          idle_timeout: soon
        drain_timeout: -1s
        """)
    assert errors(text) == [
        'c.yaml:3: upstreams.users.connect_timeout: expected a duration like "250ms", "5s" or "1m", got "1 s"',
        'c.yaml:3: upstreams.users.timeout: expected a duration like "250ms", "5s" or "1m", got "5"',
        'c.yaml:7: limits.header_timeout: expected a duration like "250ms", "5s" or "1m", got "10"',
        'c.yaml:8: limits.idle_timeout: expected a duration like "250ms", "5s" or "1m", got "soon"',
        'c.yaml:9: drain_timeout: expected a duration like "250ms", "5s" or "1m", got "-1s"',
    ]


def test_bad_sizes():
    text = BASE + "limits:\n  max_body_size: 10 MB\n  max_header_bytes: 1.5KiB\n"
    assert errors(text) == [
        'c.yaml:10: limits.max_body_size: expected a size like "512", "16KiB" or "10MiB", got "10 MB"',
        'c.yaml:11: limits.max_header_bytes: expected a size like "512", "16KiB" or "10MiB", got "1.5KiB"',
    ]


def test_header_limit_below_1kib():
    assert errors(BASE + "limits: {max_header_bytes: 512}\n") == [
        "c.yaml:9: limits.max_header_bytes: expected at least 1KiB",
    ]


def test_units_are_converted():
    text = BASE + cfg("""\
        limits: {max_body_size: 1MiB, max_header_bytes: 8KiB, header_timeout: 250ms, idle_timeout: 2m}
        drain_timeout: 1.5s
        """)
    config = parse_config(text, "c.yaml")
    assert config.limits == Limits(max_body_size=2**20, max_header_bytes=8192, header_timeout=0.25, idle_timeout=120.0)
    assert config.drain_timeout == 1.5


def test_defaults():
    config = parse_config(BASE, "c.yaml")
    assert config.limits == Limits(10 * 2**20, 16 * 2**10, 10.0, 60.0)
    assert config.drain_timeout == 10.0 and config.access_log == "-" and config.trusted_proxies == ()
    users = config.upstreams["users"]
    assert (users.connect_timeout, users.timeout, users.max_connections, users.preserve_host) == (1.0, 30.0, 1024, False)
    route = config.routes[0]
    assert (route.rewrite_prefix, route.methods, route.host) == (None, None, None)
    assert route.security_headers == DEFAULT_SECURITY_HEADERS
    assert not route.request_headers and not route.response_headers


# --- references and duplicates ------------------------------------------------------------

def test_route_naming_an_undefined_upstream():
    text = BASE + "  - {prefix: /api/billing, upstream: billing}\n"
    assert errors(text) == [
        'c.yaml:9: routes[2].upstream: no upstream named "billing" (defined: orders, users)',
    ]


def test_route_naming_an_invalid_upstream_reports_only_the_upstream():
    text = BASE.replace('orders: {targets: ["http://127.0.0.1:3003"]}', "orders: {timeout: 1s}")
    assert errors(text) == ["c.yaml:5: upstreams.orders.targets: missing (required)"]


def test_no_upstreams_defined():
    text = BASE.replace("upstreams:\n", "upstreams: {}\n").replace(
        '  users: {targets: ["http://127.0.0.1:3001"]}\n  orders: {targets: ["http://127.0.0.1:3003"]}\n', "")
    assert errors(text) == [
        'c.yaml:5: routes[0].upstream: no upstream named "users" (defined: none defined)',
        'c.yaml:6: routes[1].upstream: no upstream named "orders" (defined: none defined)',
    ]


def test_duplicate_prefixes():
    text = BASE + "  - {prefix: /api/users/, upstream: orders}\n"
    assert errors(text) == [
        'c.yaml:9: routes[2].prefix: duplicate prefix "/api/users" (already used by routes[0])',
    ]


def test_same_prefix_with_different_host_or_methods_is_not_a_duplicate():
    text = BASE + (
        "  - {prefix: /api/users, upstream: orders, host: admin.example.com}\n"
        "  - {prefix: /api/users, upstream: orders, methods: [POST]}\n"
        "  - {prefix: /api/users, upstream: orders, methods: [POST], host: admin.example.com}\n")
    assert len(parse_config(text, "c.yaml").routes) == 5
    assert errors(text + "  - {prefix: /api/users, upstream: users, methods: [POST]}\n") == [
        'c.yaml:12: routes[5].prefix: duplicate prefix "/api/users" (already used by routes[3])',
    ]


def test_duplicate_yaml_keys():
    text = cfg("""\
        listen: [{endpoint: "tcp:8080"}]
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"]}
          users: {targets: ["http://127.0.0.1:3002"]}
        routes:
          - prefix: /api/users
            upstream: users
            prefix: /api/other
        limits: {max_body_size: 1MiB}
        limits: {max_body_size: 2MiB}
        """)
    assert errors(text) == [
        "c.yaml:10: limits: duplicate key",
        "c.yaml:4: upstreams.users: duplicate key",
        "c.yaml:8: routes[0].prefix: duplicate key",
    ]


def test_duplicate_header_names_in_set():
    text = BASE.replace("upstream: users}", "upstream: users, request_headers: {set: {X-A: '1', X-A: '2'}}}")
    assert errors(text) == ["c.yaml:7: routes[0].request_headers.set.X-A: duplicate key"]


# --- YAML syntax --------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ('listen:\n  - endpoint: "tcp:8080"\nroutes: [\n  {prefix: /a\n',
     "c.yaml:5: invalid YAML: expected ',' or '}', but got '<stream end>'"),
    ("listen:\n  - a\n - b\n", "c.yaml:3: invalid YAML: expected <block end>, but found '<block sequence start>'"),
    ("listen: x\nroutes: a: b\n", "c.yaml:2: invalid YAML: mapping values are not allowed here"),
    ("listen: [x]\nroutes:\n\t- a\n", "c.yaml:3: invalid YAML: found character '\\t' that cannot start any token"),
    ("listen: x\n---\nroutes: y\n", "c.yaml:2: invalid YAML: but found another document"),
])
def test_invalid_yaml_names_the_line(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    (problem,) = info.value.problems
    assert str(problem) == expected
    assert problem.line == int(expected.split(":")[1])


# --- missing keys -------------------------------------------------------------------------

def test_empty_file():
    assert errors("") == ["c.yaml: the file is empty"]
    assert errors("# only a comment\n") == ["c.yaml: the file is empty"]


def test_missing_required_sections():
    assert errors("access_log: '-'\n") == [
        "c.yaml:1: listen: missing (required)",
        "c.yaml:1: upstreams: missing (required)",
        "c.yaml:1: routes: missing (required)",
    ]


def test_missing_required_keys_in_items():
    text = cfg("""\
        listen:
          - {endpoint: "tcp:8080"}
          - {}
        upstreams:
          users: {timeout: 1s}
          orders: {targets: []}
        routes:
          - {upstream: orders}
          - {prefix: /api/x}
        """)
    assert errors(text) == [
        "c.yaml:3: listen[1].endpoint: missing (required)",
        "c.yaml:5: upstreams.users.targets: missing (required)",
        "c.yaml:6: upstreams.orders.targets: expected at least one target URL",
        "c.yaml:8: routes[0].prefix: missing (required)",
        "c.yaml:9: routes[1].upstream: missing (required)",
    ]


def test_empty_listen_is_reported_even_beside_other_errors():
    text = BASE.replace('listen:\n  - endpoint: "tcp:8080"\n', "listen: []\nbogus: 1\n")
    assert errors(text) == [
        f"c.yaml:2: bogus: unknown key (expected one of: {TOP_KEYS})",
        "c.yaml:1: listen: expected at least one listener",
    ]


def test_unreadable_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert str(info.value) == f"{missing}: cannot read config: No such file or directory"


def test_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(BASE.encode() + b'access_log: "caf\xe9.log"\n')
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:9: cannot read config: not UTF-8 text (byte 0xe9)"


def test_file_with_bom_and_crlf_line_ends(tmp_path):
    path = tmp_path / "windows.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + (BASE + "bad: 1\n").replace("\n", "\r\n").encode())
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    assert str(info.value) == f"{path}:9: bad: unknown key (expected one of: {TOP_KEYS})"


# --- targets ------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "10.0.0.11:3001", "http://", "http://10.0.0.11:3001/api", "http://10.0.0.11:99999", "http://10.0.0.11:0",
    "http://10.0.0.11:port", "ftp://10.0.0.11", "http://10.0.0.11:3001?x=1", "http://10.0.0.11:3001#f", "",
])
def test_bad_target_url(url):
    text = BASE.replace('"http://127.0.0.1:3003"', f'"http://127.0.0.1:3003", "{url}"')
    assert errors(text) == [
        f'c.yaml:5: upstreams.orders.targets[1]: expected a URL like "http://10.0.0.11:3001", got "{url}"',
    ]


def test_target_urls():
    text = BASE.replace('"http://127.0.0.1:3003"', '"http://orders.internal", "http://[::1]:3004/"')
    targets = parse_config(text, "c.yaml").upstreams["orders"].targets
    assert targets == (Target("http://orders.internal", "orders.internal", 80), Target("http://[::1]:3004/", "::1", 3004))
    assert [t.netloc for t in targets] == [b"orders.internal:80", b"[::1]:3004"]


def test_https_target_is_not_supported_yet():
    text = BASE.replace('"http://127.0.0.1:3003"', '"https://search.internal:3002"')
    assert errors(text) == [f"c.yaml:5: upstreams.orders.targets[0]: https upstreams are {NOT_YET}"]


# --- headers ------------------------------------------------------------------------------

def test_bad_header_names():
    text = BASE.replace("upstream: users}", "upstream: users, request_headers: {set: {'X Bad': v}, remove: ['X:*']}}").replace(
        "upstream: orders}", "upstream: orders, security_headers: {'Bad\u00e9': v}}")
    assert errors(text) == [
        'c.yaml:7: routes[0].request_headers.set.X Bad: expected a header name like "X-Api-Version", got "X Bad"',
        'c.yaml:7: routes[0].request_headers.remove[0]: expected a header name like "X-Api-Version", got "X:*"',
        'c.yaml:8: routes[1].security_headers.Bad\u00e9: expected a header name like "X-Api-Version", got "Bad\u00e9"',
    ]


@pytest.mark.parametrize("value", [r'"a\r\nX-Injected: 1"', r'"a\nb"', r'"a\rb"', r'"a\0b"', r'"a\x7fb"'])
def test_header_values_with_control_characters(value):
    text = BASE.replace("upstream: users}", f"upstream: users, response_headers: {{add: {{X-A: {value}}}}}}}").replace(
        "upstream: orders}", f"upstream: orders, security_headers: {{X-Frame-Options: {value}}}}}")
    assert errors(text) == [
        "c.yaml:7: routes[0].response_headers.add.X-A: header values must not contain control characters (CR, LF, NUL...)",
        ("c.yaml:8: routes[1].security_headers.X-Frame-Options: header values must not contain control characters "
         "(CR, LF, NUL...)"),
    ]


def test_header_values_must_be_latin1():
    text = BASE.replace("upstream: users}", "upstream: users, request_headers: {set: {X-Price: '5 \u20ac'}}}")
    assert errors(text) == ['c.yaml:7: routes[0].request_headers.set.X-Price: header values must be Latin-1 text, got "5 \u20ac"']


def test_header_rules_values():
    text = BASE.replace("upstream: orders}", cfg("""\
        upstream: orders,
            request_headers: {set: {X-Api-Version: 2, X-Flag: true, X-Tab: "a\\tb"}, add: {Via: gw}, remove: [Cookie, X-Internal-*]},
            security_headers: {X-Frame-Options: SAMEORIGIN, Referrer-Policy: null, Strict-Transport-Security: max-age=60}}"""))
    route = parse_config(text, "c.yaml").routes[1]
    assert route.request_headers == HeaderRules(
        set=((b"X-Api-Version", b"2"), (b"X-Flag", b"true"), (b"X-Tab", b"a\tb")),
        add=((b"Via", b"gw"),),
        remove=(b"cookie", b"x-internal-*"),
    )
    assert route.security_headers == (
        (b"X-Content-Type-Options", b"nosniff"),
        (b"X-Frame-Options", b"SAMEORIGIN"),
        (b"Strict-Transport-Security", b"max-age=60"),
    )


# --- routes -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["api/users", "/api/../admin", "/api/./x", "/api?x=1", "/api#x", "/api/.."])
def test_bad_prefix(prefix):
    text = BASE.replace("prefix: /api/orders", f'prefix: "{prefix}"')
    assert errors(text) == [f'c.yaml:8: routes[1].prefix: expected an absolute path like "/api/users", got "{prefix}"']


def test_bad_rewrite_prefix_and_host():
    text = BASE.replace("upstream: users}", "upstream: users, rewrite_prefix: users, host: 'api.example.com:8080'}")
    assert errors(text) == [
        'c.yaml:7: routes[0].rewrite_prefix: expected an absolute path like "/api/users", got "users"',
        ('c.yaml:7: routes[0].host: expected a host name like "api.example.com" or "*.example.com", '
         'got "api.example.com:8080"'),
    ]


def test_route_values():
    text = BASE.replace("upstream: users}", "upstream: users, rewrite_prefix: /users/, methods: [GET, HEAD], host: '*.Example.COM'}")
    route = parse_config(text, "c.yaml").routes[0]
    assert route == Route(prefix="/api/users", upstream="users", rewrite_prefix="/users",
                          methods=frozenset({b"GET", b"HEAD"}), host="*.example.com", index=0)


# --- route auth and roles ----------------------------------------------------------------

AUTH = 'auth:\n  jwt: {algorithms: [HS256], secret_env: JWT_SECRET}\n'   # appended after the routes
ENV = {"JWT_SECRET": "x" * 32}


def auth_errors(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", ENV)
    return [str(p) for p in info.value.problems]


def test_route_auth_and_roles_values():
    text = BASE.replace("upstream: users}", "upstream: users, auth: optional}").replace(
        "upstream: orders}", "upstream: orders, roles: [admin, ops]}") + (
        "  - {prefix: /api/a, upstream: users, auth: required}\n"
        "  - {prefix: /api/b, upstream: users, auth: none}\n"
        "  - {prefix: /api/c, upstream: users, auth: required, roles: [admin]}\n"
        "  - {prefix: /api/d, upstream: users}\n") + AUTH
    routes = parse_config(text, "c.yaml", ENV).routes
    assert [(r.prefix, r.auth, r.roles) for r in routes] == [
        ("/api/users", "optional", None),
        ("/api/orders", "required", frozenset({"admin", "ops"})),   # roles imply required
        ("/api/a", "required", None),
        ("/api/b", "none", None),
        ("/api/c", "required", frozenset({"admin"})),
        ("/api/d", "none", None),
    ]


def test_route_auth_needs_an_auth_section():
    text = BASE.replace("upstream: users}", "upstream: users, auth: required}").replace(
        "upstream: orders}", "upstream: orders, roles: [admin]}") + "  - {prefix: /api/o, upstream: users, auth: optional}\n"
    message = "this route needs credentials but the config has no auth: section"
    assert errors(text) == [
        f"c.yaml:7: routes[0].auth: {message}",
        f"c.yaml:8: routes[1].roles: {message}",  # roles alone: named by the key that is there
        f"c.yaml:9: routes[2].auth: {message}",
    ]
    # `auth: none` needs nothing
    assert parse_config(BASE.replace("upstream: users}", "upstream: users, auth: none}"), "c.yaml").routes[0].auth == "none"


def test_route_roles_need_auth_required():
    text = BASE.replace("upstream: users}", "upstream: users, auth: optional, roles: [admin]}").replace(
        "upstream: orders}", "upstream: orders,\n      auth: none,\n      roles: [admin]}") + AUTH
    assert auth_errors(text) == [
        "c.yaml:7: routes[0].roles: roles need auth: required, got auth: optional",
        "c.yaml:10: routes[1].roles: roles need auth: required, got auth: none",
    ]


def test_route_auth_and_roles_bad_values():
    text = BASE.replace("upstream: users}", "upstream: users, auth: yes}").replace(
        "upstream: orders}", "upstream: orders, roles: []}") + (
        "  - {prefix: /api/a, upstream: users, roles: admin}\n"
        "  - {prefix: /api/b, upstream: users, roles: [admin, 7]}\n"
        "  - {prefix: /api/c, upstream: users, auth: Required}\n") + AUTH
    assert auth_errors(text) == [
        "c.yaml:7: routes[0].auth: expected one of none, optional, required, got True",
        "c.yaml:8: routes[1].roles: expected at least one role",
        "c.yaml:9: routes[2].roles: expected a list, got 'admin'",
        "c.yaml:10: routes[3].roles[1]: expected a string, got 7",
        "c.yaml:11: routes[4].auth: expected one of none, optional, required, got 'Required'",
    ]


# --- later versions -----------------------------------------------------------------------

@pytest.mark.parametrize(("edit", "line", "path", "message"), [
    (lambda t: t.replace('- endpoint: "tcp:8080"', '- {endpoint: "tcp:8443", tls: {certificates: []}}'),
     2, "listen[0].tls", NOT_YET),
    (lambda t: t + "redirect_to_https: true\n", 9, "redirect_to_https", NOT_YET),
    (lambda t: t + 'admin: {endpoint: "tcp:9901"}\n', 9, "admin", NOT_YET),
    (lambda t: t + 'manhole: {endpoint: "tcp:2222"}\n', 9, "manhole", NOT_YET),
    (lambda t: t + 'redis:\n  url: "redis://127.0.0.1:6379/0"\n', 10, "redis", NOT_YET),
    (lambda t: t + "rate_limits:\n  backend: redis\n" + TIERS, 10, "rate_limits.backend", f"redis: {LIMITS_NOT_YET}"),
    (lambda t: t + "rate_limits:\n  backend: hybrid\n" + TIERS, 10, "rate_limits.backend", f"hybrid: {LIMITS_NOT_YET}"),
    (lambda t: t + "rate_limits:\n" + TIERS + "  sync_interval: 100ms\n", 11, "rate_limits.sync_interval", LIMITS_NOT_YET),
    (lambda t: t + "rate_limits:\n" + TIERS + "  on_redis_error: local\n", 11, "rate_limits.on_redis_error", LIMITS_NOT_YET),
    (lambda t: t + "rate_limits:\n" + TIERS + "  instances: 2\n", 11, "rate_limits.instances", LIMITS_NOT_YET),
    (lambda t: t + 'redis: {url: "redis://127.0.0.1:6379/0"}\nrate_limits:\n  backend: local\n' + TIERS,
     9, "redis", NOT_YET),
    (lambda t: t.replace("users: {targets:", "users: {circuit_breaker: {open_for: 30s}, targets:"),
     4, "upstreams.users.circuit_breaker", NOT_YET),
    (lambda t: t.replace("users: {targets:", "users: {health_check: {path: /healthz}, targets:"),
     4, "upstreams.users.health_check", NOT_YET),
    (lambda t: t.replace("users: {targets:", "users: {tls: {ca: /etc/ca.pem}, targets:"), 4, "upstreams.users.tls", NOT_YET),
    (lambda t: t.replace("users: {targets:", "users: {retries: 1, targets:"), 4, "upstreams.users.retries", NOT_YET),
    (lambda t: t.replace("users: {targets:", "users: {balance: least_request, targets:"),
     4, "upstreams.users.balance", f"least_request is {NOT_YET}"),
    (lambda t: t.replace("users: {targets:", "users: {balance: random, targets:"),
     4, "upstreams.users.balance", f"random is {NOT_YET}"),
    (lambda t: t.replace("upstream: orders}", "upstream: orders, cache: {ttl: 30s}}"), 8, "routes[1].cache", NOT_YET),
])
def test_sections_of_later_versions_are_refused_by_key_path(edit, line, path, message):
    assert errors(edit(BASE)) == [f"c.yaml:{line}: {path}: {message}"]


def test_later_version_keys_with_their_off_values_are_accepted():
    text = BASE.replace("users: {targets:", "users: {retries: 0, balance: round_robin, targets:").replace(
        "upstream: orders}", "upstream: orders, auth: none}") + "redirect_to_https: false\n"
    config = parse_config(text, "c.yaml")
    assert len(config.routes) == 2


def test_rate_limits_and_route_rate_limit_are_accepted_with_the_local_backend():
    text = BASE.replace("upstream: orders}", "upstream: orders, rate_limit: {key: ip}}") + (
        "rate_limits:\n  backend: local\n" + TIERS)
    config = parse_config(text, "c.yaml")
    assert config.rate_limits is not None and config.rate_limits.backend == "local"
    assert config.routes[0].rate_limit is None
    assert config.routes[1].rate_limit.key == "ip"


def test_every_redis_related_rate_limit_key_is_refused_at_once():
    text = BASE + 'redis: {url: "redis://127.0.0.1:6379/0"}\n' + cfg("""\
        rate_limits:
          backend: hybrid
          sync_interval: 100ms
          on_redis_error: deny
          instances: 2
          tiers: {free: {rate: 100/hour}}
        """)
    assert errors(text) == [
        f"c.yaml:9: redis: {NOT_YET}",
        f"c.yaml:11: rate_limits.backend: hybrid: {LIMITS_NOT_YET}",
        f"c.yaml:12: rate_limits.sync_interval: {LIMITS_NOT_YET}",
        f"c.yaml:13: rate_limits.on_redis_error: {LIMITS_NOT_YET}",
        f"c.yaml:14: rate_limits.instances: {LIMITS_NOT_YET}",
    ]


def test_unknown_balance_policy():
    text = BASE.replace("users: {targets:", "users: {balance: fastest, targets:")
    assert errors(text) == [
        "c.yaml:4: upstreams.users.balance: expected one of round_robin, least_request, random, got 'fastest'",
    ]


# --- several at once ----------------------------------------------------------------------

def test_every_error_is_reported_in_one_config_error():
    text = cfg("""\
        listen:
          - endpoint: "tcp:8080"
        admin: {endpoint: "tcp:9901"}
        limits:
          max_body_size: lots
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"], timeout: forever}
          orders: {targets: ["10.0.0.21:3003"]}
        routes:
          - prefix: /api/users
            upstream: users
            cache: {ttl: 30s}
          - prefix: /api/users
            upstream: users
          - prefix: /api/search
            upstream: search
            upstrem: search
        """)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml")
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (3, "admin"),
        (7, "upstreams.users.timeout"),
        (8, "upstreams.orders.targets[0]"),
        (12, "routes[0].cache"),
        (17, "routes[2].upstrem"),
        (16, "routes[2].upstream"),
        (5, "limits.max_body_size"),
    ]
    assert str(info.value).splitlines() == [
        f"c.yaml:3: admin: {NOT_YET}",
        'c.yaml:7: upstreams.users.timeout: expected a duration like "250ms", "5s" or "1m", got "forever"',
        'c.yaml:8: upstreams.orders.targets[0]: expected a URL like "http://10.0.0.11:3001", got "10.0.0.21:3003"',
        f"c.yaml:12: routes[0].cache: {NOT_YET}",
        f"c.yaml:17: routes[2].upstrem: unknown key (expected one of: {ROUTE_KEYS})",
        'c.yaml:16: routes[2].upstream: no upstream named "search" (defined: orders, users)',
        'c.yaml:5: limits.max_body_size: expected a size like "512", "16KiB" or "10MiB", got "lots"',
    ]
    assert all(p.file == "c.yaml" for p in problems)


def test_problems_name_the_file_given():
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "x: 1\n", "/etc/txgateway/gw.yaml")
    assert str(info.value).startswith("/etc/txgateway/gw.yaml:9: x: unknown key")


# --- the example and the values -----------------------------------------------------------

def test_the_example_config_loads():
    config = load_config(str(EXAMPLE))
    assert config.file == str(EXAMPLE)
    assert config.listen == (Listener("tcp:8080:interface=0.0.0.0"),)
    assert set(config.upstreams) == {"users", "orders", "search"}
    assert [r.prefix for r in config.routes][:3] == ["/api/users", "/api/search", "/api/orders"]
    assert [r.upstream for r in config.routes][:3] == ["users", "search", "orders"]
    assert config.limits == Limits(10 * 2**20, 16 * 2**10, 10.0, 60.0)
    assert config.trusted_proxies[0] == ipaddress.ip_network("127.0.0.1/32")
    users = config.upstreams["users"]
    assert [t.url for t in users.targets] == ["http://10.0.0.11:3001", "http://10.0.0.12:3001"]
    orders = next(r for r in config.routes if r.prefix == "/api/orders")
    assert orders.request_headers.set == ((b"X-Api-Version", b"2"),)
    assert b"x-internal-*" in orders.response_headers.remove


def test_the_example_shows_every_supported_key():
    text = EXAMPLE.read_text()
    live = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for key in ("listen:", "endpoint:", "trusted_proxies:", "limits:", "max_body_size:", "max_header_bytes:",
                "header_timeout:", "idle_timeout:", "drain_timeout:", "access_log:", "upstreams:", "targets:",
                "connect_timeout:", "timeout:", "max_connections:", "preserve_host:", "balance: round_robin",
                "routes:", "prefix:", "upstream:", "rewrite_prefix:", "methods:", "host:", "request_headers:",
                "response_headers:", "security_headers:",
                "auth:", "jwt:", "algorithms:", "jwks_url:", "jwks_cooldown:", "jwks_refresh:", "jwks_timeout:",
                "issuer:", "audience:", "leeway:", "claims:", "cache_size:", "auth: required", "roles: [admin]",
                "rate_limits:", "backend: local", "tiers:", "free:", "pro:", "enterprise:", "default_tier:",
                "max_buckets:", "rate_limit: {key: user}", "rate_limit: {key: ip, rate: 100/minute, burst: 20}",
                "scope:"):
        assert key in live, key
    commented = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    # Auth variants that need files or secrets the example cannot assume: shown, explained, commented.
    for variant in ("secret_env:", "secret_file:", "jwks_file:", "public_keys:", "api_keys:", "hash-key"):
        assert variant in commented, variant
        assert variant not in live, variant
    for later in ("tls:", "admin:", "manhole:", "redis:", "backend: hybrid", "sync_interval:", "on_redis_error:",
                  "instances:", "circuit_breaker:", "health_check:", "retries: 1", "cache:", "https://search",
                  "least_request"):
        assert later in commented, later
        assert later not in live, later
    assert "later version" in text.lower()


def test_the_example_config_protects_users_and_orders():
    config = load_config(str(EXAMPLE))
    policies = {r.prefix: (r.auth, r.roles) for r in config.routes}
    assert policies == {
        "/api/users": ("required", None),
        "/api/search": ("none", None),
        "/api/orders": ("required", frozenset({"admin"})),
        "/api/orders-legacy": ("required", frozenset({"admin"})),
    }
    jwt_config = config.auth.jwt
    assert jwt_config.algorithms == ("RS256",) and jwt_config.secret is None
    assert jwt_config.jwks_url == "https://auth.example.com/.well-known/jwks.json"
    assert (jwt_config.issuer, jwt_config.audience, jwt_config.leeway) == ("https://auth.example.com", ("api",), 30.0)
    assert config.auth.api_keys is None


def test_the_examples_commented_auth_variants_load_once_their_files_exist(tmp_path):
    """Uncommenting the HS secret and api_keys lines (pointing them at real files) gives a valid config."""
    secret = tmp_path / "jwt_secret"
    secret.write_text("s" * 40 + "\n")
    keys = tmp_path / "api_keys.yaml"
    keys.write_text('- {hash: "sha256:' + "ab" * 32 + '", id: ci, role: admin, tier: pro}\n')
    text = EXAMPLE.read_text()
    text = text.replace("    algorithms: [RS256]", "    algorithms: [RS256, HS256]")
    text = text.replace("    # secret_file: /etc/txgateway/jwt_secret", f"    secret_file: {secret}")
    text = text.replace("  # api_keys:\n  #   header: X-API-Key\n  #   file: /etc/txgateway/api_keys.yaml",
                        f"  api_keys:\n    header: X-API-Key\n    file: {keys}")
    assert text.count(str(tmp_path)) == 2
    config = parse_config(text, "example.yaml", {})
    assert config.auth.jwt.secret == b"s" * 40
    assert config.auth.jwt.algorithms == ("RS256", "HS256")
    assert config.auth.api_keys.header == b"x-api-key"
    (record,) = config.auth.api_keys.keys.values()
    assert (record.id, record.role, record.tier) == ("ci", "admin", "pro")
    # The secret_env variant instead: needs the variable, and says so when it is missing.
    text_env = EXAMPLE.read_text().replace("    algorithms: [RS256]", "    algorithms: [RS256, HS256]").replace(
        "    # secret_env: JWT_SECRET", "    secret_env: JWT_SECRET")
    assert parse_config(text_env, "example.yaml", {"JWT_SECRET": "e" * 32}).auth.jwt.secret == b"e" * 32
    line = text_env.splitlines().index("    secret_env: JWT_SECRET                     # from this environment variable, or") + 1
    with pytest.raises(ConfigError) as info:
        parse_config(text_env, "example.yaml", {})
    assert str(info.value) == f"example.yaml:{line}: auth.jwt.secret_env: environment variable JWT_SECRET is not set or empty"


def test_the_examples_later_version_blocks_are_refused_when_uncommented(tmp_path):
    """Uncommenting a 'later versions' block must fail loudly, never be ignored."""
    text = EXAMPLE.read_text()
    uncommented = re.sub(r"^# (admin|manhole|redis):", r"\1:", text, flags=re.MULTILINE)
    # The redis-backed rate limit settings, in place of `backend: local`.
    uncommented = re.sub(r"^  # (backend|sync_interval|on_redis_error|instances):", r"  \1:", uncommented,
                         flags=re.MULTILINE).replace("\n  backend: local\n", "\n  # backend: local\n")
    assert uncommented.count("\n") == text.count("\n") and uncommented != text
    path = tmp_path / "later.yaml"
    path.write_text(uncommented)
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    problems = {p.path: p.message for p in info.value.problems}
    assert {"admin", "manhole", "redis"} <= set(problems)
    assert all(NOT_YET in problems[p] for p in ("admin", "manhole", "redis"))
    assert problems["rate_limits.backend"] == f"hybrid: {LIMITS_NOT_YET}"
    for key in ("sync_interval", "on_redis_error", "instances"):
        assert problems[f"rate_limits.{key}"] == LIMITS_NOT_YET
    assert not any(p.startswith("routes") for p in problems)


def test_the_example_rate_limits():
    config = load_config(str(EXAMPLE))
    limits = config.rate_limits
    assert limits.backend == "local" and limits.default_tier == "free" and limits.max_buckets == 100_000
    assert {name: (t.rate.count, t.rate.window, t.burst) for name, t in limits.tiers.items()} == {
        "free": (100, 3600, 100), "pro": (5000, 3600, 5000), "enterprise": (100000, 3600, 100000)}
    routes = {r.prefix: r.rate_limit for r in config.routes}
    assert (routes["/api/users"].key, routes["/api/users"].rate, routes["/api/users"].scope) == ("user", None, None)
    search = routes["/api/search"]
    assert (search.key, search.rate.count, search.rate.window, search.burst) == ("ip", 100, 60, 20)
    assert routes["/api/orders"].scope == routes["/api/orders-legacy"].scope == "orders"


def test_values_are_frozen():
    config = load_config(str(EXAMPLE))
    route = config.routes[0]
    upstream = config.upstreams["users"]
    for obj, attr, value in [
        (config, "routes", ()), (config, "limits", Limits()), (config, "drain_timeout", 0.0),
        (config.limits, "max_body_size", 1), (config.listen[0], "endpoint", "tcp:1"),
        (route, "prefix", "/"), (route, "upstream", "orders"), (route.request_headers, "set", ()),
        (upstream, "timeout", 0.0), (upstream.targets[0], "port", 1),
        (ConfigProblem("f", 1, "p", "m"), "line", 2),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert isinstance(route.methods, (frozenset, type(None)))
    assert isinstance(config.routes, tuple) and isinstance(upstream.targets, tuple)
    assert isinstance(route.security_headers, tuple) and isinstance(route.request_headers.remove, tuple)
    assert isinstance(upstream, Upstream)
    with pytest.raises(TypeError):
        config.upstreams["users"] = upstream  # type: ignore[index]
