"""The circuit breaker's state machine, driven by `task.Clock`.

`random` is injected: 0.5 gives a jitter factor of exactly 1, so open periods are the plain
backoff steps; 0.0 and 1.0 give the extreme factors 1 - jitter and 1 + jitter.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from txgateway.upstream.breaker import CLOSED, HALF_OPEN, OPEN, Breakers, BreakerSettings, CircuitBreaker

NO_CONSECUTIVE = 10_000     # for ratio tests: consecutive failures never trip first


def breaker(clock: Clock | None = None, rnd: Any = lambda: 0.5, name: str = "users", **settings: Any) -> CircuitBreaker:
    return CircuitBreaker(name, BreakerSettings(**settings), clock or Clock(), random=rnd)


def fail(b: CircuitBreaker, n: int, reason: str = "status 503") -> None:
    for _ in range(n):
        ticket = b.allow()
        assert ticket is not None
        b.record_failure(ticket, reason)


def succeed(b: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        ticket = b.allow()
        assert ticket is not None
        b.record_success(ticket)


def tripped(clock: Clock | None = None, **settings: Any) -> CircuitBreaker:
    b = breaker(clock, **settings)
    b.trip("test")
    return b


# --- settings -------------------------------------------------------------------------------

def test_default_settings_are_the_documented_example():
    s = BreakerSettings()
    assert (s.consecutive_failures, s.failure_ratio, s.window, s.min_requests, s.open_for, s.max_open_for,
            s.half_open_requests, s.failure_statuses, s.jitter) == (5, 0.5, 10.0, 20, 30.0, 300.0, 1,
                                                                    frozenset({502, 503, 504}), 0.1)


@pytest.mark.parametrize("bad", [
    {"consecutive_failures": 0}, {"failure_ratio": 0.0}, {"failure_ratio": 1.5}, {"window": 0},
    {"min_requests": 0}, {"open_for": 0}, {"open_for": 60, "max_open_for": 30},
    {"half_open_requests": 0}, {"jitter": 1.0}, {"jitter": -0.1},
])
def test_nonsense_settings_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        BreakerSettings(**bad)


# --- closed -> open: consecutive failures ---------------------------------------------------

def test_a_new_breaker_is_closed_and_admits():
    b = breaker()
    assert b.state == CLOSED
    assert b.allow() is not None


def test_consecutive_failures_trip_at_exactly_the_threshold():
    b = breaker(consecutive_failures=5)
    fail(b, 4)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN
    assert b.allow() is None


def test_a_success_between_failures_restarts_the_consecutive_count():
    b = breaker(consecutive_failures=5, failure_ratio=None)
    fail(b, 4)
    succeed(b, 1)
    fail(b, 4)
    assert b.state == CLOSED
    assert b.snapshot()["consecutive_failures"] == 4
    fail(b, 1)
    assert b.state == OPEN


# --- closed -> open: failure ratio over the rolling window ----------------------------------

def test_ratio_never_trips_below_min_requests():
    b = breaker(consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.5, min_requests=20)
    fail(b, 19)                                 # a 100 % failure ratio, but only 19 requests
    assert b.state == CLOSED
    fail(b, 1)
    assert b.state == OPEN


def test_ratio_just_below_the_threshold_does_not_trip():
    b = breaker(consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.5, min_requests=20)
    fail(b, 9)
    succeed(b, 11)                              # 9/20 = 0.45
    assert b.state == CLOSED
    succeed(b, 20)
    assert b.state == CLOSED


def test_ratio_exactly_at_the_threshold_trips():
    b = breaker(consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.55, min_requests=20)
    succeed(b, 9)
    fail(b, 10)
    assert b.state == CLOSED                    # 10/19, but under min_requests
    fail(b, 1)                                  # 11/20 = 0.55 exactly
    assert b.state == OPEN


def test_ratio_trip_does_not_depend_on_the_order_of_results():
    # The condition is a property of the window: the request that brings it to min_requests
    # may be a success.
    b = breaker(consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.5, min_requests=20)
    fail(b, 10)
    succeed(b, 9)
    assert b.state == CLOSED
    succeed(b, 1)                               # 10/20
    assert b.state == OPEN


@pytest.mark.parametrize(("later", "expected"), [(9.5, OPEN), (10.0, CLOSED)])
def test_failures_slide_out_of_the_window(later, expected):
    # 10 buckets of 1 s: failures at t=0 are counted until the bucket [0, 1) leaves at t=10.
    clock = Clock()
    b = breaker(clock, consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.5, min_requests=20, window=10.0)
    fail(b, 10)
    clock.advance(later)
    succeed(b, 10)
    assert b.state == expected


def test_the_window_counts_only_the_last_window_of_results():
    clock = Clock()
    b = breaker(clock, consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.5, min_requests=20, window=10.0)
    for _ in range(30):                         # one failure and one success per second
        fail(b, 1)
        succeed(b, 2)
        clock.advance(1.0)
    snap = b.snapshot()
    assert (snap["window_requests"], snap["window_failures"]) == (27, 9)   # buckets t=21..29 (t=30 is empty)
    clock.advance(100.0)                        # a gap longer than the window empties it
    snap = b.snapshot()
    assert (snap["window_requests"], snap["window_failures"]) == (0, 0)
    assert b.state == CLOSED


def test_a_clock_stepping_back_neither_loses_nor_double_counts():
    clock = Clock()
    clock.advance(100.0)
    b = breaker(clock, consecutive_failures=NO_CONSECUTIVE, min_requests=6)
    succeed(b, 2)
    clock.rightNow = 55.5                       # e.g. NTP stepped the wall clock back
    succeed(b, 1)
    fail(b, 1)
    clock.rightNow = 100.5                      # and forward again: nothing was dropped
    assert (b.snapshot()["window_requests"], b.state) == (4, CLOSED)
    fail(b, 1)                                  # 2/5, under min_requests anyway
    assert b.state == CLOSED
    fail(b, 1)                                  # 3/6
    assert b.state == OPEN


def test_ratio_can_be_switched_off():
    b = breaker(consecutive_failures=3, failure_ratio=None, min_requests=1)
    for _ in range(50):
        fail(b, 2)
        succeed(b, 1)
    assert b.state == CLOSED


# --- open: fail fast, Retry-After -----------------------------------------------------------

def test_open_refuses_every_request_until_open_for_has_passed():
    clock = Clock()
    b = tripped(clock, open_for=30.0)
    for _ in range(100):
        assert b.allow() is None
    clock.advance(29.9)
    assert b.allow() is None
    assert b.state == OPEN
    clock.advance(0.1)
    assert b.allow() is not None
    assert b.state == HALF_OPEN


def test_retry_after_counts_down_in_whole_seconds_and_never_below_one():
    clock = Clock()
    b = tripped(clock, open_for=30.0)
    seen = []
    for step in [0.0, 0.5, 9.5, 10.0, 9.0, 0.5, 0.4]:    # t = 0, 0.5, 10, 20, 29, 29.5, 29.9
        clock.advance(step)
        seen.append(b.retry_after())
    assert seen == [30, 30, 20, 10, 1, 1, 1]


def test_a_client_waiting_exactly_retry_after_gets_a_probe():
    clock = Clock()
    b = tripped(clock, open_for=30.0, jitter=0.1)
    b.trip()                                    # re-armed; random 0.5: exactly 30 s
    clock.advance(0.3)
    clock.advance(b.retry_after())              # ceil(29.7) = 30 s later
    assert b.allow() is not None


def test_retry_after_is_one_when_closed_or_probing():
    clock = Clock()
    b = tripped(clock, open_for=30.0)
    clock.advance(30.0)
    assert b.allow() is not None
    assert b.retry_after() == 1
    b.reset()
    assert b.retry_after() == 1


def test_half_open_is_entered_lazily_but_readers_never_see_a_stale_open():
    clock = Clock()
    b = tripped(clock, open_for=30.0)
    assert b.state == OPEN
    clock.advance(30.0)
    assert clock.getDelayedCalls() == []        # no timer was armed
    assert b.snapshot()["state"] == HALF_OPEN
    assert b.allow() is not None                # the probe slot is still there


# --- half_open: N probes ---------------------------------------------------------------------

def half_open(n: int, **settings: Any) -> tuple[CircuitBreaker, Clock, list[int]]:
    clock = Clock()
    b = tripped(clock, half_open_requests=n, **settings)
    clock.advance(b.retry_after())
    tickets = [b.allow() for _ in range(n)]
    assert None not in tickets
    return b, clock, tickets  # type: ignore[return-value]


def test_half_open_admits_n_probes_and_refuses_the_next():
    b, _, _ = half_open(3)
    assert b.state == HALF_OPEN
    assert b.allow() is None
    assert b.snapshot()["probes_in_flight"] == 3


def test_all_probes_succeeding_closes_the_breaker_with_counts_cleared():
    b, _, tickets = half_open(3)
    for ticket in tickets[:2]:
        b.record_success(ticket)
        assert b.state == HALF_OPEN
        assert b.allow() is None                # a finished probe does not free a slot
    b.record_success(tickets[2])
    assert b.state == CLOSED
    snap = b.snapshot()
    assert (snap["consecutive_failures"], snap["window_requests"], snap["window_failures"]) == (0, 0, 0)
    assert b.allow() is not None


def test_one_probe_failing_reopens_even_after_others_succeeded():
    b, _, tickets = half_open(3)
    b.record_success(tickets[0])
    b.record_failure(tickets[1], "timeout")
    assert b.state == OPEN
    assert b.allow() is None
    b.record_success(tickets[2])                # the last probe's success comes too late
    assert b.state == OPEN


def test_a_released_probe_gives_its_slot_back():
    b, _, tickets = half_open(1)
    b.release(tickets[0])                       # the client went away: no verdict
    assert b.state == HALF_OPEN
    second = b.allow()
    assert second is not None
    b.record_success(second)
    assert b.state == CLOSED


def test_release_in_closed_counts_nothing():
    b = breaker(consecutive_failures=2)
    fail(b, 1)
    ticket = b.allow()
    assert ticket is not None
    b.release(ticket)
    snap = b.snapshot()
    assert (snap["window_requests"], snap["consecutive_failures"]) == (1, 1)


def test_a_probe_never_reported_does_not_hold_the_upstream_off_forever():
    b, clock, _ = half_open(1, open_for=30.0, max_open_for=300.0)
    clock.advance(299.0)
    assert b.allow() is None
    assert b.state == HALF_OPEN
    clock.advance(1.0)
    assert b.allow() is None
    assert b.state == OPEN                      # treated as a failed probe: the next, longer period
    assert b.open_for == 60.0
    clock.advance(60.0)
    assert b.allow() is not None


# --- backoff and jitter ------------------------------------------------------------------------

def reopen_periods(b: CircuitBreaker, clock: Clock, times: int) -> list[float | None]:
    periods = []
    for _ in range(times):
        clock.advance(b.open_for or 0.0)
        ticket = b.allow()
        assert ticket is not None
        b.record_failure(ticket, "status 503")
        periods.append(b.open_for)
    return periods


def test_failed_probes_double_the_open_period_up_to_max_open_for():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1, open_for=30.0, max_open_for=300.0)
    fail(b, 1)
    assert b.open_for == 30.0
    assert reopen_periods(b, clock, 6) == [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    assert b.retry_after() == 300


def test_each_period_is_reached_before_a_probe_goes_out():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1, open_for=30.0, max_open_for=300.0)
    fail(b, 1)
    clock.advance(30.0)
    fail(b, 1)                                  # probe fails: 60 s now
    clock.advance(59.0)
    assert b.allow() is None
    clock.advance(1.0)
    assert b.allow() is not None


@pytest.mark.parametrize(("rnd", "first", "capped"), [(0.0, 27.0, 270.0), (1.0, 33.0, 330.0), (0.5, 30.0, 300.0)])
def test_jitter_extremes(rnd, first, capped):
    clock = Clock()
    b = breaker(clock, rnd=lambda: rnd, consecutive_failures=1, open_for=30.0, max_open_for=300.0, jitter=0.1)
    fail(b, 1)
    assert b.open_for == pytest.approx(first)
    assert reopen_periods(b, clock, 5)[-1] == pytest.approx(capped)   # the cap is jittered too


def test_jitter_spreads_instances_within_bounds():
    clock = Clock()
    breakers = [breaker(clock, rnd=random.Random(seed).random, consecutive_failures=1) for seed in range(50)]
    for b in breakers:
        fail(b, 1)
    periods = [b.open_for for b in breakers]
    assert all(27.0 <= p <= 33.0 for p in periods)   # type: ignore[operator]
    assert len(set(periods)) == 50              # no two instances probe in lockstep


def test_backoff_starts_over_after_recovery():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1, open_for=30.0)
    fail(b, 1)
    assert reopen_periods(b, clock, 2) == [60.0, 120.0]
    clock.advance(120.0)
    succeed(b, 1)
    assert b.state == CLOSED
    fail(b, 1)
    assert b.open_for == 30.0


# --- results from an earlier epoch --------------------------------------------------------------

def test_a_slow_success_from_before_the_trip_is_not_a_probe_success():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1)
    slow = b.allow()
    assert slow is not None
    fail(b, 1)
    clock.advance(30.0)
    probe = b.allow()
    assert probe is not None
    b.record_success(slow)
    assert b.state == HALF_OPEN
    assert b.allow() is None                    # and the probe slot is still taken
    b.record_success(probe)
    assert b.state == CLOSED


def test_a_slow_failure_from_before_the_trip_does_not_reopen_half_open():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1)
    slow = b.allow()
    assert slow is not None
    fail(b, 1)
    clock.advance(30.0)
    assert b.allow() is not None
    b.record_failure(slow, "timeout")
    assert b.state == HALF_OPEN


def test_results_from_before_recovery_do_not_count_in_the_new_window():
    clock = Clock()
    b = breaker(clock, consecutive_failures=3)
    old = [b.allow() for _ in range(3)]
    fail(b, 3)
    clock.advance(30.0)
    succeed(b, 1)
    assert b.state == CLOSED
    for ticket in old:
        b.record_failure(ticket, "timeout")  # type: ignore[arg-type]
    assert b.state == CLOSED
    snap = b.snapshot()
    assert (snap["window_failures"], snap["consecutive_failures"], snap["stale_results"]) == (0, 0, 3)


def test_a_ticket_from_before_a_manual_reset_is_ignored():
    b = breaker(consecutive_failures=2)
    ticket = b.allow()
    assert ticket is not None
    fail(b, 1)
    b.reset()
    b.record_failure(ticket, "timeout")
    fail(b, 1)
    assert b.state == CLOSED


# --- manual trip and reset --------------------------------------------------------------------

def test_manual_trip_opens_for_open_for():
    clock = Clock()
    b = breaker(clock, open_for=30.0)
    b.trip()
    assert b.state == OPEN
    assert b.allow() is None
    assert b.retry_after() == 30
    assert b.trips == 1


def test_tripping_an_open_breaker_restarts_its_period():
    clock = Clock()
    b = tripped(clock, open_for=30.0)
    clock.advance(20.0)
    b.trip()
    assert b.retry_after() == 30


def test_manual_reset_closes_and_clears_everything():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1, open_for=30.0)
    fail(b, 1)
    reopen_periods(b, clock, 2)
    b.reset()
    assert b.state == CLOSED
    assert b.allow() is not None
    assert b.snapshot()["opened_at"] is None
    fail(b, 1)
    assert b.open_for == 30.0                   # backoff starts over


def test_reset_of_a_closed_breaker_clears_the_consecutive_count():
    b = breaker(consecutive_failures=3)
    fail(b, 2)
    b.reset()
    fail(b, 2)
    assert b.state == CLOSED


# --- what counts as a failure -----------------------------------------------------------------

@pytest.mark.parametrize(("status", "failure"), [(502, True), (503, True), (504, True), (500, False),
                                                 (200, False), (404, False), (429, False)])
def test_default_failure_statuses(status, failure):
    assert breaker().is_failure_status(status) is failure


def test_failure_statuses_are_configurable():
    b = breaker(failure_statuses=frozenset({500, 503}))
    assert [b.is_failure_status(s) for s in (500, 502, 503)] == [True, False, True]


# --- logging, counters, listeners, snapshot ---------------------------------------------------

def test_every_transition_is_logged_once_with_upstream_states_and_reason():
    clock = Clock()
    with capturedLogs() as events:
        b = breaker(clock, name="users", consecutive_failures=5, half_open_requests=1)
        fail(b, 5, "timeout")
        clock.advance(30.0)
        probe = b.allow()
        assert probe is not None
        b.record_failure(probe, "connection refused")
        b.trip()
        b.reset()
    ours = [e for e in events if e.get("log_namespace") == "txgateway.upstream.breaker"]
    texts = [formatEvent(e) for e in ours]
    assert texts == [
        "circuit breaker users: closed -> open (5 consecutive failures (last: timeout))",
        "circuit breaker users: open -> half_open (open for 30s elapsed)",
        "circuit breaker users: half_open -> open (probe failed: connection refused)",
        "circuit breaker users: open -> open (manual trip)",
        "circuit breaker users: open -> closed (manual reset)",
    ]
    assert (ours[0]["upstream"], ours[0]["from_state"], ours[0]["to_state"]) == ("users", CLOSED, OPEN)


def test_a_ratio_trip_names_the_ratio_window_and_volume():
    with capturedLogs() as events:
        b = breaker(consecutive_failures=NO_CONSECUTIVE, failure_ratio=0.54, min_requests=22)   # trips at 12/22
        succeed(b, 10)
        fail(b, 12)
    assert b.state == OPEN
    assert [e["reason"] for e in events if "reason" in e] == ["failure ratio 0.55 over 10s (22 requests)"]


def test_transitions_are_counted_and_listeners_told():
    clock = Clock()
    b = breaker(clock, consecutive_failures=1)
    told: list[tuple[str, str, str]] = []
    b.on_transition.append(lambda br, old, new, reason: told.append((old, new, reason)))
    fail(b, 1)
    clock.advance(30.0)
    succeed(b, 1)
    assert told == [(CLOSED, OPEN, "1 consecutive failures (last: status 503)"),
                    (OPEN, HALF_OPEN, "open for 30s elapsed"),
                    (HALF_OPEN, CLOSED, "1 probe(s) succeeded")]
    assert b.transitions == {(CLOSED, OPEN): 1, (OPEN, HALF_OPEN): 1, (HALF_OPEN, CLOSED): 1}


def test_a_failing_listener_does_not_break_the_breaker():
    b = breaker(consecutive_failures=1)

    def broken(*args: Any) -> None:
        raise RuntimeError("listener bug")
    b.on_transition.append(broken)
    with capturedLogs() as events:
        fail(b, 1)
    assert b.state == OPEN
    assert any(e.get("log_failure") is not None for e in events)


def test_snapshot_shows_an_open_breaker():
    clock = Clock()
    clock.advance(1000.0)
    b = breaker(clock, consecutive_failures=2)
    fail(b, 2)
    clock.advance(10.0)
    snap = b.snapshot()
    assert snap == {
        "name": "users", "state": OPEN, "epoch": 2, "consecutive_failures": 0,
        "window_requests": 0, "window_failures": 0, "opened_at": 1000.0, "open_for": 30.0,
        "retry_after": 20, "probes_in_flight": 0, "trips": 1, "stale_results": 0,
        "transitions": {"closed->open": 1},
    }


# --- the registry the Manhole and /status use ----------------------------------------------

def test_breakers_registry_maps_names_and_forces_states():
    clock = Clock()
    reg = Breakers([breaker(clock, name="users"), breaker(clock, name="orders")])
    reg.add(breaker(clock, name="search"))
    assert sorted(reg) == ["orders", "search", "users"]
    assert len(reg) == 3 and "users" in reg and "nope" not in reg
    assert reg["users"].name == "users"
    assert reg.trip("orders")["state"] == OPEN
    assert reg["orders"].allow() is None
    assert {name: snap["state"] for name, snap in reg.snapshot().items()} == \
        {"users": CLOSED, "orders": OPEN, "search": CLOSED}
    assert reg.reset("orders")["state"] == CLOSED
    assert reg["orders"].allow() is not None


def test_an_unknown_name_lists_the_known_ones():
    reg = Breakers([breaker(name="users"), breaker(name="orders")])
    with pytest.raises(KeyError, match=r"'userz'.*known: orders, users"):
        reg.trip("userz")
    with pytest.raises(KeyError, match="known: none"):
        Breakers()["users"]
