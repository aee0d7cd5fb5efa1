"""The route split (filters/split.py) in memory, built from real configs by the test kit:
10 000 requests within 1% of the configured share, stickiness, the header, config errors."""

from __future__ import annotations

from collections import Counter

import pytest

from txgateway.config.schema import ConfigError, parse_config
from txgateway.filters.auth.tokens import Identity
from txgateway.testing import make_ctx, route_filters, run_filter

CONFIG = """
listen: [{endpoint: "tcp:0"}]
upstreams:
  orders: {targets: ["http://127.0.0.1:9"]}
  orders-v2: {targets: ["http://127.0.0.1:10"]}
routes:
  - prefix: /api/orders
    upstream: orders
    split: {upstream: orders-v2, percent: %s%s}
  - {prefix: /api/other, upstream: orders}
"""


def split_config(percent: float, extra: str = ""):
    return parse_config(CONFIG % (percent, extra), "t.yaml")


def side(config, path="/api/orders/1", **kw) -> str:
    ctx = make_ctx(config, path, **kw)
    split = route_filters(config, "split").get(ctx)
    if split is not None:
        assert run_filter(split, ctx) is None
    return ctx.upstream


@pytest.mark.parametrize("percent", [5, 12.5, 50, 95])
def test_without_a_sticky_key_the_share_is_exact_over_10000_requests(percent):
    config = split_config(percent)
    ctx_filter = route_filters(config, "split")
    counts = Counter()
    for i in range(10_000):
        ctx = make_ctx(config, f"/api/orders/{i}")
        run_filter(ctx_filter.get(ctx), ctx)
        counts[ctx.upstream] += 1
    assert counts["orders-v2"] == round(percent * 100)
    assert counts["orders"] == 10_000 - round(percent * 100)


@pytest.mark.parametrize("percent", [5, 30])
def test_sticky_by_user_holds_the_share_within_one_percent_and_a_user_never_changes_side(percent):
    config = split_config(percent, ", sticky: user")
    sides = {}
    for i in range(10_000):
        user = f"user-{i}"
        sides[user] = side(config, identity=Identity(user, None, None, "jwt"))
    share = sum(1 for s in sides.values() if s == "orders-v2") / 10_000
    assert abs(share - percent / 100) < 0.01, share
    for i in range(0, 10_000, 97):                       # again, from other addresses: the same side
        user = f"user-{i}"
        assert side(config, identity=Identity(user, None, None, "jwt"), client_ip=f"10.0.{i % 250}.9") == sides[user]


def test_sticky_by_user_falls_back_to_the_client_address_and_client_ip_ignores_the_user():
    config = split_config(50, ", sticky: client_ip")
    by_address = {f"10.1.{i // 250}.{i % 250}": side(config, client_ip=f"10.1.{i // 250}.{i % 250}")
                  for i in range(10_000)}
    share = sum(1 for s in by_address.values() if s == "orders-v2") / 10_000
    assert abs(share - 0.5) < 0.01, share
    address, expected = next(iter(by_address.items()))
    for user in ("a", "b", "c", "d"):
        assert side(config, client_ip=address, identity=Identity(user, None, None, "jwt")) == expected
    anonymous = split_config(50, ", sticky: user")
    assert {side(anonymous, client_ip=address) for _ in range(20)} == {side(anonymous, client_ip=address)}


def test_the_header_chooses_a_side_and_other_values_leave_it_to_the_share():
    config = split_config(0, ", header: X-Canary")
    assert side(config, headers=[(b"x-canary", b"1")]) == "orders-v2"
    assert side(config, headers=[(b"x-canary", b"0")]) == "orders"
    assert side(config, headers=[(b"x-canary", b"yes")]) == "orders"         # 0%: the route's own
    full = split_config(100, ", header: X-Canary")
    assert side(full, headers=[(b"x-canary", b"0")]) == "orders"
    assert side(full) == "orders-v2"


def test_a_route_without_split_has_no_split_filter():
    config = split_config(50)
    assert route_filters(config, "split").get(make_ctx(config, "/api/other/1")) is None


@pytest.mark.parametrize(("split", "message"), [
    ("{upstream: nope, percent: 5}", 't.yaml:8: routes[0].split.upstream: no upstream named "nope"'),
    ("{upstream: orders-v2, percent: 101}", "t.yaml:8: routes[0].split.percent: expected a number from 0 to 100, got 101"),
    ("{upstream: orders-v2}", "t.yaml:8: routes[0].split.percent: missing (required)"),
    ("{upstream: orders-v2, percent: 5, sticky: cookie}",
     "t.yaml:8: routes[0].split.sticky: expected one of user, client_ip, got 'cookie'"),
    ("{upstream: orders-v2, percent: 5, header: 'X Canary'}",
     't.yaml:8: routes[0].split.header: expected a header name like "X-Api-Version", got "X Canary"'),
    ("{upstream: orders-v2, percent: 5, weight: 2}", "t.yaml:8: routes[0].split.weight"),
])
def test_a_bad_split_is_a_config_error_naming_file_line_and_key(split, message):
    text = f"""
listen: [{{endpoint: "tcp:0"}}]
upstreams:
  orders: {{targets: ["http://127.0.0.1:9"]}}
  orders-v2: {{targets: ["http://127.0.0.1:10"]}}
routes:
  - prefix: /api/orders
    split: {split}
    upstream: orders
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    assert message in str(e.value)


def test_a_split_needs_a_proxy_route():
    text = """
listen: [{endpoint: "tcp:0"}]
upstreams:
  orders-v2: {targets: ["http://127.0.0.1:10"]}
routes:
  - prefix: /api/orders
    respond: {status: 200}
    split: {upstream: orders-v2, percent: 5}
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    assert "t.yaml:6: routes[0].split: splits between upstreams: the route needs upstream:" in str(e.value)
