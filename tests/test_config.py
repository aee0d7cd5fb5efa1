"""The config loader: one test per error class, with the exact text and line users see."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import textwrap
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from jwt.algorithms import ECAlgorithm
from twisted.conch.ssh.keys import Key

from tests.configcheck import BASE, config_errors, route_auth, unwritable  # BASE: lines 1-8; tests add lines after them
from tests.conftest import SECRET
from tests.test_tls_config import CertAuthority
from txgateway.config import registry
from txgateway.config.schema import (
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
from txgateway.filters.auth.config import hash_api_key
from txgateway.filters.ratelimit.config import LimitsConfig
from txgateway.filters.ratelimit.redisconfig import RedisConfig
from txgateway.ops.accesslog import FIELDS
from txgateway.ops.config import AdminConfig, ManholeConfig
from txgateway.transport.tlsconfig import UpstreamTLS
from txgateway.upstream.breaker import BreakerSettings
from txgateway.upstream.resilienceconfig import HealthCheck, PassiveHealth

EXAMPLE = Path(__file__).resolve().parent.parent / "etc" / "txgateway.yaml"
TIERS = "  tiers: {free: {rate: 100/hour}}\n"
REDIS_URL = 'expected a URL like "redis://127.0.0.1:6379/0" or "redis://:PASSWORD@host:6379/0", got'
REDIS_KEYS = "password_env, pool_size, sentinel, timeout, url"
DURATION = 'expected a duration like "250ms", "5s" or "1m", got'
RATE = 'expected "N/second|minute|hour|day", got'
RATE_ZERO = 'expected "N/second|minute|hour|day" with N above zero, got'
TOP_KEYS = ("access_log, access_log_fields, access_log_redact, admin, auth, cache, drain_timeout, ip_rules, limits, "
            "listen, manhole, rate_limits, "
            "redirect_to_https, redis, routes, tracing, trusted_proxies, underscores_in_headers, upstreams")
ROUTE_KEYS = ("auth, cache, case_insensitive, compose, connect_timeout, cors, escaped_slashes, host, ip_allow, ip_deny, "
              "max_body_size, methods, prefix, rate_limit, request_headers, respond, response_headers, rewrite_prefix, "
              "roles, security_headers, split, timeout, transform, upstream, upstream_errors, websocket")
UPSTREAM_KEYS = ("balance, circuit_breaker, connect_timeout, health_check, max_connections, "
                 "passive_health, preserve_host, retries, targets, timeout, tls")



def cfg(text: str) -> str:
    return textwrap.dedent(text)


errors = config_errors        # the problems parse_config reports, as check-config prints them


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
        "c.yaml:8: routes[1].upstream: missing (required; or respond: to answer from the gateway)",
        f"c.yaml:9: routes[1].upstrem: unknown key (expected one of: {ROUTE_KEYS})",
    ]


def test_unknown_key_in_limits_and_upstream():
    text = BASE.replace('users: {targets:', 'users: {target: x, targets:') + "limits: {max_body: 1MiB}\n"
    assert errors(text) == [
        f"c.yaml:4: upstreams.users.target: unknown key (expected one of: {UPSTREAM_KEYS})",
        ("c.yaml:9: limits.max_body: unknown key (expected one of: body_timeout, buffer_request_body, "
         "header_timeout, idle_timeout, max_body_size, max_connections_per_ip, max_header_bytes, min_body_rate)"),
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
        "c.yaml:1: listen: expected a list, got 'tcp:8080'",
        "c.yaml:3: upstreams.users.max_connections: expected an integer >= 1, got 'many'",
        "c.yaml:3: upstreams.users.preserve_host: expected true or false, got 'yes'",
        "c.yaml:4: upstreams.orders.targets: expected a list, got 'http://127.0.0.1:3003'",
        "c.yaml:5: routes: expected a list, got a mapping",
        "c.yaml:6: trusted_proxies: expected a list, got '127.0.0.1'",
        "c.yaml:7: access_log: expected a string, got 5",
        "c.yaml:8: redirect_to_https: expected true or false, got 'maybe'",
        "c.yaml:9: limits: expected a mapping, got a list",
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


def test_bad_slow_client_limits():
    text = BASE + ("limits:\n  buffer_request_body: lots\n  body_timeout: 10\n  min_body_rate: 1KiB/s\n"
                   "  max_connections_per_ip: -1\n")
    assert errors(text) == [
        'c.yaml:10: limits.buffer_request_body: expected a size like "512", "16KiB" or "10MiB", got "lots"',
        'c.yaml:11: limits.body_timeout: expected a duration like "250ms", "5s" or "1m", got "10"',
        'c.yaml:12: limits.min_body_rate: expected a size like "512", "16KiB" or "10MiB", got "1KiB/s"',
        "c.yaml:13: limits.max_connections_per_ip: expected an integer >= 0, got -1",
    ]
    config = parse_config(BASE + "limits: {buffer_request_body: 0, body_timeout: 1m, min_body_rate: 512, "
                                 "max_connections_per_ip: 100}\n", "c.yaml")
    assert (config.limits.buffer_request_body, config.limits.body_timeout, config.limits.min_body_rate,
            config.limits.max_connections_per_ip) == (0, 60.0, 512, 100)
    assert Limits() == Limits(buffer_request_body=65536, body_timeout=10.0, min_body_rate=1024,
                              max_connections_per_ip=0)


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
    assert route.policies["header_rules"].security == DEFAULT_SECURITY_HEADERS
    assert not route.policies["header_rules"].request and not route.policies["header_rules"].response


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
        "c.yaml:4: upstreams.users: duplicate key",
        "c.yaml:8: routes[0].prefix: duplicate key",
        "c.yaml:10: limits: duplicate key",
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
    ("listen: [x]\nroutes:\n\t- a\n", "c.yaml:3: invalid YAML: a tab at column 1: indent with spaces (YAML does not allow tabs there)"),
    ("listen: [x]\nroutes:\n  - a\n  -\tb\n", "c.yaml:4: invalid YAML: a tab at column 4: indent with spaces (YAML does not allow tabs there)"),
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
        "c.yaml:9: routes[1].upstream: missing (required; or respond: to answer from the gateway)",
    ]


def test_empty_listen_is_reported_even_beside_other_errors():
    text = BASE.replace('listen:\n  - endpoint: "tcp:8080"\n', "listen: []\nbogus: 1\n")
    assert errors(text) == [
        "c.yaml:1: listen: expected at least one listener",
        f"c.yaml:2: bogus: unknown key (expected one of: {TOP_KEYS})",
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

TARGET_URL = 'expected a URL like "http://10.0.0.11:3001" or "https://api.internal", got'


@pytest.mark.parametrize("url", [
    "10.0.0.11:3001", "http://", "http://10.0.0.11:3001/api", "http://10.0.0.11:99999", "http://10.0.0.11:0",
    "http://10.0.0.11:port", "ftp://10.0.0.11", "http://10.0.0.11:3001?x=1", "http://10.0.0.11:3001#f", "",
    "https://", "https://api.internal:0", "https://api.internal/v1", "wss://api.internal",
])
def test_bad_target_url(url):
    text = BASE.replace('"http://127.0.0.1:3003"', f'"http://127.0.0.1:3003", "{url}"')
    assert errors(text) == [f'c.yaml:5: upstreams.orders.targets[1]: {TARGET_URL} "{url}"']


def test_target_urls():
    text = BASE.replace('"http://127.0.0.1:3003"', '"http://orders.internal", "http://[::1]:3004/"')
    targets = parse_config(text, "c.yaml").upstreams["orders"].targets
    assert targets == (Target("http://orders.internal", "orders.internal", 80), Target("http://[::1]:3004/", "::1", 3004))
    assert [t.netloc for t in targets] == [b"orders.internal:80", b"[::1]:3004"]


def test_https_targets_are_accepted_with_port_443_by_default():
    text = BASE.replace('"http://127.0.0.1:3003"', '"https://search.internal:3002", "https://search.internal", "http://a"')
    targets = parse_config(text, "c.yaml").upstreams["orders"].targets
    assert targets == (Target("https://search.internal:3002", "search.internal", 3002, https=True),
                       Target("https://search.internal", "search.internal", 443, https=True),
                       Target("http://a", "a", 80, https=False))
    assert [t.netloc for t in targets] == [b"search.internal:3002", b"search.internal:443", b"a:80"]


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
    assert route.policies["header_rules"].request == HeaderRules(
        set=((b"X-Api-Version", b"2"), (b"X-Flag", b"true"), (b"X-Tab", b"a\tb")),
        add=((b"Via", b"gw"),),
        remove=(b"cookie", b"x-internal-*"),
    )
    assert route.policies["header_rules"].security == (
        (b"X-Content-Type-Options", b"nosniff"),
        (b"X-Frame-Options", b"SAMEORIGIN"),
        (b"Strict-Transport-Security", b"max-age=60"),
    )


# --- routes -------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["api/users", "/api/../admin", "/api/./x", "/api?x=1", "/api#x", "/api/.."])
def test_bad_prefix(prefix):
    text = BASE.replace("prefix: /api/orders", f'prefix: "{prefix}"')
    assert errors(text) == [f'c.yaml:8: routes[1].prefix: expected an absolute path like "/api/users", got "{prefix}"']


@pytest.mark.parametrize(("prefix", "canonical"), [
    ("/api/%7euser", ' ("/api/~user")'), ("/api/%c3%a9", ' ("/api/%C3%A9")'), ("/api//x", ' ("/api/x")'),
    ("/a\\\\b", ' ("/a%5Cb")'), ("/api/%zz", ""),
])
def test_a_prefix_not_in_the_form_requests_are_matched_in(prefix, canonical):
    text = BASE.replace("prefix: /api/orders", f'prefix: "{prefix}"')
    shown = prefix.replace("\\\\", "\\")
    assert errors(text) == [f'c.yaml:8: routes[1].prefix: expected the path in the form requests are matched in'
                            f'{canonical}, got "{shown}"']


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
                          methods=frozenset({b"GET", b"HEAD"}), host="*.example.com", terminal="proxy",
                          answer="users", policies=route.policies, index=0)
    assert list(route.policies) == ["header_rules"]    # every route has header rules (security headers)


# --- route auth and roles ----------------------------------------------------------------

AUTH = 'auth:\n  jwt: {algorithms: [HS256], secret_env: JWT_SECRET}\n'   # appended after the routes
ENV = {"JWT_SECRET": "x" * 32}


def auth_errors(text: str) -> list[str]:
    return config_errors(text, environ=ENV)


def test_route_auth_and_roles_values():
    text = BASE.replace("upstream: users}", "upstream: users, auth: optional}").replace(
        "upstream: orders}", "upstream: orders, roles: [admin, ops]}") + (
        "  - {prefix: /api/a, upstream: users, auth: required}\n"
        "  - {prefix: /api/b, upstream: users, auth: none}\n"
        "  - {prefix: /api/c, upstream: users, auth: required, roles: [admin]}\n"
        "  - {prefix: /api/d, upstream: users}\n") + AUTH
    routes = parse_config(text, "c.yaml", ENV).routes
    assert [(r.prefix, *route_auth(r)) for r in routes] == [
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
    assert parse_config(BASE.replace("upstream: users}", "upstream: users, auth: none}"), "c.yaml").routes[0].policies.get("auth") is None


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


# --- the response cache -------------------------------------------------------------------

@pytest.mark.parametrize(("edit", "line", "path", "message"), [
    (lambda t: t.replace("upstream: orders}", "upstream: orders, cache: {ttl: soon}}"), 8, "routes[1].cache.ttl",
     'expected a duration like "250ms", "5s" or "1m", got "soon"'),
    (lambda t: t.replace("upstream: orders}", "upstream: orders, cache: {methods: [POST]}}"), 8,
     "routes[1].cache.methods[0]", "expected one of GET, HEAD, got 'POST'"),
    (lambda t: t.replace("upstream: orders}", "upstream: orders, cache: {key: {query: maybe}}}"), 8,
     "routes[1].cache.key.query", "expected true or false, got 'maybe'"),
    (lambda t: t.replace("upstream: orders}", "upstream: orders, cache: {tll: 5s}}"), 8,
     "routes[1].cache.tll", "unknown key (expected one of: key, methods, serve_stale, ttl)"),
    (lambda t: t + "cache: {max_memory: 1KiB, max_object_size: 1MiB}\n", 9, "cache.max_object_size",
     "expected at most max_memory (1024 bytes), got 1048576"),
])
def test_cache_keys_are_checked_by_key_path(edit, line, path, message):
    assert errors(edit(BASE)) == [f"c.yaml:{line}: {path}: {message}"]


@pytest.mark.parametrize(("edit", "line", "path", "message"), [
    (lambda t: t.replace('- endpoint: "tcp:8080"', '- {endpoint: "tcp:8443", tls: {certificates: []}}'),
     2, "listen[0].tls.certificates", "expected at least one certificate"),
    (lambda t: t + "redirect_to_https: true\n", 9, "redirect_to_https", "needs a listener with tls: to redirect to"),
    (lambda t: t.replace("users: {targets:", "users: {tls: {ca: /nonexistent/ca.pem}, targets:"), 4,
     "upstreams.users.tls.ca", "cannot read /nonexistent/ca.pem: No such file or directory"),
])
def test_tls_sections_are_read_now_and_checked_by_key_path(edit, line, path, message):
    """TLS arrived: listen[].tls, redirect_to_https and upstreams.*.tls are no longer refused
    as later versions; their details are in test_tls_config.py."""
    assert errors(edit(BASE)) == [f"c.yaml:{line}: {path}: {message}"]


def test_admin_and_manhole_are_no_longer_refused_as_later_versions():
    """Both sections are read now: admin alone is valid, manhole is checked key by key
    (its details are in test_ops_config.py)."""
    config = parse_config(BASE + 'admin: {endpoint: "tcp:9901:interface=127.0.0.1"}\n', "c.yaml", {})
    assert config.admin == AdminConfig(endpoint="tcp:9901:interface=127.0.0.1", token=None)
    assert config.manhole is None
    assert errors(BASE + 'manhole: {endpoint: "tcp:2222"}\n', environ={}) == [
        "c.yaml:9: manhole.authorized_keys: missing (required): a file path",
        "c.yaml:9: manhole.host_key: missing (required): a file path",
    ]
    assert parse_config(BASE, "c.yaml", {}).admin is None


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
    assert config.routes[0].policies.get("rate_limit") is None
    assert config.routes[1].policies.get("rate_limit").key == "ip"


def test_unknown_balance_policy():
    text = BASE.replace("users: {targets:", "users: {balance: fastest, targets:")
    assert errors(text) == [
        "c.yaml:4: upstreams.users.balance: expected one of round_robin, least_request, random, got 'fastest'",
    ]


# --- redis: -------------------------------------------------------------------------------

def with_redis(body: str) -> str:
    """BASE and a `redis:` block on line 9: the first line of `body` is line 10."""
    return BASE + "redis:\n" + textwrap.indent(cfg(body), "  ")


def test_a_redis_url_is_read_into_its_fields():
    config = parse_config(with_redis("""\
        url: "redis://gateway:s3cr%40t@Cache.Internal:6380/3"
        timeout: 50ms
        pool_size: 8
        """), "c.yaml", {})
    assert config.redis == RedisConfig(host="cache.internal", port=6380, db=3, username="gateway",
                                       password="s3cr@t", timeout=0.05, pool_size=8)
    assert (config.redis.sentinel_master, config.redis.sentinel_hosts) == (None, ())
    assert config.redis.where == "redis://cache.internal:6380/3"
    for shown in (repr(config.redis), repr(config), config.redis.where):
        assert "s3cr" not in shown


def test_redis_url_defaults_and_no_redis_section():
    assert parse_config(BASE, "c.yaml").redis is None
    config = parse_config(with_redis('url: "redis://10.0.0.5"\n'), "c.yaml", {})
    assert config.redis == RedisConfig(host="10.0.0.5", port=6379, db=0, username=None, password=None,
                                       timeout=0.2, pool_size=4)
    assert config.redis.where == "redis://10.0.0.5:6379/0"
    # A password alone (no user name), percent-decoded; an IPv6 host in brackets.
    config = parse_config(with_redis('url: "redis://:p%2Fw%3Ad@[::1]:7000/2"\n'), "c.yaml", {})
    assert (config.redis.host, config.redis.port, config.redis.db) == ("::1", 7000, 2)
    assert (config.redis.username, config.redis.password) == (None, "p/w:d")
    assert "p/w:d" not in repr(config.redis) and "p%2F" not in config.redis.where


def test_a_redis_sentinel_is_read_into_its_fields():
    config = parse_config(with_redis("""\
        sentinel:
          master: mymaster
          hosts: ["10.0.0.41:26379", "s2.internal:26380"]
          db: 2
        password_env: REDIS_PASSWORD
        timeout: 1s
        """), "c.yaml", {"REDIS_PASSWORD": "pw-from-env"})
    assert config.redis == RedisConfig(db=2, password="pw-from-env", sentinel_master="mymaster",
                                       sentinel_hosts=(("10.0.0.41", 26379), ("s2.internal", 26380)), timeout=1.0)
    assert config.redis.where == "sentinel:mymaster@10.0.0.41:26379,s2.internal:26380/2"
    assert "pw-from-env" not in repr(config.redis) and "pw-from-env" not in config.redis.where
    # db defaults to 0; an IPv6 sentinel is written in brackets.
    config = parse_config(with_redis('sentinel: {master: m, hosts: ["[::1]:26379"]}\n'), "c.yaml", {})
    assert (config.redis.sentinel_hosts, config.redis.db) == ((("::1", 26379),), 0)


@pytest.mark.parametrize(("text", "line"), [
    (with_redis('url: "redis://127.0.0.1:6379/0"\nsentinel: {master: m, hosts: ["127.0.0.1:26379"]}\n'), 10),
    (with_redis("timeout: 200ms\n"), 10),
    (BASE + "redis: {}\n", 9),
])
def test_redis_needs_exactly_one_of_url_and_sentinel(text, line):
    assert errors(text, environ={}) == [f"c.yaml:{line}: redis: expected exactly one of url or sentinel"]


@pytest.mark.parametrize(("url", "shown"), [
    ("http://:hunter2@127.0.0.1:6379/0", "http://:***@127.0.0.1:6379/0"),       # not redis://
    ("127.0.0.1:6379", "127.0.0.1:6379"),                                       # no scheme
    ("redis://:hunter2@/0", "redis://:***@/0"),                                 # no host
    ("redis://:6379/0", "redis://:6379/0"),
    ("redis:///0", "redis:///0"),
    ("redis://gw:hunter2@127.0.0.1:0/0", "redis://gw:***@127.0.0.1:0/0"),       # port 0
    ("redis://:hunter2@127.0.0.1:99999/0", "redis://:***@127.0.0.1:99999/0"),   # port > 65535
    ("redis://127.0.0.1:port/0", "redis://127.0.0.1:port/0"),
    ("redis://:hunter2@127.0.0.1:6379/x", "redis://:***@127.0.0.1:6379/x"),     # db not a number
    ("redis://127.0.0.1:6379/-1", "redis://127.0.0.1:6379/-1"),
    ("redis://127.0.0.1:6379/0/1", "redis://127.0.0.1:6379/0/1"),
    ("redis://127.0.0.1:6379/0?db=1", "redis://127.0.0.1:6379/0?db=1"),         # options: not read, so refused
])
def test_bad_redis_urls_are_named_without_their_password(url, shown):
    problems = errors(with_redis(f'url: "{url}"\n'), environ={})
    assert problems == [f'c.yaml:10: redis.url: {REDIS_URL} "{shown}"']
    assert "hunter2" not in problems[0]


def test_rediss_is_refused_and_the_url_is_not_echoed():
    problems = errors(with_redis('url: "rediss://:hunter2@cache.internal:6380/0"\n'), environ={})
    assert problems == [
        "c.yaml:10: redis.url: rediss:// (Redis over TLS) is not supported yet; use redis:// on a trusted network"]


def test_redis_url_must_be_a_string():
    assert errors(with_redis("url: 6379\n"), environ={}) == ["c.yaml:10: redis.url: expected a string, got 6379"]


@pytest.mark.parametrize("url", ["redis://:hunter/2@127.0.0.1:6379/0", "redis://:hunter#2@127.0.0.1:6379/0",
                                 "redis://:hunter?2@127.0.0.1:6379/0"])
def test_a_password_with_unencoded_reserved_characters_is_not_echoed(url):
    problems = errors(with_redis(f'url: "{url}"\n'), environ={})
    assert len(problems) == 1 and problems[0].startswith("c.yaml:10: redis.url: ")
    assert "hunter" not in problems[0]


@pytest.mark.parametrize("url", ["redis://:hunter2@127.0.0.1]:6379/0", "redis://[zz]:6379/0", "redis://127.0.0.1:6379/\u00b2"])
def test_urls_python_cannot_split_are_config_errors_not_crashes(url):
    problems = errors(with_redis(f'url: "{url}"\n'), environ={})
    assert len(problems) == 1 and problems[0].startswith("c.yaml:10: redis.url: ")
    assert "hunter2" not in problems[0]


def test_redis_password_from_the_environment():
    text = with_redis('url: "redis://127.0.0.1:6379/0"\npassword_env: REDIS_PASSWORD\n')
    config = parse_config(text, "c.yaml", {"REDIS_PASSWORD": "from-env"})
    assert config.redis.password == "from-env"
    assert "from-env" not in repr(config.redis) and "from-env" not in config.redis.where
    unset = "c.yaml:11: redis.password_env: environment variable REDIS_PASSWORD is not set or empty"
    assert errors(text, environ={}) == [unset]
    assert errors(text, environ={"REDIS_PASSWORD": ""}) == [unset]
    assert errors(with_redis('url: "redis://127.0.0.1"\npassword_env: 5\n'), environ={}) == [
        "c.yaml:11: redis.password_env: expected a string, got 5"]


def test_redis_password_in_the_url_and_from_the_environment_is_refused_without_echoing_either():
    text = with_redis('url: "redis://:in-url@127.0.0.1:6379/0"\npassword_env: REDIS_PASSWORD\n')
    problems = errors(text, environ={"REDIS_PASSWORD": "in-env"})
    assert problems == ["c.yaml:11: redis.password_env: the url already has a password; keep one of them"]


@pytest.mark.parametrize(("value", "message"), [
    ("0ms", "expected between 1ms and 10s, got 0ms"),
    ("11s", "expected between 1ms and 10s, got 11s"),
    ("1m", "expected between 1ms and 10s, got 1m"),
    ("500us", f'{DURATION} "500us"'),
    ("5", f'{DURATION} "5"'),
    ("fast", f'{DURATION} "fast"'),
])
def test_bad_redis_timeouts(value, message):
    text = with_redis(f'url: "redis://127.0.0.1"\ntimeout: {value}\n')
    assert errors(text, environ={}) == [f"c.yaml:11: redis.timeout: {message}"]


def test_redis_timeout_bounds_are_accepted():
    for value, seconds in (("1ms", 0.001), ("10s", 10.0)):
        config = parse_config(with_redis(f'url: "redis://127.0.0.1"\ntimeout: {value}\n'), "c.yaml", {})
        assert config.redis.timeout == seconds


def test_redis_pool_size_and_unknown_keys():
    assert errors(with_redis('url: "redis://127.0.0.1"\npool_size: 0\n'), environ={}) == [
        "c.yaml:11: redis.pool_size: expected an integer >= 1, got 0"]
    assert errors(BASE + 'redis: {url: "redis://127.0.0.1", timout: 1s}\n', environ={}) == [
        f"c.yaml:9: redis.timout: unknown key (expected one of: {REDIS_KEYS})"]
    assert errors(BASE + 'redis: "redis://127.0.0.1"\n', environ={}) == [
        "c.yaml:9: redis: expected a mapping, got 'redis://127.0.0.1'"]


@pytest.mark.parametrize(("sentinel", "path", "message"), [
    ('{master: m, hosts: []}', "hosts", "expected at least one sentinel"),
    ('{master: m, hosts: "10.0.0.41:26379"}', "hosts", "expected a list, got '10.0.0.41:26379'"),
    ('{master: m, hosts: ["10.0.0.41"]}', "hosts[0]", 'expected "host:port" of a sentinel, got "10.0.0.41"'),
    ('{master: m, hosts: ["a:1", "b:0"]}', "hosts[1]", 'expected "host:port" of a sentinel, got "b:0"'),
    ('{master: m, hosts: ["a:65536"]}', "hosts[0]", 'expected "host:port" of a sentinel, got "a:65536"'),
    ('{master: m, hosts: [":26379"]}', "hosts[0]", 'expected "host:port" of a sentinel, got ":26379"'),
    ('{master: m, hosts: [26379]}', "hosts[0]", "expected a string, got 26379"),
    ('{hosts: ["a:26379"]}', "master", "missing (required)"),
    ('{master: m}', "hosts", "missing (required)"),
    ('{master: m, hosts: ["a:26379"], db: -1}', "db", "expected an integer >= 0, got -1"),
    ('{master: m, hosts: ["a:26379"], port: 1}', "port", "unknown key (expected one of: db, hosts, master)"),
])
def test_bad_redis_sentinels(sentinel, path, message):
    assert errors(with_redis(f"sentinel: {sentinel}\n"), environ={}) == [f"c.yaml:10: redis.sentinel.{path}: {message}"]


# --- rate_limits with the redis and hybrid backends ---------------------------------------

REDIS_SECTION = 'redis: {url: "redis://127.0.0.1:6379/0"}\n'


def test_the_redis_and_hybrid_backends_and_their_settings_are_read():
    text = BASE + REDIS_SECTION + cfg("""\
        rate_limits:
          backend: hybrid
          sync_interval: 250ms
          on_redis_error: deny
          instances: 3
          tiers: {free: {rate: 100/hour}}
        """)
    limits = parse_config(text, "c.yaml", {}).rate_limits
    assert (limits.backend, limits.sync_interval, limits.on_redis_error, limits.instances) == ("hybrid", 0.25, "deny", 3)
    config = parse_config(BASE + REDIS_SECTION + "rate_limits:\n  backend: redis\n  on_redis_error: allow\n" + TIERS,
                          "c.yaml", {})
    assert config.rate_limits == LimitsConfig(tiers=config.rate_limits.tiers, default_tier="free", backend="redis",
                                              sync_interval=0.1, on_redis_error="allow", instances=1)
    assert config.redis == RedisConfig()
    # A redis: section next to the local backend is allowed (and unused).
    assert parse_config(BASE + REDIS_SECTION + "rate_limits:\n" + TIERS, "c.yaml", {}).rate_limits.backend == "local"


@pytest.mark.parametrize("backend", ["redis", "hybrid"])
def test_redis_and_hybrid_backends_need_a_redis_section(backend):
    assert errors(BASE + f"rate_limits:\n  backend: {backend}\n" + TIERS) == [
        f"c.yaml:10: rate_limits.backend: {backend} needs a redis: section (url or sentinel)"]


def test_a_missing_redis_section_is_reported_at_the_backend_line():
    assert errors(BASE + "rate_limits:\n" + TIERS + "  backend: hybrid\n") == [
        "c.yaml:11: rate_limits.backend: hybrid needs a redis: section (url or sentinel)"]


@pytest.mark.parametrize(("backend", "shown"), [("  backend: redis\n", "redis"), ("  backend: local\n", "local"),
                                                ("", "local")])
def test_sync_interval_is_only_for_the_hybrid_backend(backend, shown):
    text = BASE + REDIS_SECTION + "rate_limits:\n" + backend + "  sync_interval: 100ms\n" + TIERS
    line = 11 if backend else 10
    assert errors(text, environ={}) == [
        f"c.yaml:{line + 1}: rate_limits.sync_interval: only used with backend: hybrid (backend is {shown})"]


@pytest.mark.parametrize(("value", "message"), [
    ("5ms", "expected between 10ms and 10s, got 5ms"),
    ("11s", "expected between 10ms and 10s, got 11s"),
    ("soon", f'{DURATION} "soon"'),
])
def test_bad_sync_intervals(value, message):
    text = BASE + REDIS_SECTION + f"rate_limits:\n  backend: hybrid\n  sync_interval: {value}\n" + TIERS
    assert errors(text, environ={}) == [f"c.yaml:12: rate_limits.sync_interval: {message}"]


def test_bad_on_redis_error_and_instances():
    text = BASE + REDIS_SECTION + "rate_limits:\n  backend: redis\n  on_redis_error: crash\n  instances: 0\n" + TIERS
    assert errors(text, environ={}) == [
        "c.yaml:12: rate_limits.on_redis_error: expected one of local, allow, deny, got 'crash'",
        "c.yaml:13: rate_limits.instances: expected an integer >= 1, got 0",
    ]


@pytest.mark.parametrize("backend", ["  backend: local\n", ""])
def test_on_redis_error_and_instances_are_only_for_redis_backends(backend):
    text = BASE + "rate_limits:\n" + backend + "  on_redis_error: allow\n  instances: 2\n" + TIERS
    line = 11 if backend else 10
    assert errors(text) == [
        f"c.yaml:{line}: rate_limits.on_redis_error: only used with backend: redis or hybrid (backend is local)",
        f"c.yaml:{line + 1}: rate_limits.instances: only used with backend: redis or hybrid (backend is local)",
    ]


def test_zero_and_unreadable_rates():
    """Also in test_limit_config.py; here as check-config shows them for a whole file."""
    text = BASE.replace("upstream: orders}", "upstream: orders, rate_limit: {key: ip, rate: abc}}") + (
        "rate_limits:\n  tiers: {free: {rate: 0/minute}}\n")
    assert errors(text) == [
        f'c.yaml:8: routes[1].rate_limit.rate: {RATE} "abc"',
        f'c.yaml:10: rate_limits.tiers.free.rate: {RATE_ZERO} "0/minute"',
    ]


def test_every_redis_and_rate_limit_error_is_reported_in_one_run():
    text = BASE + cfg("""\
        redis:
          url: "http://:hunter2@127.0.0.1:6379/0"
          password_env: REDIS_PASSWORD
          timeout: 30s
          pool_size: 0
        rate_limits:
          backend: hybrid
          sync_interval: 5ms
          on_redis_error: crash
          instances: 0
          tiers: {free: {rate: 0/minute}, pro: {rate: abc}}
          default_tier: free
        """)
    problems = errors(text, environ={})
    assert problems == [
        f'c.yaml:10: redis.url: {REDIS_URL} "http://:***@127.0.0.1:6379/0"',
        "c.yaml:11: redis.password_env: environment variable REDIS_PASSWORD is not set or empty",
        "c.yaml:12: redis.timeout: expected between 1ms and 10s, got 30s",
        "c.yaml:13: redis.pool_size: expected an integer >= 1, got 0",
        "c.yaml:16: rate_limits.sync_interval: expected between 10ms and 10s, got 5ms",
        "c.yaml:17: rate_limits.on_redis_error: expected one of local, allow, deny, got 'crash'",
        "c.yaml:18: rate_limits.instances: expected an integer >= 1, got 0",
        f'c.yaml:19: rate_limits.tiers.free.rate: {RATE_ZERO} "0/minute"',
        f'c.yaml:19: rate_limits.tiers.pro.rate: {RATE} "abc"',
    ]
    assert not any("hunter2" in p for p in problems)


# --- several at once ----------------------------------------------------------------------

def test_every_error_is_reported_in_one_config_error():
    text = cfg("""\
        listen:
          - endpoint: "tcp:8080"
        admin: {endpoint: "tcp:9901", token_env: ADMIN_TOKEN}
        limits:
          max_body_size: lots
        upstreams:
          users: {targets: ["http://127.0.0.1:3001"], timeout: forever}
          orders: {targets: ["10.0.0.21:3003"]}
        routes:
          - prefix: /api/users
            upstream: users
            cache: {ttl: 30 seconds}
          - prefix: /api/users
            upstream: users
          - prefix: /api/search
            upstream: search
            upstrem: search
        """)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "c.yaml", {})
    problems = info.value.problems
    assert [(p.line, p.path) for p in problems] == [
        (3, "admin.token_env"),
        (5, "limits.max_body_size"),
        (7, "upstreams.users.timeout"),
        (8, "upstreams.orders.targets[0]"),
        (12, "routes[0].cache.ttl"),
        (16, "routes[2].upstream"),
        (17, "routes[2].upstrem"),
    ]
    assert str(info.value).splitlines() == [
        "c.yaml:3: admin.token_env: environment variable ADMIN_TOKEN must hold a token of at least 16 characters"
        " (it is not set)",
        'c.yaml:5: limits.max_body_size: expected a size like "512", "16KiB" or "10MiB", got "lots"',
        'c.yaml:7: upstreams.users.timeout: expected a duration like "250ms", "5s" or "1m", got "forever"',
        f'c.yaml:8: upstreams.orders.targets[0]: {TARGET_URL} "10.0.0.21:3003"',
        'c.yaml:12: routes[0].cache.ttl: expected a duration like "250ms", "5s" or "1m", got "30 seconds"',
        'c.yaml:16: routes[2].upstream: no upstream named "search" (defined: orders, users)',
        f"c.yaml:17: routes[2].upstrem: unknown key (expected one of: {ROUTE_KEYS})",
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
    assert set(config.upstreams) == {"users", "orders", "orders-v2", "search", "sessions"}
    assert [r.prefix for r in config.routes][:3] == ["/api/users", "/api/search", "/api/orders"]
    assert [r.upstream for r in config.routes][:3] == ["users", "search", "orders"]
    assert config.limits == Limits(10 * 2**20, 16 * 2**10, 10.0, 60.0)
    assert config.trusted_proxies[0] == ipaddress.ip_network("127.0.0.1/32")
    users = config.upstreams["users"]
    assert [t.url for t in users.targets] == ["http://10.0.0.11:3001", "http://10.0.0.12:3001"]
    orders = next(r for r in config.routes if r.prefix == "/api/orders")
    assert orders.policies["header_rules"].request.set == ((b"X-Api-Version", b"2"),)
    assert b"x-internal-*" in orders.policies["header_rules"].response.remove
    assert config.admin == AdminConfig(endpoint="tcp:9901:interface=127.0.0.1", token=None)
    assert config.manhole is None


def test_the_example_users_upstream_is_resilient_with_the_documented_values():
    config = load_config(str(EXAMPLE))
    users = config.upstreams["users"]
    assert (users.balance, users.retries, users.connect_timeout, users.timeout) == ("least_request", 1, 1.0, 5.0)
    assert users.circuit_breaker == BreakerSettings(
        consecutive_failures=5, failure_ratio=0.5, window=10.0, min_requests=20, open_for=30.0, max_open_for=300.0,
        half_open_requests=1, failure_statuses=frozenset({502, 503, 504}))
    assert users.health_check == HealthCheck(path=b"/healthz", interval=5.0, timeout=2.0, healthy_threshold=2,
                                             unhealthy_threshold=3)
    assert users.passive_health == PassiveHealth(consecutive_failures=5, eject_for=10.0, max_eject_for=300.0)
    # The single-target upstreams keep the defaults: nothing to balance, no breaker, no checks.
    for name in ("orders", "search"):
        other = config.upstreams[name]
        assert (other.balance, other.retries, other.circuit_breaker, other.health_check) == (
            "round_robin", 0, None, None), name


def test_the_example_shows_every_supported_key():
    text = EXAMPLE.read_text()
    live = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    for key in ("listen:", "endpoint:", "trusted_proxies:", "limits:", "max_body_size:", "max_header_bytes:",
                "header_timeout:", "idle_timeout:", "drain_timeout:", "access_log:", "upstreams:", "targets:",
                "connect_timeout:", "timeout:", "max_connections:", "preserve_host:", "balance: least_request",
                "retries: 1", "circuit_breaker:", "consecutive_failures:", "failure_ratio:", "window:",
                "min_requests:", "open_for:", "max_open_for:", "half_open_requests:", "failure_statuses:",
                "health_check:", "path: /healthz", "interval:", "healthy_threshold:", "unhealthy_threshold:",
                "passive_health:", "eject_for:", "max_eject_for:",
                "routes:", "prefix:", "upstream:", "rewrite_prefix:", "methods:", "host:", "request_headers:",
                "response_headers:", "security_headers:",
                "auth:", "jwt:", "algorithms:", "jwks_url:", "jwks_cooldown:", "jwks_refresh:", "jwks_timeout:",
                "issuer:", "audience:", "leeway:", "claims:", "cache_size:", "auth: required", "roles: [admin]",
                "rate_limits:", "backend: local", "tiers:", "free:", "pro:", "enterprise:", "default_tier:",
                "max_buckets:", "rate_limit: {key: user}", "rate_limit: {key: ip, rate: 100/minute, burst: 20}",
                "scope:", "admin:"):
        assert key in live, key
    live_lines = text.splitlines()
    assert live_lines[live_lines.index("admin:") + 1] == '  endpoint: "tcp:9901:interface=127.0.0.1"'
    commented = "\n".join(line.split("#", 1)[1] for line in text.splitlines() if "#" in line)
    # Auth variants that need files or secrets the example cannot assume: shown, explained, commented.
    for variant in ("secret_env:", "secret_file:", "jwks_file:", "public_keys:", "api_keys:", "hash-key"):
        assert variant in commented, variant
        assert variant not in live, variant
    # Sharing limits through Redis needs a running Redis (and its password): shown, explained, commented.
    for redis_key in ("redis:", 'url: "redis://', "password_env:", "pool_size:", "sentinel:", "master:", "hosts:",
                      "backend: hybrid", "sync_interval:", "on_redis_error:", "instances:"):
        assert redis_key in commented, redis_key
        assert redis_key not in live, redis_key
    for explained in ("Redis >= 5", "instances x rate x sync_interval", "local: keep limiting", "rate / instances",
                      "allow: let requests through unlimited", "deny:  answer 503", "never waits longer",
                      "rediss:// (TLS) is refused", "exactly one of the two"):
        assert explained in text, explained
    # Balancing, retries, the breaker and health checks: explained next to their keys.
    prose = " ".join(" ".join(line.split("#", 1)[1].split()) for line in text.splitlines() if "#" in line)
    for explained in ("round_robin in turn", "least_request two targets drawn at random", "power of two choices",
                      "random any, uniformly", "only for idempotent methods", "only on another target",
                      "never after any byte of the response reached the client", "each retry counts against it",
                      "Failures are connect errors, resets, timeouts and the statuses in failure_statuses",
                      "null: consecutive failures only", "503 UPSTREAM_UNAVAILABLE and Retry-After",
                      "admits half_open_requests probes", "twice as long, up to max_open_for", "+-10% (jitter)",
                      "in lockstep", "2xx or 3xx", "any pass ends a passive ejection early",
                      "its first failure before any success ejects it again, for twice as long each time, up to "
                      "max_eject_for", "a success resets that backoff", "It always comes back"):
        assert explained in prose, explained
    for needs_files in ("tls:", "https://search"):
        assert needs_files in commented, needs_files
        assert needs_files not in live, needs_files
    for cache_key in ("cache:", "ttl:", "serve_stale:", "max_memory:", "max_object_size:", "credentials:",
                      "lock_timeout:", "store_set_cookie:", "key: {query: true"):
        assert cache_key in live, cache_key
    # The admin token and the manhole need a secret or files the example cannot assume: shown, explained,
    # commented; the admin endpoints are explained next to the live section.
    for ops_key in ("token_env: TXGATEWAY_ADMIN_TOKEN", "manhole:", 'endpoint: "tcp:2222:interface=127.0.0.1"',
                    "authorized_keys:", "host_key:"):
        assert ops_key in commented, ops_key
        assert ops_key not in live, ops_key
    for explained in ("/healthz 200 while the process runs", "503 while draining after SIGTERM",
                      "/metrics Prometheus text", "a status page for people", "bearer token (>= 16 chars)",
                      "/healthz and /readyz stay open", "public keys only", "every login and typed line logged",
                      "blocking code stalls traffic", "check-config needs the authorized_keys file to exist",
                      "OpenSSH format", "ed25519, created (0600) on first start"):
        assert explained in prose, explained
    # The manhole's explanation (the comment paragraph right above `# manhole:`) says it is off
    # unless configured, and no longer that it comes later.
    lines = text.splitlines()
    start = end = lines.index("# manhole:")
    while lines[start - 1].startswith("#"):
        start -= 1
    paragraph = " ".join(lines[start:end])
    assert "Off unless configured" in paragraph
    assert "later" not in paragraph.lower()
    assert "# --- Later versions" not in text     # the block that held admin and manhole is gone
    # What this version implements is no longer announced as coming later.
    for line in text.splitlines():
        if "later" in line.lower():
            assert not any(word in line.lower() for word in (
                "retries", "balance", "least_request", "random", "circuit", "breaker", "health")), line
    # Redis, the redis-backed rate limits, the admin endpoint and the manhole are no longer
    # announced as coming later.
    for line in text.splitlines():
        if "later" in line.lower():
            assert not any(word in line.lower() for word in (
                "redis", "hybrid", "sync_interval", "instances", "admin", "manhole", "metrics", "ssh")), line


def test_the_example_shows_every_registered_route_key_and_section():
    """A filter or terminal added to the registry is shown in the example, live or commented."""
    text = EXAMPLE.read_text()
    keys = [*registry.route_keys(), *(kind.section for kind in registry.FILTERS if kind.section is not None)]
    for key in keys:
        assert re.search(rf"(?<![\w-]){re.escape(key)}:", text), key


def test_the_examples_local_answers_load():
    """The live `respond:` route, and its commented redirect and maintenance variants in its place."""
    text = EXAMPLE.read_text()
    (v0,) = [r for r in load_config(str(EXAMPLE)).routes if r.prefix == "/api/v0"]
    assert (v0.terminal, v0.upstream, v0.answer.status, v0.answer.body) == (
        "respond", None, 410, b'{"error": "API v0 is gone; use /api/users and /api/orders"}')
    live = re.search(r"^    respond:\n(      .*\n)+", text, re.MULTILINE)
    assert live is not None
    variants = re.findall(r"^    # [\w ]+: +(respond: .*)$", text, re.MULTILINE)
    answers = [parse_config(text.replace(live.group(0), f"    {variant}\n"), "example.yaml").routes[-1].answer
               for variant in variants]
    assert [(a.status, dict(a.headers)) for a in answers] == [
        (308, {b"location": b"https://docs.example.com/"}),
        (503, {b"retry-after": b"3600", b"content-type": b"text/plain; charset=utf-8"})]
    assert answers[1].body == b"Back at 14:00 UTC."


def test_the_example_config_protects_users_and_orders():
    config = load_config(str(EXAMPLE))
    policies = {r.prefix: route_auth(r) for r in config.routes}
    assert policies == {
        "/api/users": ("required", None),
        "/api/search": ("none", None),
        "/api/orders": ("required", frozenset({"admin"})),
        "/api/users/avatars": ("required", None),
        "/api/orders-legacy": ("required", frozenset({"admin"})),
        "/api/reports": ("forward", None),
        "/api/profile": ("required", None),
        "/api/v0": ("none", None),
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


def uncomment(text: str, header: str) -> str:
    """Uncomment the block that starts at the line `header` ("# redis:", "  # sentinel:") and
    goes on while lines start with its comment prefix and more indentation; lines stay put."""
    prefix = header[:header.index("# ") + 2]
    indent = len(prefix) - 2
    lines = text.split("\n")
    start = lines.index(header)
    end = start + 1
    while end < len(lines) and lines[end].startswith(prefix + "  "):
        end += 1
    for i in range(start, end):
        lines[i] = lines[i][:indent] + lines[i][indent + 2:]
    return "\n".join(lines)


def example_with_redis() -> str:
    """The example with its redis: section and redis-backed rate limit keys uncommented."""
    text = EXAMPLE.read_text()
    shared = uncomment(text, "# redis:")
    shared = re.sub(r"^  # (backend|sync_interval|on_redis_error|instances):", r"  \1:", shared,
                    flags=re.MULTILINE).replace("\n  backend: local\n", "\n  # backend: local\n")
    assert shared.count("\n") == text.count("\n") and shared.count("\n  backend: hybrid") == 1
    return shared


def test_the_examples_redis_settings_load_when_uncommented():
    """Uncommented, the redis: section and the hybrid settings are a valid config, given the password."""
    config = parse_config(example_with_redis(), "example.yaml", {"REDIS_PASSWORD": "from-env"})
    assert config.redis == RedisConfig(host="127.0.0.1", port=6379, db=0, password="from-env", timeout=0.2, pool_size=4)
    limits = config.rate_limits
    assert (limits.backend, limits.sync_interval, limits.on_redis_error, limits.instances) == ("hybrid", 0.1, "local", 2)
    assert set(limits.tiers) == {"free", "pro", "enterprise"}


def test_the_examples_redis_password_must_be_in_the_environment():
    text = example_with_redis()
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("  password_env: REDIS_PASSWORD"))
    assert errors(text, "example.yaml", environ={}) == [
        f"example.yaml:{line}: redis.password_env: environment variable REDIS_PASSWORD is not set or empty"]


def test_the_examples_sentinel_alternative_loads_in_place_of_the_url():
    text = example_with_redis().replace('\n  url: "redis://', '\n  # url: "redis://')
    config = parse_config(uncomment(text, "  # sentinel:"), "example.yaml", {"REDIS_PASSWORD": "from-env"})
    assert config.redis == RedisConfig(db=0, password="from-env", sentinel_master="mymaster", sentinel_hosts=(
        ("10.0.0.41", 26379), ("10.0.0.42", 26379), ("10.0.0.43", 26379)))
    # Both at once: exactly one of the two.
    both = uncomment(example_with_redis(), "  # sentinel:")
    (problem,) = errors(both, "example.yaml", environ={"REDIS_PASSWORD": "from-env"})
    assert problem.endswith(": redis: expected exactly one of url or sentinel")


def test_the_examples_manhole_block_needs_its_authorized_keys_file_when_uncommented():
    """Uncommented as shown, the manhole block fails on the authorized_keys file that does not
    exist here (and on the host key's directory, where that is missing too); the redis settings
    uncommented beside it are valid and add no problem of their own."""
    keys_path, host_key_path = "/etc/txgateway/manhole_authorized_keys", "/var/lib/txgateway/manhole_host_key"
    if Path(keys_path).exists():
        pytest.skip(f"{keys_path} exists on this machine")
    text = uncomment(example_with_redis(), "# manhole:")
    assert text.count("\n") == EXAMPLE.read_text().count("\n")
    lines = text.splitlines()
    keys_line = lines.index(f"  authorized_keys: {keys_path}   # OpenSSH format") + 1
    host_key_line = lines.index(f"  host_key: {host_key_path}   # ed25519, created (0600) on first start") + 1
    expected = [f"example.yaml:{keys_line}: manhole.authorized_keys: "
                f"cannot read {keys_path}: No such file or directory"]
    if not Path(host_key_path).parent.is_dir():
        expected.append(f"example.yaml:{host_key_line}: manhole.host_key: cannot create {host_key_path} "
                        f"(made on first start): directory {Path(host_key_path).parent} does not exist")
    assert errors(text, "example.yaml", environ={"REDIS_PASSWORD": "from-env"}) == expected


def test_the_examples_manhole_block_loads_with_a_real_key_file(tmp_path):
    keys = tmp_path / "manhole_authorized_keys"
    public = Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH", comment="ops@example")
    keys.write_bytes(b"# the operators\n" + public + b"\n")
    text = uncomment(EXAMPLE.read_text(), "# manhole:")
    text = text.replace("  authorized_keys: /etc/txgateway/manhole_authorized_keys", f"  authorized_keys: {keys}")
    text = text.replace("  host_key: /var/lib/txgateway/manhole_host_key", f"  host_key: {tmp_path}/host_key")
    assert text.count(str(tmp_path)) == 2
    config = parse_config(text, "example.yaml", {})
    assert config.manhole == ManholeConfig(authorized_keys=str(keys), host_key=f"{tmp_path}/host_key",
                                           endpoint="tcp:2222:interface=127.0.0.1")
    assert not (tmp_path / "host_key").exists()     # created on first start, not by checking the config


def test_the_examples_admin_token_comes_from_the_environment_when_uncommented():
    text = EXAMPLE.read_text().replace("\n  # token_env: TXGATEWAY_ADMIN_TOKEN", "\n  token_env: TXGATEWAY_ADMIN_TOKEN")
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if ln.startswith("  token_env: TXGATEWAY_ADMIN_TOKEN"))
    token = "t0ken-" + "x" * 26
    config = parse_config(text, "example.yaml", {"TXGATEWAY_ADMIN_TOKEN": token})
    assert config.admin == AdminConfig(endpoint="tcp:9901:interface=127.0.0.1", token=token)
    assert errors(text, "example.yaml", environ={}) == [
        f"example.yaml:{line}: admin.token_env: environment variable TXGATEWAY_ADMIN_TOKEN must hold a token "
        "of at least 16 characters (it is not set)"]


def test_the_example_rate_limits():
    config = load_config(str(EXAMPLE))
    limits = config.rate_limits
    assert limits.backend == "local" and limits.default_tier == "free" and limits.max_buckets == 100_000
    assert {name: (t.rate.count, t.rate.window, t.burst) for name, t in limits.tiers.items()} == {
        "free": (100, 3600, 100), "pro": (5000, 3600, 5000), "enterprise": (100000, 3600, 100000)}
    routes = {r.prefix: r.policies.get("rate_limit") for r in config.routes}
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
        (route, "prefix", "/"), (route, "upstream", "orders"), (route.policies["header_rules"].request, "set", ()),
        (upstream, "timeout", 0.0), (upstream.targets[0], "port", 1),
        (ConfigProblem("f", 1, "p", "m"), "line", 2),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, attr, value)
    assert isinstance(route.methods, (frozenset, type(None)))
    assert isinstance(config.routes, tuple) and isinstance(upstream.targets, tuple)
    assert isinstance(route.policies["header_rules"].security, tuple) and isinstance(route.policies["header_rules"].request.remove, tuple)
    assert isinstance(upstream, Upstream)
    with pytest.raises(TypeError):
        config.upstreams["users"] = upstream  # type: ignore[index]


# --- files named in the config: relative to the config file's directory --------------------

def test_relative_paths_are_read_from_the_config_files_directory_not_the_working_one(tmp_path, monkeypatch):
    """Every file the config names, relative, is found next to the config wherever the gateway
    or check-config runs from; the values hold the paths resolved."""
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    (etc / "logs").mkdir()
    ca = CertAuthority()
    ca.issue(etc / "tls", "api", "api.example.com")
    ca.write(etc / "tls" / "ca.pem")
    (etc / "jwt_secret").write_bytes(SECRET)
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    (etc / "signer.pem").write_bytes(key.public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo))
    (etc / "jwks.json").write_text(json.dumps({"keys": [json.loads(ECAlgorithm.to_jwk(key))]}))
    (etc / "api_keys.yaml").write_text(f'- {{hash: "{hash_api_key("k" * 32)}", id: ci}}\n')
    (etc / "authorized_keys").write_bytes(Key(ed25519.Ed25519PrivateKey.generate()).public().toString("OPENSSH"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    config = parse_config(cfg("""\
        listen:
          - endpoint: "tcp:8443"
            tls: {certificates: [{cert: tls/api.pem, key: tls/api.key}]}
        access_log: logs/access.log
        manhole: {authorized_keys: authorized_keys, host_key: manhole_host_key}
        auth:
          jwt:
            algorithms: [HS256, ES256]
            secret_file: jwt_secret
            public_keys: [signer.pem]
            jwks_file: ./jwks.json
          api_keys: {file: api_keys.yaml}
        upstreams:
          users: {targets: ["https://127.0.0.1:3001"], tls: {ca: tls/ca.pem, cert: tls/api.pem, key: tls/api.key}}
        routes:
          - {prefix: /api/users, upstream: users, auth: required}
        """), str(etc / "gw.yaml"), {})
    assert config.listen[0].tls is not None
    certificate = config.listen[0].tls.certificates[0]
    assert (certificate.cert, certificate.key) == (f"{etc}/tls/api.pem", f"{etc}/tls/api.key")
    assert config.upstreams["users"].tls == UpstreamTLS(ca=f"{etc}/tls/ca.pem", cert=f"{etc}/tls/api.pem",
                                                       key=f"{etc}/tls/api.key")
    assert config.access_log == f"{etc}/logs/access.log"
    assert config.manhole == ManholeConfig(authorized_keys=f"{etc}/authorized_keys", host_key=f"{etc}/manhole_host_key")
    assert config.auth is not None and config.auth.jwt is not None and config.auth.api_keys is not None
    assert config.auth.jwt.secret == SECRET
    assert len(config.auth.jwt.public_keys) == len(config.auth.jwt.jwks) == 1
    assert config.auth.api_keys.file == f"{etc}/api_keys.yaml"


def test_a_relative_path_that_is_missing_is_named_as_resolved(tmp_path):
    text = BASE + "auth:\n  api_keys: {file: keys/api_keys.yaml}\n"
    assert config_errors(text, str(tmp_path / "gw.yaml")) == [
        f"{tmp_path}/gw.yaml:10: auth.api_keys.file: cannot read {tmp_path}/keys/api_keys.yaml: No such file or directory"]


# --- access_log: a file the gateway can write ------------------------------------------------

def test_an_access_log_file_is_created_in_an_existing_directory(tmp_path):
    assert parse_config(BASE + f"access_log: {tmp_path}/access.log\n", "c.yaml").access_log == f"{tmp_path}/access.log"
    assert not (tmp_path / "access.log").exists()        # checked, not created, by loading the config
    (tmp_path / "access.log").write_text("")
    assert parse_config(BASE + f"access_log: {tmp_path}/access.log\n", "c.yaml").access_log == f"{tmp_path}/access.log"


@pytest.mark.parametrize("value", ["-", "off"])
def test_an_access_log_to_stdout_or_off_is_no_file(tmp_path, value):
    assert parse_config(BASE + f'access_log: "{value}"\n', str(tmp_path / "gw.yaml")).access_log == value


def test_an_access_log_in_a_directory_that_does_not_exist(tmp_path):
    assert config_errors(BASE + f"access_log: {tmp_path}/logs/access.log\n") == [
        f"c.yaml:9: access_log: cannot write {tmp_path}/logs/access.log: directory {tmp_path}/logs does not exist"]


def test_an_access_log_that_is_a_directory(tmp_path):
    assert config_errors(BASE + f"access_log: {tmp_path}\n") == [
        f"c.yaml:9: access_log: cannot write {tmp_path}: it is a directory"]


def test_an_access_log_under_a_file(tmp_path):
    (tmp_path / "logs").write_text("")
    assert config_errors(BASE + f"access_log: {tmp_path}/logs/access.log\n") == [
        f"c.yaml:9: access_log: cannot write {tmp_path}/logs/access.log: directory {tmp_path}/logs does not exist"]


def test_an_access_log_in_a_directory_that_cannot_be_written(tmp_path):
    directory = unwritable(tmp_path, "dir")
    assert config_errors(BASE + f"access_log: {directory}/access.log\n") == [
        f"c.yaml:9: access_log: cannot write {directory}/access.log: directory {directory} is not writable"]


def test_an_access_log_file_that_cannot_be_written(tmp_path):
    file = unwritable(tmp_path, "file")
    assert config_errors(BASE + f"access_log: {file}\n") == [
        f"c.yaml:9: access_log: cannot write {file}: it is not writable"]


def test_an_empty_access_log_path(tmp_path):
    assert config_errors(BASE + 'access_log: ""\n') == ["c.yaml:9: access_log: expected a file path, got an empty string"]


def test_access_log_fields_and_redact_are_read_in_order():
    config = parse_config(BASE + "access_log_fields: [status, path]\naccess_log_redact: []\n", "c.yaml")
    assert (config.access_log_fields, config.access_log_redact) == (("status", "path"), ())
    default = parse_config(BASE, "c.yaml")
    assert default.access_log_fields == FIELDS and "token" in default.access_log_redact


@pytest.mark.parametrize(("value", "problem"), [
    ("[status, bogus]", "c.yaml:9: access_log_fields[1]: expected one of " + ", ".join(FIELDS) + ", got 'bogus'"),
    ("[status, status]", "c.yaml:9: access_log_fields[1]: 'status' is listed twice"),
    ("[]", "c.yaml:9: access_log_fields: expected at least one field"),
    ("status", "c.yaml:9: access_log_fields: expected a list, got 'status'"),
    ("[[status]]", "c.yaml:9: access_log_fields[0]: expected a single value, got a list"),
])
def test_bad_access_log_fields(value, problem):
    assert config_errors(BASE + f"access_log_fields: {value}\n") == [problem]


def test_bad_access_log_redact():
    assert config_errors(BASE + "access_log_redact: [token, 3]\n") == [
        "c.yaml:9: access_log_redact[1]: expected a string, got 3"]


# --- problems in line order ---------------------------------------------------------------

def test_problems_come_in_line_order_whatever_order_the_sections_are_checked_in(tmp_path):
    """The sections are checked in dependency order (manhole and admin first, routes after
    upstreams, cross-checks last); the report follows the file from top to bottom."""
    text = cfg(f"""\
        listen: [{{endpoint: "tcp:80", bogus: 1}}]
        upstreams:
          users: {{targets: ["http://127.0.0.1:3001"], timeout: soon}}
        routes:
          - {{prefix: /api/users, upstream: nobody}}
        limits: {{max_body_size: lots}}
        rate_limits: {{backend: redis, tiers: {{free: {{rate: 1/second}}}}}}
        admin: {{endpoint: "tcp:admin"}}
        manhole: {{authorized_keys: {tmp_path}/nope, host_key: {tmp_path}/hk}}
        """)
    assert [line.split(": ")[0:2] for line in config_errors(text)] == [
        ["c.yaml:1", "listen[0].bogus"],
        ["c.yaml:3", "upstreams.users.timeout"],
        ["c.yaml:5", "routes[0].upstream"],
        ["c.yaml:6", "limits.max_body_size"],
        ["c.yaml:7", "rate_limits.backend"],
        ["c.yaml:8", "admin.endpoint"],
        ["c.yaml:9", "manhole.authorized_keys"],
    ]


def test_problems_of_a_keys_file_come_after_the_configs_own(tmp_path):
    keys = tmp_path / "api_keys.yaml"
    keys.write_text("- {id: ci}\n")
    text = BASE.replace("upstream: orders}", "upstream: nobody}") + f"auth:\n  api_keys: {{file: {keys}}}\n"
    assert config_errors(text) == [
        'c.yaml:8: routes[1].upstream: no upstream named "nobody" (defined: orders, users)',
        f"{keys}:1: keys[0]: each key needs hash and id (make the hash with: txgateway hash-key)",
    ]
