"""IP rules in memory: the config's checks (file:line:key) and the decision on the client address."""

from __future__ import annotations

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config
from txgateway.testing import make_ctx, route_filters, run_filter

ROUTES = "  - {prefix: /admin, upstream: users, ip_allow: [10.0.0.0/8, \"fd00::/8\"], ip_deny: [10.9.0.0/16]}\n"


def test_bad_addresses_and_empty_lists_are_named_with_file_line_and_key():
    text = BASE + "  - {prefix: /a, upstream: users, ip_allow: [10.0.0.0/33], ip_deny: []}\n" \
                  "ip_rules: {ip_deny: [\"nope\"], ip_alow: [1.2.3.4]}\n"
    assert config_errors(text) == [
        'c.yaml:9: routes[2].ip_allow[0]: expected an address or CIDR like "10.0.0.0/8", got "10.0.0.0/33"',
        "c.yaml:9: routes[2].ip_deny: expected at least one address or CIDR (leave the key out for none)",
        "c.yaml:10: ip_rules.ip_alow: unknown key (expected one of: ip_allow, ip_deny)",
        'c.yaml:10: ip_rules.ip_deny[0]: expected an address or CIDR like "10.0.0.0/8", got "nope"',
    ]


def test_an_empty_section_is_refused():
    assert config_errors(BASE + "ip_rules: {}\n") == ["c.yaml:9: ip_rules: expected ip_allow and/or ip_deny"]


def test_deny_wins_allow_lists_the_only_addresses_and_ipv4_mapped_addresses_count_as_ipv4():
    config = parse_config(BASE + ROUTES, "t.yaml")
    verdicts = {}
    for ip in ("10.1.2.3", "10.9.0.1", "192.0.2.1", "fd00::1", "2001:db8::1", "::ffff:10.1.2.3", "garbage"):
        ctx = make_ctx(config, "/admin/x", client_ip=ip)
        answer = run_filter(route_filters(config, "ip_rules").get(ctx), ctx)
        verdicts[ip] = None if answer is None else (answer.status, ctx.error_code)
    assert verdicts == {"10.1.2.3": None, "10.9.0.1": (403, "FORBIDDEN"), "192.0.2.1": (403, "FORBIDDEN"),
                        "fd00::1": None, "2001:db8::1": (403, "FORBIDDEN"), "::ffff:10.1.2.3": None,
                        "garbage": (403, "FORBIDDEN")}


def test_routes_without_rules_have_no_filter_unless_ip_rules_applies_everywhere():
    config = parse_config(BASE + ROUTES, "t.yaml")
    assert route_filters(config, "ip_rules").get(make_ctx(config, "/api/users")) is None
    config = parse_config(BASE + ROUTES + "ip_rules: {ip_deny: [192.0.2.0/24]}\n", "t.yaml")
    filters = route_filters(config, "ip_rules")
    ctx = make_ctx(config, "/api/users", client_ip="192.0.2.5")
    assert run_filter(filters.get(ctx), ctx).status == 403
    ctx = make_ctx(config, "/admin/x", client_ip="192.0.2.5")     # the section's deny on a route with its own rules
    assert run_filter(filters.get(ctx), ctx).status == 403
