"""Per-route max_body_size, timeout and connect_timeout as the config reads them."""

from __future__ import annotations

import pytest

from txgateway.config.schema import ConfigError, parse_config

HEAD = """
listen: [{endpoint: "tcp:0"}]
limits: {max_body_size: 1MiB}
upstreams:
  users: {targets: ["http://127.0.0.1:9"], timeout: 5s, connect_timeout: 1s}
routes:
"""


def test_a_larger_route_limit_raises_what_transports_let_in_and_the_others_keep_the_global_one():
    config = parse_config(HEAD + """
  - {prefix: /api/uploads, upstream: users, max_body_size: 1GiB, timeout: 2m, connect_timeout: 3s}
  - {prefix: /api/users, upstream: users}
  - {prefix: /api/json, upstream: users, max_body_size: 64KiB}
""", "t.yaml")
    assert config.limits.largest_body == 2**30 and config.limits.max_body_size == 2**20
    assert [(r.max_body_size, r.timeout, r.connect_timeout) for r in config.routes] == [
        (2**30, 120.0, 3.0), (2**20, None, None), (64 * 1024, None, None)]


def test_smaller_route_limits_leave_other_routes_without_a_check_of_their_own():
    config = parse_config(HEAD + """
  - {prefix: /api/json, upstream: users, max_body_size: 64KiB}
  - {prefix: /api/users, upstream: users}
""", "t.yaml")
    assert config.limits.largest_body == 2**20
    assert [r.max_body_size for r in config.routes] == [64 * 1024, None]


@pytest.mark.parametrize(("route", "message"), [
    ("{prefix: /a, upstream: users, max_body_size: lots}",
     't.yaml:7: routes[0].max_body_size: expected a size like "512", "16KiB" or "10MiB", got "lots"'),
    ("{prefix: /a, upstream: users, timeout: 5}",
     't.yaml:7: routes[0].timeout: expected a duration like "250ms", "5s" or "1m", got "5"'),
    ("{prefix: /a, upstream: users, connect_timeout: soon}",
     't.yaml:7: routes[0].connect_timeout: expected a duration like "250ms", "5s" or "1m", got "soon"'),
    ("{prefix: /a, respond: {status: 200}, timeout: 5s}",
     "t.yaml:7: routes[0].timeout: a timeout for the upstream: this route has no upstream"),
])
def test_a_bad_route_limit_is_a_config_error_naming_file_line_and_key(route, message):
    with pytest.raises(ConfigError) as e:
        parse_config(HEAD + f"  - {route}\n", "t.yaml")
    assert str(e.value).splitlines() == [message]


def test_a_routes_timeouts_apply_to_both_upstreams_of_its_split_and_its_connect_attempts():
    from twisted.internet.testing import MemoryReactorClock

    from txgateway.core.timeouts import Deadlines
    from txgateway.upstream.config import PROXY
    from txgateway.upstream.proxy import Proxy
    config = parse_config("""
listen: [{endpoint: "tcp:0"}]
upstreams:
  orders: {targets: ["http://127.0.0.1:9"], timeout: 5s, connect_timeout: 1s}
  orders-v2: {targets: ["http://127.0.0.1:10"], timeout: 7s, connect_timeout: 500ms}
routes:
  - {prefix: /api/orders, upstream: orders, timeout: 2m, connect_timeout: 45s, split: {upstream: orders-v2, percent: 5}}
  - {prefix: /api/other, upstream: orders, split: {upstream: orders-v2, percent: 5}}
""", "t.yaml")
    reactor = MemoryReactorClock()
    proxy = Proxy(reactor, reactor, config.upstreams, Deadlines(reactor), config.limits)
    timed, plain = (PROXY.make(proxy, route.answer, route) for route in config.routes)
    assert timed.by_upstream == {"orders": (45.0, 120.0), "orders-v2": (45.0, 120.0)}
    assert plain is proxy
    # The connect attempt's own backstop (the reactor's timeout) follows the route's value too.
    from txgateway.testing import make_ctx
    for terminal, path, backstop in ((timed, "/api/orders/1", 75.0), (plain, "/api/other/1", 31.0)):
        ctx = make_ctx(config, path)
        terminal.forward(ctx)
        assert ctx.forwarding.connect_timeout == backstop - 30
        assert reactor.tcpClients[-1][3] == backstop
