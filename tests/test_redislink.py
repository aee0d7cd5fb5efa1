"""RedisLink's up/down state machine, driven by `task.Clock` and a fake txredisapi handler.

No Redis and no reactor here: `link._handler` is a fake whose commands return Deferreds the
test fires (or never fires), `link._response_error` a stand-in for txredisapi.ResponseError,
and `link.start()` is never called. The real-Redis behaviour is covered in test_hybrid.py.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from txgateway.filters.ratelimit.redisconfig import RedisConfig
from txgateway.filters.ratelimit.redislink import PROBE_FIRST, PROBE_MAX, RedisLink, RedisUnavailable

TIMEOUT = 0.2


class FakeResponseError(Exception):
    """Stands in for txredisapi.ResponseError (an error reply from Redis)."""


class FakeTransport:
    def __init__(self) -> None:
        self.lost = 0

    def loseConnection(self) -> None:
        self.lost += 1


class FakeConnection:
    def __init__(self) -> None:
        self.transport = FakeTransport()


class FakeFactory:
    def __init__(self, connections: int) -> None:
        self.pool = [FakeConnection() for _ in range(connections)]


class FakeHandler:
    """What RedisLink uses of a txredisapi pool: commands returning Deferreds, `ping`,
    `disconnect`, and `_factory.pool` (connections with transports)."""

    def __init__(self, connections: int = 2) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], Deferred[Any]]] = []
        self.pings: list[tuple[float, Deferred[Any]]] = []
        self.disconnected = 0
        self._factory = FakeFactory(connections)
        self.clock: Clock | None = None

    def get(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(("get", args, d))
        return d

    def eval(self, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append(("eval", args, d))
        return d

    def ping(self) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.pings.append((self.clock.seconds() if self.clock else 0.0, d))
        return d

    def disconnect(self) -> Deferred[Any]:
        self.disconnected += 1
        d: Deferred[Any] = Deferred()
        d.callback(None)
        return d


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every event logged in the txgateway.redis namespace while the test runs."""
    seen: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace", "").startswith("txgateway.redis"):
            seen.append(event)
    globalLogPublisher.addObserver(observer)
    yield seen
    globalLogPublisher.removeObserver(observer)


def messages(events: list[dict[str, Any]], word: str) -> list[str]:
    return [formatEvent(e) for e in events if word in formatEvent(e)]


def make_link(connections: int = 2) -> tuple[RedisLink, FakeHandler, Clock]:
    clock = Clock()
    clock.advance(1000.0)                       # "since" values distinct from 0
    link = RedisLink(RedisConfig(timeout=TIMEOUT), clock)
    handler = FakeHandler(connections)
    handler.clock = clock
    link._handler = handler
    link._response_error = FakeResponseError
    return link, handler, clock


def outcome(d: Deferred[Any]) -> list[Any]:
    """[result] or [Failure] once `d` fired, [] while it has not."""
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def go_down(link: RedisLink, handler: FakeHandler, clock: Clock) -> None:
    """One call left unanswered past the timeout: the way a dead Redis looks."""
    result = outcome(link.call("get", "k"))
    clock.advance(TIMEOUT)
    assert isinstance(result[0], Failure) and result[0].check(RedisUnavailable)
    assert not link.up


# --- calls while up -----------------------------------------------------------------------

def test_a_call_answered_in_time_passes_through_and_leaves_no_timer():
    link, handler, clock = make_link()
    result = outcome(link.call("eval", "script", ["k1"], ["take", "1.0", 5, 1]))
    assert [(name, args) for name, args, _ in handler.calls] == [("eval", ("script", ["k1"], ["take", "1.0", 5, 1]))]
    clock.advance(TIMEOUT * 0.9)
    assert result == []
    handler.calls[0][2].callback([1, "4.000000"])
    assert result == [[1, "4.000000"]]
    assert clock.getDelayedCalls() == []        # the timeout was cancelled with the answer
    clock.advance(10 * TIMEOUT)
    assert link.up and link.errors == 0 and link.outages == 0
    assert link.state["state"] == "up" and link.state["last_error"] is None


def test_a_call_unanswered_for_timeout_fails_and_marks_redis_down_once(events):
    link, _, clock = make_link()
    t0 = clock.seconds()
    first = outcome(link.call("get", "a"))
    clock.advance(0.1)
    second = outcome(link.call("get", "b"))         # also in flight when Redis stops answering
    clock.advance(TIMEOUT - 0.1 - 1e-6)
    assert first == [] and link.up                  # not before the timeout
    clock.advance(1e-6)
    assert isinstance(first[0], Failure) and first[0].check(RedisUnavailable)
    assert "no answer within 200ms" in first[0].getErrorMessage()
    assert not link.up
    clock.advance(0.1)
    assert isinstance(second[0], Failure) and second[0].check(RedisUnavailable)
    state = link.state
    assert state["state"] == "down"
    assert state["since"] == pytest.approx(t0 + TIMEOUT)     # when the first call gave up
    assert state["errors"] == 2 and state["outages"] == 1
    assert state["last_error"] == "no answer within 200ms"
    assert state["where"] == "redis://127.0.0.1:6379/0"
    lost = [e for e in events if "redis lost" in formatEvent(e)]
    assert len(lost) == 1 and lost[0]["log_level"] == LogLevel.warn
    assert "no answer within 200ms" in formatEvent(lost[0])


