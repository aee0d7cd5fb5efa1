"""Request header names in config that could never be seen: the gateway drops request headers
whose names hold `_` (unless underscores_in_headers: true), so naming one for a filter to read
(an API key header, a rate-limit key, a cache key, CORS request headers, a canary header, forward
auth's headers_to_send) is refused at load with its file:line and key path."""

from __future__ import annotations

import pytest

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config

ROUTES = "routes:\n  - {prefix: /api/users, upstream: users}\n  - {prefix: /api/orders, upstream: orders}\n"
DROPPED = ('"{name}" has a "_": request headers with one are dropped unless underscores_in_headers: true, '
           "so it would never be seen")


def with_route(route: str, top: str = "") -> str:
    """BASE with its first route replaced by `route` (so on line 7), and `top` sections after."""
    return BASE.replace(ROUTES, f"routes:\n  - {route}\n  - {{prefix: /api/orders, upstream: orders}}\n") + top


TIERS = "rate_limits:\n  tiers: {free: {rate: 10/second}}\n"
CASES = [
    ("api key header", BASE + "auth:\n  api_keys: {header: X_Api_Key, file: keys.yaml}\n",
     "c.yaml:10: auth.api_keys.header", "X_Api_Key"),
    ("rate-limit key", with_route("{prefix: /api/users, upstream: users, rate_limit: {key: 'header:X_Tenant'}}", TIERS),
     "c.yaml:7: routes[0].rate_limit.key", "X_Tenant"),
    ("cache key", with_route("{prefix: /api/users, upstream: users, cache: {key: {headers: [Accept_Language]}}}"),
     "c.yaml:7: routes[0].cache.key.headers[0]", "Accept_Language"),
    ("cors request headers",
     with_route("{prefix: /api/users, upstream: users, cors: {origins: ['https://a.example'], headers: [X_Token]}}"),
     "c.yaml:7: routes[0].cors.headers[0]", "X_Token"),
    ("canary header", with_route("{prefix: /api/users, upstream: users, split: {upstream: orders, percent: 10, header: X_Canary}}"),
     "c.yaml:7: routes[0].split.header", "X_Canary"),
    ("forward auth", with_route("{prefix: /api/users, upstream: users, "
                                "auth: {forward: {upstream: orders, path: /verify, headers_to_send: [X_Session]}}}"),
     "c.yaml:7: routes[0].auth.forward.headers_to_send[0]", "X_Session"),
]


@pytest.mark.parametrize(("text", "where", "name"), [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_a_request_header_with_an_underscore_is_refused_while_such_headers_are_dropped(text, where, name):
    assert config_errors(text) == [f"{where}: " + DROPPED.format(name=name)]


@pytest.mark.parametrize("text", [case[1] for case in CASES[1:]], ids=[case[0] for case in CASES[1:]])
def test_the_same_names_load_when_underscores_in_headers_is_on(text):
    config = parse_config("underscores_in_headers: true\n" + text, "c.yaml")
    assert config.underscores_in_headers is True


def test_response_header_names_may_hold_underscores():
    config = parse_config(with_route("{prefix: /api/users, upstream: users, response_headers: {set: {X_Served_By: gw}}}"),
                          "c.yaml")
    assert config.routes[0].prefix == "/api/users"
