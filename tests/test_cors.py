"""CORS in memory: the config's checks (file:line:key) and origin patterns."""

from __future__ import annotations

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config


def cors(value: str) -> str:
    return BASE + f"  - {{prefix: /a, upstream: users, cors: {value}}}\n"


def test_mistakes_are_named_with_file_line_and_key():
    assert config_errors(cors('{origins: ["https://app.example.com/path", "*.example.com"], methods: ["GE T"], '
                              'headers: ["X Bad"], max_age: soon, credentials: yes please, exposed: []}')) == [
        "c.yaml:9: routes[2].cors.exposed: unknown key (expected one of: credentials, expose_headers, headers, "
        "max_age, methods, origins)",
        'c.yaml:9: routes[2].cors.origins[0]: expected an origin like "https://app.example.com" or '
        '"https://*.example.com" (scheme and host, no path; "*." only before the domain), or "*", got "https://app.example.com/path"',
        'c.yaml:9: routes[2].cors.origins[1]: expected an origin like "https://app.example.com" or '
        '"https://*.example.com" (scheme and host, no path; "*." only before the domain), or "*", got "*.example.com"',
        "c.yaml:9: routes[2].cors.credentials: expected true or false, got 'yes please'",
        'c.yaml:9: routes[2].cors.methods[0]: expected an upper-case HTTP method like "GET", got "GE T"',
        'c.yaml:9: routes[2].cors.headers[0]: expected a header name like "X-Api-Version", got "X Bad"',
        'c.yaml:9: routes[2].cors.max_age: expected a duration like "250ms", "5s" or "1m", got "soon"',
    ]


def test_credentials_with_any_origin_and_no_origins_are_refused():
    assert config_errors(cors('{origins: ["*"], credentials: true}')) == [
        'c.yaml:9: routes[2].cors.origins: credentials: true with any origin ("*") would let every web site call '
        "this route as its visitors; list the origins"]
    assert config_errors(cors("{origins: []}")) == ["c.yaml:9: routes[2].cors.origins: expected at least one origin"]
    assert config_errors(cors("{methods: [GET]}")) == [
        'c.yaml:9: routes[2].cors.origins: missing (required): the origins allowed, e.g. ["https://app.example.com"]']


def test_a_star_stands_for_subdomain_labels_only():
    assert config_errors(cors('{origins: ["https://*example.com", "https://a.*.example.com"]}')) == [
        f'c.yaml:9: routes[2].cors.origins[{i}]: expected an origin like "https://app.example.com" or '
        f'"https://*.example.com" (scheme and host, no path; "*." only before the domain), or "*", got "{origin}"'
        for i, origin in enumerate(("https://*example.com", "https://a.*.example.com"))]
    policy = parse_config(cors('{origins: ["https://*.Example.com", "http://LocalHost:3000"]}'), "t.yaml") \
        .routes[2].policies["cors"]
    assert [policy.allows(o) for o in (b"https://a.example.com", b"https://a.b.example.com",
                                       b"http://localhost:3000")] == [True, True, True]
    assert [policy.allows(o) for o in (b"https://example.com", b"http://a.example.com", b"https://a.example.com:8443",
                                       b"https://evil.net/.example.com", b"https://a.example.com.evil.net",
                                       b"http://localhost:3001", b"null")] == [False] * 7