@pytest.mark.parametrize("error", [ConnectionRefusedError("refused"), FakeResponseError("LOADING Redis is loading"),
                                   FakeResponseError("MASTERDOWN Link with MASTER is down")])
def test_connection_errors_and_loading_or_masterdown_replies_mark_down(error, events):
    link, handler, _ = make_link()
    result = outcome(link.call("get", "k"))
    handler.calls[0][2].errback(Failure(error))
    assert result[0].check(RedisUnavailable)
    assert not link.up and link.outages == 1 and link.errors == 1
    assert str(error) in link.last_error
    assert len(messages(events, "redis lost")) == 1


# --- while down ---------------------------------------------------------------------------

def test_while_down_calls_fail_at_once_without_touching_the_handler():
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    sent = len(handler.calls)
    for _ in range(5):
        result = outcome(link.call("eval", "script", ["k"], ["take"]))
        assert isinstance(result[0], Failure) and result[0].check(RedisUnavailable)   # at once: no clock advance
        assert "no answer within 200ms" in result[0].getErrorMessage()
    assert len(handler.calls) == sent
    assert link.errors == 1 and link.outages == 1   # refusals while down are not new errors


def test_probes_back_off_from_a_quarter_second_doubling_to_five_seconds():
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    down_at = clock.seconds()
    for _ in range(8):                              # PING fails at once (connection refused)
        clock.advance(min(d.getTime() for d in clock.getDelayedCalls()) - clock.seconds())
        handler.pings[-1][1].errback(Failure(ConnectionRefusedError("refused")))
    times = [down_at] + [t for t, _ in handler.pings]
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(times)]
    assert gaps == [0.25, 0.5, 1, 2, 4, 5, 5, 5]
    assert (PROBE_FIRST, PROBE_MAX) == (0.25, 5.0)
    assert not link.up and link.outages == 1
    assert link.errors == 1 + 8                     # the call, then every failed probe
    assert "refused" in link.last_error
    assert handler.calls[1:] == []                  # probes are PINGs, never the caller's commands


def test_an_unanswered_probe_times_out_and_the_next_waits_its_delay_after_that():
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    down_at = clock.seconds()
    clock.advance(PROBE_FIRST)
    assert [t for t, _ in handler.pings] == [pytest.approx(down_at + PROBE_FIRST)]
    clock.advance(TIMEOUT)                          # PING not answered: timed out
    assert handler.pings[0][1].called
    clock.advance(0.5 - 1e-6)
    assert len(handler.pings) == 1
    clock.advance(1e-6)
    assert [t for t, _ in handler.pings][1] == pytest.approx(down_at + PROBE_FIRST + TIMEOUT + 0.5)
    assert not link.up and link.errors == 2


def test_a_ping_answer_brings_redis_back_logged_once_and_probing_stops(events):
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    down_at = clock.seconds()
    clock.advance(PROBE_FIRST)
    handler.pings[0][1].errback(Failure(ConnectionRefusedError("refused")))
    clock.advance(0.5)
    handler.pings[1][1].callback("PONG")
    assert link.up
    state = link.state
    assert state["state"] == "up" and state["since"] == pytest.approx(down_at + 0.75)
    assert state["outages"] == 1 and state["errors"] == 2
    back = messages(events, "redis back")
    assert len(back) == 1 and "after 0.8s" in back[0]
    assert len(messages(events, "redis lost")) == 1
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert len(handler.pings) == 2                  # no probing while up
    result = outcome(link.call("get", "k"))         # calls reach Redis again
    handler.calls[-1][2].callback("v")
    assert result == ["v"]


def test_a_second_outage_probes_from_a_quarter_second_again(events):
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    for delay in (0.25, 0.5, 1.0, 2.0):
        clock.advance(delay)
        handler.pings[-1][1].errback(Failure(ConnectionRefusedError("refused")))
    clock.advance(4.0)
    handler.pings[-1][1].callback("PONG")
    assert link.up
    go_down(link, handler, clock)
    again = clock.seconds()
    clock.advance(PROBE_FIRST)
    assert handler.pings[-1][0] == pytest.approx(again + PROBE_FIRST)
    assert link.outages == 2
    assert len(messages(events, "redis lost")) == 2 and len(messages(events, "redis back")) == 1


