"""An upstream's resilience keys (`upstreams:`): `balance`, `retries`, `circuit_breaker`,
`health_check`, `passive_health`, read through `parse_config`, and every error exactly as
`check-config` prints it (file:line: key.path: message)."""

from __future__ import annotations

import textwrap

import pytest

from tests.configcheck import config_errors
from txgateway.config.schema import ConfigError, parse_config
from txgateway.transport.tlsconfig import UpstreamTLS
from txgateway.upstream.breaker import BreakerSettings
from txgateway.upstream.resilienceconfig import HealthCheck, PassiveHealth

DURATION = 'expected a duration like "250ms", "5s" or "1m", got'
CB = "upstreams.users.circuit_breaker"
HC = "upstreams.users.health_check"
PH = "upstreams.users.passive_health"
CB_KEYS = ("consecutive_failures, failure_ratio, failure_statuses, half_open_requests, max_open_for, "
           "min_requests, open_for, window")

# Line numbers matter: the upstream's own keys start at line 8.
HEAD = """\
listen:
  - endpoint: "tcp:8080"
routes:
  - {prefix: /api/users, upstream: users}
upstreams:
  users:
    targets: ["http://127.0.0.1:3001", "http://127.0.0.1:3002"]
"""


def text(body: str) -> str:
    """HEAD and the upstream keys in `body`; its first line is line 8."""
    return HEAD + textwrap.indent(textwrap.dedent(body), "    ")


def users(body: str):
    return parse_config(text(body), "c.yaml").upstreams["users"]


def errors(body: str) -> list[str]:
    return config_errors(text(body))


def test_head_alone_loads_with_the_defaults():
    u = users("")
    assert (u.balance, u.retries, u.circuit_breaker, u.health_check) == ("round_robin", 0, None, None)
    assert u.passive_health == PassiveHealth(consecutive_failures=5, eject_for=10.0, max_eject_for=300.0)


# --- balance and retries ------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["round_robin", "least_request", "random"])
def test_each_balance_policy_loads(policy):
    assert users(f"balance: {policy}\n").balance == policy


@pytest.mark.parametrize(("value", "shown"), [("fastest", "'fastest'"), ("Random", "'Random'"), ("1", "1"),
                                               ("[random]", None)])
def test_a_bad_balance_policy(value, shown):
    message = (f"expected one of round_robin, least_request, random, got {shown}" if shown
               else "expected a single value, got a list")
    assert errors(f"balance: {value}\n") == [f"c.yaml:8: upstreams.users.balance: {message}"]


@pytest.mark.parametrize("n", [0, 1, 10])
def test_retries_from_0_to_10(n):
    assert users(f"retries: {n}\n").retries == n


@pytest.mark.parametrize(("value", "message"), [
    ("11", "expected at most 10, got 11"),
    ("-1", "expected an integer >= 0, got -1"),
    ("1.5", "expected an integer >= 0, got 1.5"),
    ("yes", "expected an integer >= 0, got True"),
])
def test_bad_retries(value, message):
    assert errors(f"retries: {value}\n") == [f"c.yaml:8: upstreams.users.retries: {message}"]


# --- circuit_breaker ----------------------------------------------------------------------

def test_an_empty_circuit_breaker_takes_the_defaults():
    settings = users("circuit_breaker: {}\n").circuit_breaker
    assert settings == BreakerSettings()
    assert (settings.consecutive_failures, settings.failure_ratio, settings.window, settings.min_requests,
            settings.open_for, settings.max_open_for, settings.half_open_requests, settings.failure_statuses,
            settings.jitter) == (5, 0.5, 10.0, 20, 30.0, 300.0, 1, frozenset({502, 503, 504}), 0.1)


def test_every_circuit_breaker_field_is_read():
    settings = users("""\
        circuit_breaker:
          consecutive_failures: 3
          failure_ratio: 0.25
          window: 1m
          min_requests: 50
          open_for: 500ms
          max_open_for: 2m
          half_open_requests: 4
          failure_statuses: [500, 502, 429]
        """).circuit_breaker
    assert settings == BreakerSettings(consecutive_failures=3, failure_ratio=0.25, window=60.0, min_requests=50,
                                       open_for=0.5, max_open_for=120.0, half_open_requests=4,
                                       failure_statuses=frozenset({500, 502, 429}))


def test_the_readme_circuit_breaker_example_loads():
    settings = users("""\
        circuit_breaker:
          consecutive_failures: 5
          failure_ratio: 0.5
          window: 10s
          min_requests: 20
          open_for: 30s
          max_open_for: 5m
          half_open_requests: 1
          failure_statuses: [502, 503, 504]
        """).circuit_breaker
    assert settings == BreakerSettings()


