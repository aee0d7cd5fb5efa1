"""Forward auth in memory: its config's checks (file:line:key), the decision cache (task.Clock)
and how answers become decisions."""

from __future__ import annotations

from twisted.internet.task import Clock

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config
from txgateway.filters.auth.forward import Decision, DecisionCache, decide
from txgateway.filters.auth.forwardconfig import ForwardAuthConfig


def route(auth: str, extra: str = "") -> str:
    return BASE + f"  - {{prefix: /a, upstream: users, auth: {auth}{extra}}}\n"


def test_mistakes_are_named_with_file_line_and_key():
    assert config_errors(route("{forward: {upstream: nope, path: verify, headers_to_send: [\"X Bad\"], "
                               "cache_ttl: soon, cache_size: 0, url: x}}")) == [
        "c.yaml:9: routes[2].auth.forward.url: unknown key (expected one of: cache_size, cache_ttl, "
        "headers_from_response, headers_to_send, path, upstream)",
        'c.yaml:9: routes[2].auth.forward.upstream: no upstream named "nope" (defined: orders, users)',
        'c.yaml:9: routes[2].auth.forward.path: expected a path like "/auth/verify", got "verify"',
        'c.yaml:9: routes[2].auth.forward.headers_to_send[0]: expected a header name like "X-Api-Version", '
        'got "X Bad"',
        'c.yaml:9: routes[2].auth.forward.cache_ttl: expected a duration like "250ms", "5s" or "1m", got "soon"',
        "c.yaml:9: routes[2].auth.forward.cache_size: expected an integer >= 1, got 0",
    ]
    assert config_errors(route("{forward: {path: /v}}")) == [
        "c.yaml:9: routes[2].auth.forward.upstream: missing (required): the upstream that runs the auth service"]
    assert config_errors(route("{backward: {}}")) == [
        "c.yaml:9: routes[2].auth.backward: unknown key (expected one of: forward)",
        "c.yaml:9: routes[2].auth: expected none, optional, required or {forward: {...}}"]


def test_forward_needs_no_auth_section_and_takes_roles():
    config = parse_config(route("{forward: {upstream: orders, cache_ttl: 30s}}", ", roles: [admin]"), "t.yaml")
    policy = config.routes[2].policies["auth"]
    assert policy.mode == "forward" and policy.roles == frozenset({"admin"})
    assert policy.forward == ForwardAuthConfig("orders", cache_ttl=30.0)


def test_decisions_expire_after_the_ttl_and_the_oldest_goes_when_full():
    clock = Clock()
    cache = DecisionCache(ttl=30, size=2, clock=clock)
    admit, refuse = Decision(200), Decision(401)
    cache.put(b"a", admit)
    clock.advance(10)
    cache.put(b"b", refuse)
    assert (cache.get(b"a"), cache.get(b"b")) == (admit, refuse)
    clock.advance(5)
    cache.put(b"c", admit)                          # full: "a", the oldest, goes
    assert (cache.get(b"a"), cache.get(b"c"), len(cache)) == (None, admit, 2)
    clock.advance(24.9)
    assert cache.get(b"b") == refuse
    clock.advance(0.1)                              # "b" was kept at 10: 30 s later it is gone
    assert cache.get(b"b") is None and cache.get(b"c") == admit
    clock.advance(5)
    assert cache.get(b"c") is None and len(cache) == 0
    off = DecisionCache(ttl=0, size=10, clock=clock)
    off.put(b"a", admit)
    assert off.get(b"a") is None


def test_answers_become_decisions_and_nothing_else_admits():
    config = ForwardAuthConfig("auth", headers_from_response=(b"x-user-id", b"x-scopes"))
    admitted = decide(204, [(b"x-user-id", b"alice"), (b"x-user-tier", b"pro"), (b"x-scopes", b"read"),
                            (b"x-other", b"1")], config)
    assert admitted is not None and admitted.identity is not None
    assert (admitted.identity.user_id, admitted.identity.tier, admitted.identity.source) == ("alice", "pro", "forward")
    assert admitted.headers == ((b"x-user-id", b"alice"), (b"x-user-tier", b"pro"), (b"x-scopes", b"read"))
    assert decide(200, [], config) == Decision(200)           # admitted without an identity
    assert decide(401, [(b"www-authenticate", b"Basic")], config) == Decision(401, ((b"www-authenticate", b"Basic"),))
    assert [decide(status, [], config) for status in (302, 404, 418, 500, 503)] == [None] * 5
    assert decide(200, [(b"x-user-id", b"a\x01b")], config) is None
