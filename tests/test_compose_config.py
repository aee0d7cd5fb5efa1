"""`compose:` config: every mistake is reported with file:line: key, before anything runs."""

from __future__ import annotations

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config


def compose(calls: str, head: str = "") -> str:
    return BASE + f"""\
  - prefix: /api/profile
    compose:
      path: /{{id}}
{head}      calls:
{calls}"""


def test_a_valid_composed_route_parses_with_its_calls_in_order():
    config = parse_config(compose("""\
        user: {upstream: users, path: "/users/{id}"}
        orders: {upstream: orders, path: "/orders?customer={user.customer_id}", after: user, group: orders,
                 required: false, fallback: []}
""", "      deadline: 2s\n      max_body_size: 64KiB\n"), "c.yaml")
    route = config.routes[-1]
    settings = route.answer
    assert route.terminal == "compose" and route.upstream is None
    assert [c.name for c in settings.calls] == ["user", "orders"]
    assert settings.deadline == 2.0 and settings.max_body_size == 65536
    orders = settings.calls[1]
    assert orders.after == ("user",) and orders.group == "orders" and not orders.required
    assert orders.has_fallback and orders.fallback == []


def test_a_cycle_in_after_is_reported_at_its_first_after():
    assert config_errors(compose("""\
        a: {upstream: users, path: "/a", after: c}
        b: {upstream: users, path: "/b", after: a}
        c: {upstream: users, path: "/c", after: [b]}
""")) == ["c.yaml:13: routes[2].compose.calls.a.after: calls wait for each other in a cycle: a -> c -> b -> a"]


def test_after_names_a_call_that_exists_and_not_itself():
    assert config_errors(compose("""\
        a: {upstream: users, path: "/a", after: nope}
        b: {upstream: users, path: "/b", after: b}
""")) == ['c.yaml:13: routes[2].compose.calls.a.after: no call named "nope" (calls: a, b)',
          "c.yaml:14: routes[2].compose.calls.b.after: b cannot wait for itself"]


def test_a_template_names_only_values_that_exist_and_answers_it_waits_for():
    assert config_errors(compose("""\
        a: {upstream: users, path: "/a/{b.id}"}
        b: {upstream: users, path: "/b/{nope}"}
""")) == ["c.yaml:13: routes[2].compose.calls.a.path: {b.id} uses the answer of b: add after: b",
          "c.yaml:14: routes[2].compose.calls.b.path: {nope} names no value (expected one of: id, user_id, "
          "user_role, user_tier, query.NAME, a.FIELD)"]


def test_template_literals_and_upstreams_are_checked():
    assert config_errors(compose("""\
        a: {upstream: users, path: "/a/../admin"}
        b: {upstream: nowhere, path: "b"}
""")) == ["c.yaml:13: routes[2].compose.calls.a.path: '/a/../admin' has a dot segment",
          'c.yaml:14: routes[2].compose.calls.b.upstream: no upstream named "nowhere" (defined: orders, users)',
          "c.yaml:14: routes[2].compose.calls.b.path: expected a path starting with \"/\", got 'b'"]


def test_one_call_is_not_a_composition_and_a_fallback_needs_an_optional_call():
    assert config_errors(compose("""\
        a: {upstream: users, path: "/a", fallback: {}}
""")) == ["c.yaml:13: routes[2].compose.calls: expected at least two calls (one call is a proxied route)",
          "c.yaml:13: routes[2].compose.calls.a.fallback: a fallback is for an optional call: add required: false"]


def test_compose_and_upstream_exclude_each_other():
    errors = config_errors(BASE + """\
  - prefix: /api/profile
    upstream: users
    compose: {calls: {a: {upstream: users, path: /a}, b: {upstream: users, path: /b}}}
""")
    assert errors == ["c.yaml:11: routes[2].compose: a route has one answerer: upstream and compose exclude each other"]