@pytest.mark.parametrize("value", ["null", "~", "off"])
def test_failure_ratio_off_trips_on_consecutive_failures_only(value):
    assert users(f"circuit_breaker: {{failure_ratio: {value}}}\n").circuit_breaker.failure_ratio is None


@pytest.mark.parametrize("value", ["0.01", "1", "1.0"])
def test_failure_ratio_bounds_are_inclusive(value):
    assert users(f"circuit_breaker: {{failure_ratio: {value}}}\n").circuit_breaker.failure_ratio == float(value)


def test_an_empty_failure_statuses_list_leaves_only_connection_errors_and_timeouts():
    assert users("circuit_breaker: {failure_statuses: []}\n").circuit_breaker.failure_statuses == frozenset()


def test_open_for_equal_to_max_open_for_is_accepted():
    settings = users("circuit_breaker: {open_for: 1m, max_open_for: 1m}\n").circuit_breaker
    assert (settings.open_for, settings.max_open_for) == (60.0, 60.0)


def test_bad_circuit_breaker_values_each_named_on_their_line():
    assert errors("""\
        circuit_breaker:
          consecutive_failures: 0
          failure_ratio: 1.5
          window: "10"
          min_requests: 0
          open_for: 1m
          max_open_for: 30s
          half_open_requests: many
          failure_statuses: [502, 700]
        """) == [
        # in line order, whatever order the fields are checked in
        f"c.yaml:9: {CB}.consecutive_failures: expected an integer >= 1, got 0",
        f"c.yaml:10: {CB}.failure_ratio: expected a number from 0.01 to 1.0, got 1.5",
        f'c.yaml:11: {CB}.window: {DURATION} "10"',
        f"c.yaml:12: {CB}.min_requests: expected an integer >= 1, got 0",
        f"c.yaml:14: {CB}.max_open_for: must be at least open_for (60s); it is 30s",
        f"c.yaml:15: {CB}.half_open_requests: expected an integer >= 1, got 'many'",
        f"c.yaml:16: {CB}.failure_statuses[1]: expected an HTTP status 100-599, got 700",
    ]


@pytest.mark.parametrize(("field", "message"), [
    ("consecutive_failures: 0", "consecutive_failures: expected an integer >= 1, got 0"),
    ("consecutive_failures: 2.5", "consecutive_failures: expected an integer >= 1, got 2.5"),
    ("failure_ratio: 1.5", "failure_ratio: expected a number from 0.01 to 1.0, got 1.5"),
    ("failure_ratio: 0", "failure_ratio: expected a number from 0.01 to 1.0, got 0"),
    ("failure_ratio: half", "failure_ratio: expected a number from 0.01 to 1.0, got 'half'"),
    ("failure_ratio: false", "failure_ratio: expected a number from 0.01 to 1.0, got False"),
    ('window: "10"', f'window: {DURATION} "10"'),
    ("window: 10", f'window: {DURATION} "10"'),
    ("window: 0ms", "window: expected at least 1ms, got 0ms"),
    ("open_for: soon", f'open_for: {DURATION} "soon"'),
    ("max_open_for: 10s", "max_open_for: must be at least open_for (30s); it is 10s"),    # below the default open_for
    ("open_for: 10m", "max_open_for: must be at least open_for (600s); it is 300s by default"),       # above the default max_open_for
    ("half_open_requests: 0", "half_open_requests: expected an integer >= 1, got 0"),
    ("failure_statuses: [503, 700]", "failure_statuses[1]: expected an HTTP status 100-599, got 700"),
    ("failure_statuses: [99]", "failure_statuses[0]: expected an integer >= 100, got 99"),
    ('failure_statuses: ["503"]', "failure_statuses[0]: expected an integer >= 100, got '503'"),
    ("failure_statuses: 503", "failure_statuses: expected a list, got '503'"),
])
def test_one_bad_circuit_breaker_field(field, message):
    assert errors(f"circuit_breaker:\n  {field}\n") == [f"c.yaml:9: {CB}.{message}"]


def test_circuit_breaker_must_be_a_mapping_of_known_keys():
    assert errors("circuit_breaker: true\n") == [f"c.yaml:8: {CB}: expected a mapping, got 'true'"]
    assert errors("circuit_breaker:\n  consecutive: 3\n") == [
        f"c.yaml:9: {CB}.consecutive: unknown key (expected one of: {CB_KEYS})"]
    assert errors("circuit_breaker:\n  jitter: 0.2\n") == [
        f"c.yaml:9: {CB}.jitter: unknown key (expected one of: {CB_KEYS})"]


