"""The balancer (load balancing, passive health) on `task.Clock`, with `random` injected.

Members are built over real pools that never connect (no reactor): the balancer never
touches a connection, and compiled, it takes nothing but a `TargetPool`. `Values(...)` is a `random` that returns the given numbers in turn, so the two
samples of least_request's power of two choices are chosen by the test.
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import cycle, pairwise
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from txgateway.config.schema import Target, Upstream
from txgateway.upstream.balance import Balancer, Member
from txgateway.upstream.pool import TargetPool
from txgateway.upstream.resilienceconfig import PassiveHealth

URLS = ("http://10.0.0.1:80", "http://10.0.0.2:80", "http://10.0.0.3:80")
PASSIVE = PassiveHealth(consecutive_failures=3, eject_for=10.0, max_eject_for=35.0)


class Values:
    """A `random()` returning these values in turn (cycling), counting the calls."""

    def __init__(self, *values: float) -> None:
        self._values = cycle(values)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return next(self._values)


def pool(url: str, weight: int = 1) -> TargetPool:
    target = Target(url, url.split("//")[1].split(":")[0], 80, weight=weight)
    return TargetPool(None, target, Upstream("users", (target,)))


def balancer(policy: str = "round_robin", n: int = 3, clock: Clock | None = None, rnd: Any = None,
             passive: PassiveHealth = PASSIVE) -> Balancer:
    return Balancer("users", [pool(u) for u in URLS[:n]], policy, passive, clock or Clock(),
                    random=rnd or random.Random(7).random)


def picks(b: Balancer, n: int, tried: tuple[Member, ...] = ()) -> list[int]:
    """Indexes of the members `pick` returns, n times (None never expected here)."""
    out = []
    for _ in range(n):
        member = b.pick(tried)
        assert member is not None
        out.append(b.members.index(member))
    return out


def fail(b: Balancer, member: Member, n: int, reason: str = "status 503") -> None:
    for _ in range(n):
        b.failed(member, reason)


def first_member_ejected() -> tuple[Clock, Balancer, Member]:
    """A round-robin balancer of 3 on its own Clock whose first member just failed 3 times
    in a row (ejected for 10 s) -> (clock, balancer, that member)."""
    clock = Clock()
    b = balancer(clock=clock)
    m0 = b.members[0]
    fail(b, m0, 3)
    return clock, b, m0


def messages(logs: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in logs if e.get("log_namespace") == "txgateway.upstream.balance"]


def test_members_wrap_the_pools_in_order_and_start_idle_and_up():
    b = balancer()
    assert [m.url for m in b.members] == list(URLS)
    assert [m.pool.target.url for m in b.members] == list(URLS)
    for m in b.members:
        assert (m.in_flight, m.requests, m.failures, m.ejected_until, m.ejections, m.down, m.last_error) == (
            0, 0, 0, 0.0, 0, False, None)


def test_an_unknown_policy_is_refused_at_construction():
    with pytest.raises(KeyError):
        balancer("fastest")


# --- round_robin --------------------------------------------------------------------------

def test_round_robin_cycles_over_every_member_in_a_fixed_order():
    b = balancer("round_robin")
    seq = picks(b, 30)
    assert sorted(seq[:3]) == [0, 1, 2]
    assert seq == seq[:3] * 10            # the same cycle over and over: exactly even
    assert Counter(seq) == {0: 10, 1: 10, 2: 10}


def test_round_robin_cycles_over_the_candidates_only():
    b = balancer("round_robin")
    b.set_down(b.members[1], True, "test")
    seq = picks(b, 10)
    assert set(seq) == {0, 2}
    assert all(x != y for x, y in pairwise(seq))          # alternates
    assert Counter(seq) == {0: 5, 2: 5}


def test_round_robin_does_not_call_random():
    rnd = Values(0.5)
    b = balancer("round_robin", rnd=rnd)
    picks(b, 10)
    assert rnd.calls == 0


# --- least_request: power of two choices ------------------------------------------------

def test_least_request_takes_the_less_loaded_of_the_two_sampled():
    b = balancer("least_request", rnd=Values(0.0, 0.0))   # samples members 0 and 1
    m0, m1, m2 = b.members
    m0.in_flight, m1.in_flight, m2.in_flight = 5, 2, 0
    assert b.pick() is m1                  # not m2, the least loaded overall: it was not sampled
    m1.in_flight = 9
    assert b.pick() is m0


def test_least_request_second_sample_is_never_the_first():
    # n = 3: first = int(r1 * 3); second = (first + 1 + int(r2 * 2)) % 3.
    for r1, r2, sampled in [(0.0, 0.0, (0, 1)), (0.0, 0.5, (0, 2)), (0.4, 0.0, (1, 2)), (0.4, 0.99, (1, 0)),
                            (0.99, 0.0, (2, 0)), (0.99, 0.99, (2, 1))]:
        b = balancer("least_request", rnd=Values(r1, r2))
        for k, m in enumerate(b.members):
            m.in_flight = 10 + k
        first, second = sampled
        expected = first if b.members[first].in_flight <= b.members[second].in_flight else second
        assert b.members.index(b.pick()) == expected, (r1, r2)
        # Make the second sample the lighter one: it is then the pick.
        b.members[second].in_flight = 0
        assert b.members.index(b.pick()) == second, (r1, r2)


def test_least_request_on_a_tie_takes_the_first_sampled():
    b = balancer("least_request", rnd=Values(0.7, 0.0))   # samples 2 then 0
    assert b.pick() is b.members[2]


@pytest.mark.parametrize("out", [0, 1, 2])
def test_least_request_never_picks_outside_the_candidates(out):
    values = [i / 20 for i in range(20)] + [0.999999]
    b = balancer("least_request", rnd=Values(0.0))
    b.set_down(b.members[out], True, "test")
    left = [m for m in b.members if m is not b.members[out]]
    left[0].in_flight, left[1].in_flight = 3, 1
    b.members[out].in_flight = 0                           # the idlest, but down
    for r1 in values:
        for r2 in values:
            b.random = Values(r1, r2)
            # Two candidates: both are always sampled, so the lighter one always wins.
            assert b.pick() is left[1], (r1, r2)


def test_least_request_with_one_candidate_takes_it_without_random():
    rnd = Values(0.5)
    b = balancer("least_request", rnd=rnd)
    b.set_down(b.members[0], True, "test")
    b.set_down(b.members[2], True, "test")
    assert picks(b, 3) == [1, 1, 1]
    assert rnd.calls == 0


def test_least_request_spreads_idle_load_over_every_member():
    b = balancer("least_request", rnd=random.Random(3).random)
    counts = Counter(picks(b, 300))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 60


def test_least_request_sends_less_to_a_member_that_stays_busy():
    b = balancer("least_request", rnd=random.Random(11).random)
    b.members[0].in_flight = 4              # slow: its requests pile up
    counts = Counter(picks(b, 300))         # the others finish at once (in_flight stays 0)
    assert counts[0] == 0
    assert counts[1] > 100 and counts[2] > 100


# --- random ------------------------------------------------------------------------------

def test_random_maps_the_value_onto_the_candidates():
    b = balancer("random", rnd=Values(0.0, 0.34, 0.67, 0.999999))
    assert picks(b, 4) == [0, 1, 2, 2]
    b.set_down(b.members[0], True, "test")
    b.random = Values(0.0, 0.49, 0.5, 0.999999)
    assert picks(b, 4) == [1, 1, 2, 2]


def test_random_covers_every_member():
    b = balancer("random", rnd=random.Random(5).random)
    counts = Counter(picks(b, 300))
    assert set(counts) == {0, 1, 2} and min(counts.values()) > 60


# --- tried: retries go elsewhere --------------------------------------------------------

@pytest.mark.parametrize("policy", ["round_robin", "least_request", "random"])
def test_tried_members_are_never_picked_again(policy):
    b = balancer(policy, rnd=random.Random(1).random)
    m0, m1, m2 = b.members
    assert set(picks(b, 50, (m0,))) == {1, 2}
    assert picks(b, 10, (m0, m2)) == [1] * 10
    assert b.pick((m0, m1, m2)) is None


def test_single_member_fast_path():
    rnd = Values(0.5)
    for policy in ("round_robin", "least_request", "random"):
        b = balancer(policy, n=1, rnd=rnd)
        only = b.members[0]
        assert [b.pick() for _ in range(3)] == [only] * 3
        assert b.pick((only,)) is None                 # a retry has nowhere else to go
        b.set_down(only, True, "test")
        assert b.pick() is None
        b.set_down(only, False, "test")
        assert b.pick() is only
    assert rnd.calls == 0


def test_single_member_ejected_is_out_until_its_period_ends():
    clock = Clock()
    b = balancer(n=1, clock=clock)
    only = b.members[0]
    fail(b, only, 3)
    assert b.pick() is None
    clock.advance(9.999)
    assert b.pick() is None
    clock.advance(0.001)
    assert b.pick() is only
    assert only.ejected_until == 0.0


def test_no_candidate_at_all_gives_none():
    b = balancer()
    for m in b.members:
        b.set_down(m, True, "test")
    assert b.pick() is None


# --- passive health: ejection with backoff ----------------------------------------------

def test_consecutive_failures_eject_for_eject_for():
    clock = Clock()
    clock.advance(100)
    b = balancer(clock=clock)
    m0 = b.members[0]
    with capturedLogs() as logs:
        fail(b, m0, 2, "connect failed: refused")
        assert m0.failures == 2 and not m0.ejected_until
        assert 0 in picks(b, 3)
        b.failed(m0, "status 502")
    assert m0.ejected_until == 110.0 and m0.ejections == 1
    assert m0.last_error == "status 502"
    assert messages(logs) == [
        "upstream users: target http://10.0.0.1:80 ejected for 10s: 3 consecutive failures (last: status 502)"]
    assert set(picks(b, 30)) == {1, 2}


def test_a_success_resets_the_consecutive_count():
    b = balancer()
    m0 = b.members[0]
    for _ in range(5):
        fail(b, m0, 2)
        b.succeeded(m0)
        assert m0.failures == 0
    assert not m0.ejected_until and m0.ejections == 0
    fail(b, m0, 2)
    assert not m0.ejected_until
    b.failed(m0, "timeout")
    assert m0.ejected_until


def test_failures_of_other_members_do_not_add_up():
    b = balancer()
    m0, m1, m2 = b.members
    for _ in range(4):
        fail(b, m0, 2)
        fail(b, m1, 2)
        fail(b, m2, 2)
        b.succeeded(m0)
        b.succeeded(m1)
        b.succeeded(m2)
    assert not any(m.ejected_until for m in b.members)


def test_an_ejected_member_returns_after_the_period_and_says_so_once():
    clock, b, m0 = first_member_ejected()
    clock.advance(9.9)
    assert 0 not in picks(b, 30)
    clock.advance(0.1)
    with capturedLogs() as logs:
        seq = picks(b, 30)
    assert Counter(seq) == {0: 10, 1: 10, 2: 10}
    assert m0.ejected_until == 0.0
    assert messages(logs) == ["upstream users: target http://10.0.0.1:80 back in rotation after ejection"]


def test_failures_during_an_ejection_do_not_extend_it():
    clock, b, m0 = first_member_ejected()
    clock.advance(5)
    fail(b, m0, 10)                        # requests that were in flight at the ejection
    assert m0.ejected_until == 10.0 and m0.ejections == 1


def test_ejection_doubles_when_failing_again_right_after_returning_up_to_max_eject_for():
    clock = Clock()
    b = balancer(clock=clock)
    m0 = b.members[0]
    periods = []
    for _ in range(5):
        fail(b, m0, 3)                      # a returning target that fails is out again at once
        periods.append(m0.ejected_until - clock.seconds())
        clock.advance(periods[-1])
        assert b.pick((b.members[1], b.members[2])) is m0     # back in rotation
    assert periods == [10.0, 20.0, 35.0, 35.0, 35.0]          # 10, 20, then capped (not 40, 80)
    assert m0.ejections == 5


def test_a_returning_member_without_a_success_is_ejected_again_on_its_next_failure():
    clock, b, m0 = first_member_ejected()
    clock.advance(10)
    assert b.pick((b.members[1], b.members[2])) is m0
    b.failed(m0, "status 503")
    assert m0.ejected_until == 30.0        # 10 + 20: the doubled period, after a single failure


def test_a_success_after_returning_resets_the_backoff():
    clock, b, m0 = first_member_ejected()
    clock.advance(10)
    fail(b, m0, 1)
    clock.advance(20)
    assert b.pick((b.members[1], b.members[2])) is m0
    b.succeeded(m0)
    assert (m0.failures, m0.ejections) == (0, 0)
    fail(b, m0, 2)
    assert not m0.ejected_until              # a fresh count of consecutive failures
    b.failed(m0, "status 503")
    assert m0.ejected_until - clock.seconds() == 10.0     # and the first period again


def test_every_member_can_be_ejected_when_every_one_is_failing():
    clock = Clock()
    b = balancer(clock=clock)
    for m in b.members:
        fail(b, m, 3)
    assert b.pick() is None
    clock.advance(10)
    assert sorted(picks(b, 3)) == [0, 1, 2]


# --- active health: set_down ------------------------------------------------------------

def test_set_down_takes_a_member_out_and_back_and_logs_changes_only():
    b = balancer()
    m1 = b.members[1]
    with capturedLogs() as logs:
        b.set_down(m1, True, "3 health checks failed, last: status 500")
        b.set_down(m1, True, "4 health checks failed, last: status 500")   # no change: not logged
        assert m1.down
        assert set(picks(b, 20)) == {0, 2}
        b.set_down(m1, False, "2 health checks passed")
        b.set_down(m1, False, "3 health checks passed")
    assert not m1.down
    assert Counter(picks(b, 30)) == {0: 10, 1: 10, 2: 10}
    assert messages(logs) == [
        "upstream users: target http://10.0.0.2:80 down (3 health checks failed, last: status 500)",
        "upstream users: target http://10.0.0.2:80 up (2 health checks passed)",
    ]


def test_a_down_member_stays_out_even_when_its_ejection_ends():
    clock, b, m0 = first_member_ejected()
    b.set_down(m0, True, "health check failed")
    clock.advance(60)
    assert 0 not in picks(b, 30)


def test_a_passing_check_ends_an_ejection_early():
    clock, b, m0 = first_member_ejected()
    clock.advance(2)
    b.set_down(m0, False, "health check passed")
    assert m0.ejected_until == 0.0 and m0.failures == 0 and not m0.down
    assert Counter(picks(b, 30)) == {0: 10, 1: 10, 2: 10}
    # The backoff is not forgiven by a check, only by a live success: failing again doubles.
    fail(b, m0, 3)
    assert m0.ejected_until - clock.seconds() == 20.0


def test_retry_after_counts_to_the_earliest_return():
    clock = Clock()
    b = balancer(clock=clock)
    m0, m1, m2 = b.members
    assert b.retry_after() == 1                 # nobody ejected
    fail(b, m0, 3)                              # back at 10
    clock.advance(2.5)
    fail(b, m1, 3)                              # back at 12.5
    assert b.retry_after() == 8                 # 7.5 s, rounded up
    clock.advance(7.5)
    assert b.retry_after() == 3                 # m0 is due now; m1 in 2.5 s
    b.set_down(m1, True, "check")               # a down member has no due time
    b.set_down(m2, True, "check")
    assert b.retry_after() == 1
    clock.advance(0.1)
    assert b.pick() is m0                       # m0 back; m2 and m1 down


def test_retry_after_is_at_least_one_second():
    clock = Clock()
    b = balancer(clock=clock)
    for m in b.members:
        fail(b, m, 3)
    clock.advance(9.9995)
    assert b.pick() is None
    assert b.retry_after() == 1


def test_snapshot_shows_each_member():
    clock = Clock()
    b = balancer(clock=clock)
    m0, m1, m2 = b.members
    m0.in_flight, m0.requests = 2, 40
    m2.requests = 7
    fail(b, m1, 3, "connect failed: Connection refused")
    clock.advance(2.5)
    b.set_down(m2, True, "check")
    assert b.snapshot() == [
        {"url": URLS[0], "weight": 1, "in_flight": 2, "requests": 40, "down": False, "ejected_for": 0.0, "failures": 0,
         "last_error": None},
        {"url": URLS[1], "weight": 1, "in_flight": 0, "requests": 0, "down": False, "ejected_for": 7.5, "failures": 3,
         "last_error": "connect failed: Connection refused"},
        {"url": URLS[2], "weight": 1, "in_flight": 0, "requests": 7, "down": True, "ejected_for": 0.0, "failures": 0,
         "last_error": None},
    ]
    clock.advance(30)
    assert b.snapshot()[1]["ejected_for"] == 0.0        # past: never negative


def test_a_pass_ending_an_ejection_early_is_logged():
    clock, b, m0 = first_member_ejected()
    clock.advance(2)
    with capturedLogs() as logs:
        b.set_down(m0, False, "health check passed")
    assert m0.ejected_until == 0.0 and not m0.down
    assert any("back in rotation before its ejection ended (health check passed)" in m for m in messages(logs))


# -- weights ---------------------------------------------------------------------------

WEIGHTED = """
listen: [{endpoint: "tcp:0"}]
upstreams:
  users:
    balance: %s
    targets:
      - {url: "http://10.0.0.1:80", weight: 5}
      - "http://10.0.0.2:80"
      - {url: "http://10.0.0.3:80", weight: 4}
