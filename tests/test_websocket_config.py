"""Routes' `websocket:` (filters/websocket.py): its values and every error with file:line: key."""

from __future__ import annotations

import pytest

from tests.configcheck import config_errors
from txgateway.config.schema import parse_config
from txgateway.filters.websocket import WebSocketPolicy

# Lines 1-8 (the route under test from line 7); its websocket: key is line 9.
HEAD = """\
listen:
  - endpoint: "tcp:8080"
upstreams:
  ws: {targets: ["http://127.0.0.1:3001"]}
routes:
  - {prefix: /plain, upstream: ws}
  - prefix: /ws
    upstream: ws
"""


def policy(section: str) -> WebSocketPolicy | None:
    (_, route) = parse_config(HEAD + section, "c.yaml", {}).routes
    return route.policies.get("websocket")


def test_no_websocket_key_no_filter():
    assert policy("") is None


def test_values():
    assert policy('    websocket: {origins: ["https://App.Example.com", "http://[::1]:8080"], max_tunnels: 100,'
                  " max_tunnels_per_client: 5}\n") == WebSocketPolicy(
        frozenset({b"https://app.example.com", b"http://[::1]:8080"}), 100, 5)
    assert policy("    websocket: {max_tunnels_per_client: 1}\n") == WebSocketPolicy(None, None, 1)
    assert policy("    websocket: {origins: []}\n") == WebSocketPolicy(frozenset(), None, None)


@pytest.mark.parametrize(("section", "expected"), [
    ("    websocket: {}\n", "c.yaml:9: routes[1].websocket: expected at least one of origins, max_tunnels, "
                           "max_tunnels_per_client"),
    ("    websocket: {origins: https://app.test}\n", "c.yaml:9: routes[1].websocket.origins: expected a list, "
                                                   "got 'https://app.test'"),
    ('    websocket: {origins: ["https://app.test/"]}\n',
     'c.yaml:9: routes[1].websocket.origins[0]: expected an origin like "https://app.example.com" (scheme, host '
     "and optional port; no path), got 'https://app.test/'"),
    ('    websocket: {origins: ["app.test"]}\n',
     'c.yaml:9: routes[1].websocket.origins[0]: expected an origin like "https://app.example.com" (scheme, host '
     "and optional port; no path), got 'app.test'"),
    ("    websocket: {max_tunnels: 0}\n", "c.yaml:9: routes[1].websocket.max_tunnels: expected an integer >= 1, got 0"),
    ("    websocket: {max_tunnels_per_client: many}\n",
     "c.yaml:9: routes[1].websocket.max_tunnels_per_client: expected an integer >= 1, got 'many'"),
    ("    websocket: {origin: [https://app.test]}\n",
     "c.yaml:9: routes[1].websocket.origin: unknown key (expected one of: max_tunnels, max_tunnels_per_client, "
     "origins)"),
])
def test_errors(section, expected):
    assert config_errors(HEAD + section, environ={}) == [expected]