# --- health_check -------------------------------------------------------------------------

def test_health_check_needs_only_a_path():
    assert users("health_check: {path: /healthz}\n").health_check == HealthCheck(
        path=b"/healthz", interval=5.0, timeout=2.0, healthy_threshold=2, unhealthy_threshold=3)


def test_every_health_check_field_is_read():
    check = users("""\
        health_check:
          path: /status/ready?deep=1
          interval: 10s
          timeout: 750ms
          healthy_threshold: 1
          unhealthy_threshold: 4
        """).health_check
    assert check == HealthCheck(path=b"/status/ready?deep=1", interval=10.0, timeout=0.75, healthy_threshold=1,
                                unhealthy_threshold=4)


def test_a_health_check_of_path_and_interval_takes_the_defaults_for_the_rest():
    assert users("health_check: {path: /healthz, interval: 5s}\n").health_check == HealthCheck(path=b"/healthz")


@pytest.mark.parametrize(("body", "line", "message"), [
    ("health_check: {interval: 5s}\n", 8, "path: missing (required): e.g. /healthz"),
    ("health_check: {path: healthz}\n", 8, 'path: expected an absolute path like "/healthz", got "healthz"'),
    ("health_check:\n  path: http://t/healthz\n", 9,
     'path: expected an absolute path like "/healthz", got "http://t/healthz"'),
    ("health_check:\n  path: '/a b'\n", 9, 'path: expected an absolute path like "/healthz", got "/a b"'),
    ("health_check:\n  path: 7\n", 9, "path: expected a string, got 7"),
    ("health_check:\n  path: /h\n  interval: 5\n", 10, f'interval: {DURATION} "5"'),
    ("health_check:\n  path: /h\n  interval: 5ms\n", 10, "interval: expected at least 10ms, got 5ms"),
    ("health_check:\n  path: /h\n  healthy_threshold: 0\n", 10, "healthy_threshold: expected an integer >= 1, got 0"),
    ("health_check:\n  path: /h\n  unhealthy_threshold: -1\n", 10,
     "unhealthy_threshold: expected an integer >= 1, got -1"),
    # timeout >= interval is refused, named at timeout (or at the block when timeout is the default 2s)
    ("health_check:\n  path: /h\n  interval: 2s\n  timeout: 2s\n", 11, "timeout: must be shorter than interval (2s); it is 2s"),
    ("health_check:\n  path: /h\n  interval: 1s\n  timeout: 3s\n", 11, "timeout: must be shorter than interval (1s); it is 3s"),
    ("health_check: {path: /h, interval: 1s}\n", 8, "timeout: must be shorter than interval (1s); it is 2s by default"),
    ("health_check:\n  path: /h\n  timeout: 5s\n", 10, "timeout: must be shorter than interval (5s); it is 5s"),
    ("health_check:\n  path: /h\n  method: HEAD\n", 10,
     "method: unknown key (expected one of: healthy_threshold, interval, path, timeout, unhealthy_threshold)"),
    ("health_check: /healthz\n", 8, None),
])
def test_bad_health_check(body, line, message):
    if message is None:
        assert errors(body) == [f"c.yaml:{line}: {HC}: expected a mapping, got '/healthz'"]
    else:
        assert errors(body) == [f"c.yaml:{line}: {HC}.{message}"]


def test_health_check_reports_every_bad_field_of_a_block_with_a_path():
    assert errors("""\
        health_check:
          path: healthz
          interval: 5ms
          timeout: 1ms
          healthy_threshold: 0
          unhealthy_threshold: 0
        """) == [
        f'c.yaml:9: {HC}.path: expected an absolute path like "/healthz", got "healthz"',
        f"c.yaml:10: {HC}.interval: expected at least 10ms, got 5ms",
        f"c.yaml:11: {HC}.timeout: expected at least 10ms, got 1ms",
        f"c.yaml:12: {HC}.healthy_threshold: expected an integer >= 1, got 0",
        f"c.yaml:13: {HC}.unhealthy_threshold: expected an integer >= 1, got 0",
    ]


# --- passive_health -----------------------------------------------------------------------

def test_passive_health_fields_are_read():
    assert users("passive_health: {consecutive_failures: 2, eject_for: 500ms, max_eject_for: 1m}\n"
                 ).passive_health == PassiveHealth(consecutive_failures=2, eject_for=0.5, max_eject_for=60.0)
    assert users("passive_health: {eject_for: 5s, max_eject_for: 5s}\n").passive_health == PassiveHealth(
        eject_for=5.0, max_eject_for=5.0)
    assert users("passive_health: {}\n").passive_health == PassiveHealth()