routes: [{prefix: /, upstream: users}]
"""


def weighted(policy: str, rnd: Any = None) -> Balancer:
    """A balancer over the targets (and weights) of a real config."""
    from txgateway.config.schema import parse_config
    upstream = parse_config(WEIGHTED % policy, "t.yaml").upstreams["users"]
    return Balancer("users", [TargetPool(None, t, upstream) for t in upstream.targets], policy, PASSIVE, Clock(),
                    random=rnd or random.Random(7).random)


def test_smooth_weighted_round_robin_interleaves_as_nginx_does():
    b = weighted("round_robin")
    assert picks(b, 10) == [0, 2, 0, 2, 0, 1, 2, 0, 2, 0]        # 5:1:4 spread out, never a run of five
    assert Counter(picks(b, 10_000)) == {0: 5000, 1: 1000, 2: 4000}


def test_weighted_round_robin_skips_a_target_out_of_rotation_and_keeps_the_others_shares():
    b = weighted("round_robin")
    b.set_down(b.members[0], True, "check")
    assert Counter(picks(b, 5000)) == {1: 1000, 2: 4000}


@pytest.mark.parametrize("policy", ["random", "least_request"])
def test_random_and_least_request_honour_weights_within_one_percent(policy):
    b = weighted(policy)
    counts = Counter(picks(b, 10_000))
    for index, share in ((0, 0.5), (1, 0.1), (2, 0.4)):
        assert abs(counts[index] / 10_000 - share) < 0.01, counts


def test_weighted_least_request_prefers_fewer_in_flight_per_unit_of_weight():
    b = weighted("least_request", rnd=Values(0.0, 0.65))    # draws member 0 (weight 5), then member 2 (weight 4)
    m0, _, m2 = b.members
    m0.in_flight, m2.in_flight = 6, 4                         # 6/5 > 4/4: member 2 is less loaded
    assert b.pick() is m2
    m0.in_flight = 4                                          # 4/5 < 4/4
    assert b.pick() is m0


@pytest.mark.parametrize(("target", "message"), [
    ('{url: "http://10.0.0.1:80", weight: 0}', "t.yaml:6: upstreams.users.targets[0].weight: expected an integer >= 1, got 0"),
    ('{url: "http://10.0.0.1:80", weight: 1001}', "t.yaml:6: upstreams.users.targets[0].weight: expected at most 1000, got 1001"),
    ("{weight: 2}", "t.yaml:6: upstreams.users.targets[0].url: missing (required)"),
    ('{url: "http://10.0.0.1:80", wieght: 2}', "t.yaml:6: upstreams.users.targets[0].wieght"),
])
def test_a_bad_weight_is_a_config_error_naming_file_line_and_key(target, message):
    from txgateway.config.schema import ConfigError, parse_config
    text = f"""
listen: [{{endpoint: "tcp:0"}}]
upstreams:
  users:
    targets:
      - {target}
routes: [{{prefix: /, upstream: users}}]
"""
    with pytest.raises(ConfigError) as e:
        parse_config(text, "t.yaml")
    assert message in str(e.value)