# --- failures that are not Redis being down -------------------------------------------------

def test_a_cancelled_call_the_client_left_does_not_mark_down(events):
    link, _, clock = make_link()
    d = link.call("get", "k")
    result = outcome(d)
    clock.advance(TIMEOUT / 2)
    d.cancel()
    assert isinstance(result[0], Failure) and result[0].check(CancelledError)
    assert not result[0].check(RedisUnavailable)
    assert link.up and link.errors == 0 and link.outages == 0 and link.last_error is None
    assert clock.getDelayedCalls() == []            # no timeout left to fire, no probe
    clock.advance(10)
    assert link.up and events == []


def test_an_error_reply_about_the_call_fails_it_but_redis_stays_up(events):
    link, handler, clock = make_link()
    result = outcome(link.call("eval", "script", ["k"], []))
    handler.calls[0][2].errback(Failure(FakeResponseError("ERR wrong number of args for 'eval' command")))
    assert isinstance(result[0], Failure) and result[0].check(RedisUnavailable)
    assert "ERR wrong number of args" in result[0].getErrorMessage()
    assert link.up and link.state["state"] == "up" and link.outages == 0
    assert link.errors == 1
    assert clock.getDelayedCalls() == []            # no probe
    assert messages(events, "redis lost") == []
    after = outcome(link.call("get", "k"))          # the next call still goes to Redis
    assert len(handler.calls) == 2
    handler.calls[1][2].callback("v")
    assert after == ["v"]


def test_readonly_marks_down_and_drops_every_connection(events):
    link, handler, clock = make_link(connections=3)
    result = outcome(link.call("eval", "script", ["k"], []))
    handler.calls[0][2].errback(Failure(FakeResponseError("READONLY You can't write against a read only replica.")))
    assert result[0].check(RedisUnavailable)
    assert [c.transport.lost for c in handler._factory.pool] == [1, 1, 1]
    assert not link.up and link.outages == 1
    assert "READONLY" in link.last_error
    assert len(messages(events, "redis lost")) == 1
    clock.advance(PROBE_FIRST)
    assert len(handler.pings) == 1                  # probing for the new master


def test_other_calls_are_not_dropped_by_an_ordinary_error_reply():
    link, handler, _ = make_link(connections=2)
    outcome(link.call("get", "k"))
    handler.calls[0][2].errback(Failure(FakeResponseError("WRONGTYPE Operation against a key")))
    assert [c.transport.lost for c in handler._factory.pool] == [0, 0]
    assert link.up


# --- stop -----------------------------------------------------------------------------------

def test_stop_cancels_the_probe_and_disconnects():
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    assert len(clock.getDelayedCalls()) == 1        # the probe
    d = link.stop()
    assert outcome(d) == [None]
    assert handler.disconnected == 1
    assert clock.getDelayedCalls() == []
    clock.advance(60)
    assert handler.pings == []
    result = outcome(link.call("get", "k"))         # stopped: fails at once
    assert result[0].check(RedisUnavailable)


def test_a_probe_answered_after_stop_changes_nothing(events):
    link, handler, clock = make_link()
    go_down(link, handler, clock)
    clock.advance(PROBE_FIRST)
    assert len(handler.pings) == 1
    link.stop()
    handler.pings[0][1].callback("PONG")
    assert not link.up and messages(events, "redis back") == []
    assert clock.getDelayedCalls() == []


def test_stop_with_a_call_in_flight_does_not_log_redis_lost(events):
    link, handler, clock = make_link()
    result = outcome(link.call("get", "k"))
    link.stop()
    # txredisapi fails calls still out on the closed connections: ConnectionError("Lost connection")
    handler.calls[0][2].errback(Failure(ConnectionError("Lost connection")))
    assert result and isinstance(result[0], Failure)
    assert messages(events, "redis lost") == []
    assert clock.getDelayedCalls() == []


def test_a_call_waiting_on_its_command_is_still_bounded():
    """txredisapi's handler Deferred fires with the connection and then waits on the command's
    own Deferred: it is `called` by then, and must still fail at the timeout."""
    link, handler, clock = make_link()
    command: Deferred[Any] = Deferred()
    outer: Deferred[Any] = Deferred()
    outer.addCallback(lambda _connection: command)      # as ConnectionHandler.wrapper chains it
    handler.get = lambda *args: outer                  # type: ignore[method-assign]
    result = outcome(link.call("get", "k"))
    outer.callback("connection")
    assert outer.called and not result
    clock.advance(TIMEOUT)
    assert result and isinstance(result[0], Failure) and result[0].check(RedisUnavailable)
    assert link.state["state"] == "down"