@pytest.mark.parametrize(("field", "message"), [
    ("consecutive_failures: 0", "consecutive_failures: expected an integer >= 1, got 0"),
    ("consecutive_failures: five", "consecutive_failures: expected an integer >= 1, got 'five'"),
    ("eject_for: 10", f'eject_for: {DURATION} "10"'),
    ("eject_for: 0s", "eject_for: expected at least 1ms, got 0s"),
    ("max_eject_for: 5s", "max_eject_for: must be at least eject_for"),       # below the default eject_for
    ("eject_for: 10m", "max_eject_for: must be at least eject_for"),          # above the default max_eject_for
    ("ejection_percent: 50", "ejection_percent: unknown key (expected one of: consecutive_failures, eject_for, "
                             "max_eject_for)"),
])
def test_one_bad_passive_health_field(field, message):
    assert errors(f"passive_health:\n  {field}\n") == [f"c.yaml:9: {PH}.{message}"]


def test_max_eject_for_below_eject_for_is_named_at_max_eject_for():
    assert errors("""\
        passive_health:
          consecutive_failures: 0
          eject_for: 30s
          max_eject_for: 10s
        """) == [
        f"c.yaml:9: {PH}.consecutive_failures: expected an integer >= 1, got 0",
        f"c.yaml:11: {PH}.max_eject_for: must be at least eject_for",
    ]


# --- all together ---------------------------------------------------------------------------

def test_the_full_resilience_block_loads():
    u = users("""\
        balance: least_request
        retries: 1
        circuit_breaker: {consecutive_failures: 5, failure_ratio: 0.5, window: 10s, open_for: 30s}
        health_check: {path: /healthz, interval: 5s}
        passive_health: {consecutive_failures: 3, eject_for: 10s, max_eject_for: 5m}
        """)
    assert (u.balance, u.retries) == ("least_request", 1)
    assert u.circuit_breaker == BreakerSettings()
    assert u.health_check == HealthCheck(path=b"/healthz")
    assert u.passive_health == PassiveHealth(consecutive_failures=3)


def test_every_resilience_error_is_reported_in_one_run():
    """One bad value in each section, and a second upstream with its own: all reported, and
    the route to the broken upstream adds no error of its own."""
    text_ = text("""\
        balance: fastest
        retries: 11
        circuit_breaker: {consecutive_failures: 0}
        health_check: {path: healthz}
        passive_health: {max_eject_for: 1s}
        """) + (
        "  orders:\n"
        '    targets: ["http://127.0.0.1:3003"]\n'
        "    circuit_breaker: {failure_ratio: 2}\n"
        "    health_check: {interval: 1s}\n")
    with pytest.raises(ConfigError) as info:
        parse_config(text_, "c.yaml")
    assert [str(p) for p in info.value.problems] == [
        "c.yaml:8: upstreams.users.balance: expected one of round_robin, least_request, random, got 'fastest'",
        "c.yaml:9: upstreams.users.retries: expected at most 10, got 11",
        f"c.yaml:10: {CB}.consecutive_failures: expected an integer >= 1, got 0",
        f'c.yaml:11: {HC}.path: expected an absolute path like "/healthz", got "healthz"',
        f"c.yaml:12: {PH}.max_eject_for: must be at least eject_for",
        "c.yaml:15: upstreams.orders.circuit_breaker.failure_ratio: expected a number from 0.01 to 1.0, got 2",
        "c.yaml:16: upstreams.orders.health_check.path: missing (required): e.g. /healthz",
    ]


def test_tls_on_an_upstream_is_read_next_to_the_resilience_keys():
    """upstreams.*.tls is no longer refused as a later version (details: test_tls_config.py)."""
    assert errors("tls: {ca: /nonexistent/internal-ca.pem}\n") == [
        "c.yaml:8: upstreams.users.tls.ca: cannot read /nonexistent/internal-ca.pem: No such file or directory"]
    u = users("tls: {verify: false}\nretries: 2\n")
    assert (u.tls, u.retries) == (UpstreamTLS(verify=False), 2)


@pytest.mark.parametrize("value", ["null", "Null", "NULL", "~", "", "off"])
def test_failure_ratio_off_in_every_yaml_spelling_of_null(value):
    assert users(f"circuit_breaker: {{failure_ratio: {value}}}\n").circuit_breaker.failure_ratio is None
