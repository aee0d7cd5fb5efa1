"""The hybrid rate-limit store and the bucket script it shares with the redis backend.

Three layers:
- HybridStore against a fake link and `task.Clock`: the link's `eval` calls are recorded and
  answered by a small Python model of BUCKET_LUA (or by hand), so every decision is exact.
- BUCKET_LUA itself, run by a real redis-server (synchronous, tests.redisproc.command).
- Two HybridStore instances sharing one real Redis through a real RedisLink, driven well above
  the limit for a few seconds of real time: the measured admissions against the bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import Clock, LoopingCall, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from txgateway.filters.ratelimit.filter import Decision
from txgateway.filters.ratelimit.redisconfig import RedisConfig
from txgateway.filters.ratelimit.redislink import RedisLink, RedisUnavailable
from txgateway.filters.ratelimit.redisstore import BUCKET_LUA, KEY_PREFIX, HybridStore

INTERVAL = 0.1
SYNC_BATCH = 256                            # keys per script call (README: one call per 256 keys)
TOKENS = re.compile(r"^-?\d+\.\d{6}$")     # what the script returns: '%.6f'


# --- a fake link answering like BUCKET_LUA --------------------------------------------------

class BucketModel:
    """BUCKET_LUA in Python: per key (tokens, updated), time from `now` (Redis TIME)."""

    def __init__(self, now: Any) -> None:
        self.now = now
        self.keys: dict[str, tuple[float, float]] = {}

    def run(self, keys: list[str], args: list[Any]) -> str:
        mode, now, out = args[0], self.now(), []
        for i, key in enumerate(keys):
            rate, burst, cost = float(args[3 * i + 1]), float(args[3 * i + 2]), float(args[3 * i + 3])
            tokens, updated = self.keys.get(key, (burst, now))
            tokens = min(burst, tokens + max(0.0, now - updated) * rate)
            allowed = 0
            if mode == "charge":
                tokens, allowed = max(-burst, tokens - cost), 1
            elif tokens >= cost - 1e-9:
                tokens, allowed = tokens - cost, 1
            self.keys[key] = (float("%.6f" % tokens), now)
            out.append(f"{allowed} {tokens:.6f}")
        return " ".join(out)


@dataclass
class Call:
    keys: list[str]
    args: list[Any]
    d: Deferred[Any]

    @property
    def mode(self) -> str:
        return str(self.args[0])

    def costs(self) -> list[int]:
        return [int(c) for c in self.args[3::3]]


class FakeLink:
    """What HybridStore uses of a RedisLink. `auto`: every call is answered at once by the model;
    otherwise calls wait in `calls` until `answer()` / `fail()`."""

    def __init__(self, clock: Clock, auto: bool = True) -> None:
        self.clock = clock
        self.up = True
        self.last_error: str | None = None
        self.auto = auto
        self.model = BucketModel(clock.seconds)
        self.calls: list[Call] = []
        self.started = self.stopped = 0

    def start(self) -> None:
        self.started += 1

    def stop(self) -> None:
        self.stopped += 1

    def call(self, command: str, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        assert command == "eval" and script == BUCKET_LUA
        if not self.up:
            d: Deferred[Any] = Deferred()
            d.errback(RedisUnavailable(self.last_error or "down"))
            return d
        call = Call(list(keys), list(args), Deferred())
        self.calls.append(call)
        if self.auto:
            self.answer(call)
        return call.d

    def answer(self, call: Call, reply: str | None = None) -> None:
        call.d.callback(self.model.run(call.keys, call.args) if reply is None else reply)

    def fail(self, call: Call, error: Exception) -> None:
        call.d.errback(Failure(error))

    def go_down(self, reason: str = "no answer within 200ms") -> None:
        self.up, self.last_error = False, reason


def result_of(value: Decision | Deferred[Decision], clock: Clock) -> Any:
    """A Decision, or what a Deferred fired with (a Failure included) once the reactor turn
    is over (takes asked for in one turn may go to Redis together); AssertionError if pending."""
    if isinstance(value, Decision):
        return value
    clock.advance(0)
    out: list[Any] = []
    value.addBoth(out.append)
    assert out, "the take is still waiting for Redis"
    return out[0]


def make_store(auto: bool = True, max_buckets: int = 100_000) -> tuple[HybridStore, FakeLink, Clock]:
    clock = Clock()
    clock.advance(500.0)
    link = FakeLink(clock, auto)
    return HybridStore(link, clock, INTERVAL, max_buckets), link, clock  # type: ignore[arg-type]


def seed(store: HybridStore, key: str, per_second: float, burst: int) -> Decision:
    """The first take of a key (decided by Redis, auto-answered), which seeds the local bucket."""
    decision = result_of(store.take(key, per_second, burst), store.clock)
    assert isinstance(decision, Decision) and key in store.buckets
    return decision


# --- unknown keys: decided by Redis, then seeded ----------------------------------------------

def test_an_unknown_key_is_decided_by_redis_in_take_mode_and_seeds_the_local_bucket():
    store, link, clock = make_store(auto=False)
    pending = store.take("k", 2.0, 5)
    assert isinstance(pending, Deferred) and not pending.called
    clock.advance(0)
    (call,) = link.calls
    assert call.keys == [KEY_PREFIX + "k"]
    assert call.args == ["take", "2.0", 5, 1]
    assert store.buckets == {}                      # nothing local until Redis answered
    clock.advance(0.01)
    link.answer(call, "1 3.250000")              # another instance took some already
    decision = result_of(pending, clock)
    assert (decision.allowed, decision.remaining, decision.per_second, decision.burst) == (True, 3.25, 2.0, 5)
    assert store.buckets["k"] == [3.25, clock.seconds(), 2.0, 5, 0, 0]   # pending 0: Redis counted it


def test_later_takes_are_answered_locally_without_calls_until_the_bucket_is_empty():
    store, link, _ = make_store()
    seed(store, "k", 0.001, 4)                      # Redis: 4 -> 3
    decisions = [store.take("k", 0.001, 4) for _ in range(4)]
    assert all(isinstance(d, Decision) for d in decisions)
    assert [d.allowed for d in decisions] == [True, True, True, False]   # type: ignore[union-attr]
    assert len(link.calls) == 1
    assert store.buckets["k"][4] == 3               # pending: admitted here, not yet charged; the refusal is free


def test_a_refusal_from_redis_seeds_an_empty_bucket():
    store, link, _ = make_store()
    link.model.keys[KEY_PREFIX + "k"] = (0.0, 500.0)
    decision = seed(store, "k", 0.001, 3)
    assert not decision.allowed
    assert not store.take("k", 0.001, 3).allowed   # type: ignore[union-attr]
    assert len(link.calls) == 1


def test_a_failed_first_take_fails_with_redis_unavailable_and_seeds_nothing():
    store, link, clock = make_store(auto=False)
    pending = store.take("k", 1.0, 3)
    clock.advance(0)
    link.fail(link.calls[0], RedisUnavailable("no answer within 200ms"))
    failure = result_of(pending, clock)
    assert isinstance(failure, Failure) and failure.check(RedisUnavailable)
    assert store.buckets == {}


def test_beyond_max_buckets_new_keys_are_decided_by_redis_every_time():
    store, link, clock = make_store(max_buckets=1)
    seed(store, "a", 1.0, 5)
    for _ in range(3):
        assert result_of(store.take("b", 1.0, 5), clock).allowed
    assert list(store.buckets) == ["a"]
    assert [c.keys for c in link.calls] == [[KEY_PREFIX + "a"]] + [[KEY_PREFIX + "b"]] * 3
    assert link.model.keys[KEY_PREFIX + "b"][0] == 2.0    # exact in Redis


# --- sync ---------------------------------------------------------------------------------

def test_sync_charges_admissions_in_one_call_per_256_keys():
    store, link, _ = make_store()
    keys = [f"k{i}" for i in range(2 * SYNC_BATCH + 88)]
    for i, key in enumerate(keys):
        seed(store, key, 0.5, 10)
        for _ in range(i % 3):                      # 0, 1 or 2 admitted locally per key
            assert store.take(key, 0.5, 10).allowed    # type: ignore[union-attr]
    link.calls.clear()
    link.auto = False
    store.sync()
    assert [len(c.keys) for c in link.calls] == [SYNC_BATCH, SYNC_BATCH, 88]
    assert [k for c in link.calls for k in c.keys] == [KEY_PREFIX + k for k in keys]
    assert all(c.mode == "charge" for c in link.calls)
    assert all(c.args[1::3] == ["0.5"] * len(c.keys) and c.args[2::3] == [10] * len(c.keys) for c in link.calls)
    assert [cost for c in link.calls for cost in c.costs()] == [i % 3 for i in range(len(keys))]
    assert all(b[4] == 0 and b[5] == i % 3 for i, b in enumerate(store.buckets.values()))   # in flight now
    for call in link.calls:
        link.answer(call)
    assert store.syncs == 1 and not store._syncing
    assert all(b[5] == 0 for b in store.buckets.values())
    for i, key in enumerate(keys):                  # Redis charged exactly what was admitted
        assert link.model.keys[KEY_PREFIX + key][0] == pytest.approx(9 - i % 3)
        assert store.buckets[key][0] == pytest.approx(9 - i % 3)


def test_local_tokens_are_what_redis_has_left_minus_what_was_admitted_since_the_sync_went_out():
    store, link, clock = make_store()
    seed(store, "k", 1.0, 10)                       # Redis 9, local 9
    for _ in range(3):
        store.take("k", 1.0, 10)
    link.auto = False
    store.sync()
    (call,) = link.calls[1:]
    assert call.costs() == [3]
    store.take("k", 1.0, 10)                        # admitted while the sync is out
    store.take("k", 1.0, 10)
    clock.advance(0.02)
    link.answer(call, "1 4.000000")              # another instance used some too
    tokens, updated, _, _, pending, in_flight = store.buckets["k"]
    assert tokens == pytest.approx(4.0 - 2) and updated == clock.seconds()
    assert (pending, in_flight) == (2, 0)
    store.sync()                                    # the two go out with the next sync
    assert link.calls[-1].costs() == [2]


def test_debt_reported_by_redis_refuses_locally_until_refilled():
    store, link, clock = make_store()
    seed(store, "k", 1.0, 5)
    store.take("k", 1.0, 5)
    link.auto = False
    store.sync()
    link.answer(link.calls[-1], "1 -3.000000")   # instances together admitted 3 beyond the budget
    assert store.buckets["k"][0] == -3.0
    refused = store.take("k", 1.0, 5)
    assert isinstance(refused, Decision) and not refused.allowed
    assert refused.retry_after == 4                 # 4 tokens short of one at 1/s
    clock.advance(4.0 - 1e-3)
    assert not store.take("k", 1.0, 5).allowed     # type: ignore[union-attr]
    clock.advance(1e-3)
    assert store.take("k", 1.0, 5).allowed         # type: ignore[union-attr]
    assert not store.take("k", 1.0, 5).allowed     # type: ignore[union-attr]
    assert len(link.calls) == 2                     # all answered here


def test_full_idle_buckets_are_forgotten_at_sync_and_busy_ones_kept():
    store, link, clock = make_store()
    seed(store, "idle", 1.0, 2)                     # Redis 1 of 2: full again after 1 s
    seed(store, "busy", 1.0, 2)
    seed(store, "refilled-but-pending", 10.0, 2)
    store.take("refilled-but-pending", 10.0, 2)
    clock.advance(0.5)
    store.take("busy", 1.0, 2)
    clock.advance(0.6)                              # idle full; busy 1.1 s after 2 takes: 1.6 of 2
    calls = len(link.calls)
    store.sync()
    assert set(store.buckets) == {"busy", "refilled-but-pending"}
    (call,) = link.calls[calls:]
    assert call.keys == [KEY_PREFIX + "busy", KEY_PREFIX + "refilled-but-pending"]
    assert call.costs() == [1, 1]
    clock.advance(5.0)
    store.sync()                                    # everything full and nothing pending: no call at all
    assert store.buckets == {} and len(link.calls) == calls + 1
    assert result_of(store.take("idle", 1.0, 2), clock).allowed
    assert link.calls[-1].mode == "take"            # a forgotten key goes to Redis again


def test_a_sync_in_flight_is_not_doubled():
    store, link, _ = make_store()
    seed(store, "k", 1.0, 10)
    store.take("k", 1.0, 10)
    link.auto = False
    first = store.sync()
    assert isinstance(first, Deferred)
    store.take("k", 1.0, 10)
    assert store.sync() is None                     # the first is still out
    assert len(link.calls) == 2
    link.answer(link.calls[1])
    assert first.called and store.syncs == 1
    store.sync()
    assert len(link.calls) == 3 and link.calls[2].costs() == [1]


def test_the_ticker_syncs_every_interval_and_waits_for_a_slow_sync():
    store, link, clock = make_store()
    store.start()
    assert link.started == 1
    seed(store, "k", 1.0, 10)
    store.take("k", 1.0, 10)
    link.auto = False
    clock.advance(INTERVAL)
    assert len(link.calls) == 2 and link.calls[1].mode == "charge"
    store.take("k", 1.0, 10)
    clock.advance(5 * INTERVAL)                     # the sync is still out: no second one
    assert len(link.calls) == 2
    link.answer(link.calls[1])
    clock.advance(INTERVAL)
    assert len(link.calls) == 3 and link.calls[2].costs() == [1]
    link.answer(link.calls[2])
    store.stop()
    assert link.stopped == 1
    clock.advance(10 * INTERVAL)
    assert len(link.calls) == 3


def test_a_failed_sync_clears_the_local_buckets():
    store, link, clock = make_store()
    for key in ("a", "b"):
        seed(store, key, 1.0, 10)
        store.take(key, 1.0, 10)
    link.auto = False
    done = store.sync()
    link.fail(link.calls[-1], RedisUnavailable("no answer within 200ms"))
    assert store.buckets == {} and not store._syncing and store.syncs == 0
    assert result_of(done, clock) is None           # handled: nothing left failing unseen
    pending = store.take("a", 1.0, 10)
    clock.advance(0)
    assert isinstance(pending, Deferred) and link.calls[-1].mode == "take"


def test_one_failed_batch_of_several_clears_everything_and_an_unexpected_error_is_logged():
    store, link, _ = make_store()
    keys = [f"k{i}" for i in range(SYNC_BATCH + 1)]
    for key in keys:
        seed(store, key, 1.0, 10)
    link.auto = False
    logged: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        store.sync()
        first, second = link.calls[-2:]
        link.answer(first)
        link.fail(second, ValueError("a reply that is not a list"))
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert store.buckets == {} and not store._syncing
    assert [formatEvent(e) for e in logged if e.get("log_namespace") == "txgateway.filters.ratelimit.filter"] == ["rate-limit sync failed"]


def test_while_the_link_is_down_take_raises_and_sync_sends_nothing():
    store, link, _ = make_store()
    seed(store, "k", 1.0, 10)
    store.take("k", 1.0, 10)
    link.go_down("no answer within 200ms")
    with pytest.raises(RedisUnavailable, match="no answer within 200ms"):
        store.take("k", 1.0, 10)
    with pytest.raises(RedisUnavailable):
        store.take("unknown", 1.0, 10)
    calls = len(link.calls)
    assert store.sync() is None
    assert len(link.calls) == calls


# --- BUCKET_LUA in a real Redis ---------------------------------------------------------------

def run_script(redis_server: Any, mode: str, *buckets: tuple[str, float, int, int]) -> list[Any]:
    keys = [key for key, _, _, _ in buckets]
    args: list[Any] = [mode]
    for _, rate, burst, cost in buckets:
        args += [repr(rate), burst, cost]
    reply = redis_server.command("EVAL", BUCKET_LUA, len(keys), *keys, *args)
    assert isinstance(reply, str), reply           # one bulk string (see BUCKET_LUA)
    values = reply.split()
    return [int(v) if i % 2 == 0 else v for i, v in enumerate(values)]


def redis_now(redis_server: Any) -> float:
    seconds, micros = redis_server.command("TIME")
    return int(seconds) + int(micros) / 1e6


def test_script_take_mode_is_exact_and_answers_tokens_as_strings(redis_server):
    replies = [run_script(redis_server, "take", ("b", 1e-6, 3, 1)) for _ in range(4)]
    assert [allowed for allowed, _ in replies] == [1, 1, 1, 0]
    assert all(isinstance(tokens, str) and TOKENS.match(tokens) for _, tokens in replies)
    assert [float(tokens) for _, tokens in replies] == pytest.approx([2, 1, 0, 0], abs=1e-4)


def test_script_keeps_fractions_that_redis_would_truncate(redis_server):
    now = redis_now(redis_server)
    redis_server.command("HSET", "f", "t", "0.5", "u", "%.6f" % now)
    allowed, tokens = run_script(redis_server, "take", ("f", 1e-3, 3, 1))
    assert allowed == 0                             # half a token is not one
    assert TOKENS.match(tokens) and 0.5 <= float(tokens) < 0.51
    # Refill uses Redis TIME: 1.5 s ago at 2/s from 0 is 3 tokens, capped at the burst of 2.
    redis_server.command("HSET", "g", "t", "0", "u", "%.6f" % (now - 1.5))
    allowed, tokens = run_script(redis_server, "take", ("g", 2.0, 2, 1))
    assert allowed == 1 and float(tokens) == pytest.approx(1.0, abs=0.05)
    redis_server.command("HSET", "h", "t", "0", "u", "%.6f" % (redis_now(redis_server) - 0.3))
    allowed, tokens = run_script(redis_server, "take", ("h", 2.0, 5, 1))
    assert allowed == 0 and float(tokens) == pytest.approx(0.6, abs=0.05)


def test_script_charge_mode_always_admits_and_goes_into_debt_down_to_minus_burst(redis_server):
    assert run_script(redis_server, "charge", ("c", 1e-6, 3, 5)) == [1, "-2.000000"]
    allowed, tokens = run_script(redis_server, "charge", ("c", 1e-6, 3, 5))
    assert allowed == 1 and float(tokens) == pytest.approx(-3.0, abs=1e-4)   # floor: -burst
    allowed, tokens = run_script(redis_server, "take", ("c", 1e-6, 3, 1))
    assert allowed == 0 and float(tokens) == pytest.approx(-3.0, abs=1e-4)   # a refusal costs nothing
    allowed, tokens = run_script(redis_server, "charge", ("c", 1e-6, 3, 0))
    assert allowed == 1 and float(tokens) == pytest.approx(-3.0, abs=1e-4)   # cost 0: a read


def test_script_charges_several_keys_in_one_call(redis_server):
    reply = run_script(redis_server, "charge", ("x", 1e-6, 10, 4), ("y", 1e-6, 2, 0), ("z", 1e-6, 5, 9))
    assert reply[0::2] == [1, 1, 1]
    assert [float(t) for t in reply[1::2]] == pytest.approx([6, 2, -4], abs=1e-4)


def test_script_sets_the_key_to_expire_when_the_bucket_would_be_full(redis_server):
    run_script(redis_server, "charge", ("e", 1.0, 3, 5))           # -2 of 3 at 1/s: full in 5 s
    assert 4900 < redis_server.command("PTTL", "e") <= 5001
    run_script(redis_server, "take", ("e2", 2.0, 3, 1))            # 2 of 3 at 2/s: full in 0.5 s
    assert 400 < redis_server.command("PTTL", "e2") <= 501
    run_script(redis_server, "charge", ("e3", 2.0, 3, 0))          # full: gone at once
    assert redis_server.command("PTTL", "e3") in (-2, 0, 1)


def test_script_treats_an_absent_key_as_a_full_bucket(redis_server):
    assert redis_server.command("EXISTS", "a") == 0
    allowed, tokens = run_script(redis_server, "take", ("a", 1e-6, 7, 1))
    assert allowed == 1 and float(tokens) == pytest.approx(6.0, abs=1e-4)
    redis_server.command("DEL", "a")                                # what expiry does
    allowed, tokens = run_script(redis_server, "take", ("a", 1e-6, 7, 1))
    assert allowed == 1 and float(tokens) == pytest.approx(6.0, abs=1e-4)
    assert redis_server.command("HGET", "a", "t") == tokens


# --- two hybrid instances sharing one real Redis --------------------------------------------

class SharedLink:
    """One started RedisLink shared by two stores: their start/stop leave it alone."""

    def __init__(self, link: RedisLink) -> None:
        self._link = link
        self.clock = link.clock

    @property
    def up(self) -> bool:
        return self._link.up

    @property
    def last_error(self) -> str | None:
        return self._link.last_error

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        return self._link.call(command, *args)


RATE = 50.0             # tokens per second
BURST = 20
SYNC = 0.05             # sync_interval
DURATION = 3.0          # seconds of load, real time
TICK = 0.01
PER_TICK = 2            # takes per instance per tick: 200/s each, 400/s offered against 50/s


@pytest_twisted.ensureDeferred
async def test_two_hybrid_instances_share_one_limit_on_a_real_redis(reactor, redis_server):
    link = RedisLink(RedisConfig(port=redis_server.port, timeout=0.5), reactor)
    link.start()
    stores = [HybridStore(SharedLink(link), reactor, SYNC) for _ in range(2)]  # type: ignore[arg-type]
    admitted = [0, 0]
    offered = [0]
    failures: list[Failure] = []
    waiting: list[Deferred[Any]] = []

    def count(decision: Decision, i: int) -> None:
        admitted[i] += decision.allowed

    def tick() -> None:
        for i, store in enumerate(stores):
            for _ in range(PER_TICK):
                offered[0] += 1
                result = store.take("shared", RATE, BURST)
                if isinstance(result, Deferred):
                    waiting.append(result.addCallback(count, i).addErrback(failures.append))
                else:
                    admitted[i] += result.allowed

    load = LoopingCall(tick)
    load.clock = reactor
    try:
        for store in stores:
            store.start()
        started = reactor.seconds()
        load.start(TICK, now=True)
        await deferLater(reactor, DURATION, lambda: None)
        load.stop()
        elapsed = reactor.seconds() - started
        await DeferredList(waiting)
        await deferLater(reactor, 3 * SYNC, lambda: None)       # the last admissions charged to Redis
        raw = redis_server.command("HGET", KEY_PREFIX + "shared", "t")
        left = float(BURST if raw is None else raw)                # an expired key is a full bucket
        state = link.state                          # before stop(), which cuts calls still out
    finally:
        if load.running:
            load.stop()
        for store in stores:
            store.stop()
        await deferLater(reactor, SYNC, lambda: None)              # a sync still out gets its answer
        await link.stop()
    total = sum(admitted)
    ideal = BURST + RATE * elapsed
    n = len(stores)
    bound = ideal + n * RATE * SYNC + (n - 1) * BURST
    print(f"\nhybrid x{n}: offered {offered[0]} in {elapsed:.3f}s, admitted {admitted} = {total}, "
          f"ideal {ideal:.1f}, bound {bound:.1f}, over {total - ideal:+.1f} ({total / ideal - 1:+.1%}), "
          f"redis tokens left {left:.3f}, syncs {[s.syncs for s in stores]}")
    assert failures == [] and state["errors"] == 0 and state["state"] == "up", (failures, state)
    assert offered[0] > 5 * ideal                   # the load really was well above the limit
    assert all(s.syncs >= DURATION / SYNC / 2 for s in stores)
    assert all(a > 0 for a in admitted)             # both instances got a share
    assert total <= bound
    assert total >= 0.9 * ideal
    # Everything admitted was charged: what Redis has left is the budget minus the admissions
    # (the floor at -burst may have forgiven some onset over-admission, never more than one burst).
    assert -BURST <= left <= BURST


def test_a_key_seeded_while_redis_is_in_debt_keeps_the_debt():
    store, link, clock = make_store()
    link.model.keys["txgw:rl:k"] = (-3.0, clock.seconds())      # other instances overdrew the bucket
    decision = seed(store, "k", 1.0, 5)
    assert not decision.allowed
    clock.advance(1.0)                                           # Redis would be at -2 now
    assert not store.take("k", 1.0, 5).allowed


def test_several_first_takes_in_one_turn_seed_from_the_last_answer():
    store, link, clock = make_store()
    firsts = [store.take("k", 1e-6, 10) for _ in range(5)]          # one turn: one script call, Redis 10 -> 5
    clock.advance(0)
    assert all(d.called for d in firsts) and len(link.calls) == 1
    assert link.model.keys["txgw:rl:k"][0] == 5.0
    admitted_locally = sum(store.take("k", 1e-6, 10).allowed for _ in range(20))
    assert admitted_locally == 5, admitted_locally                    # got 9: 14 admitted from a burst of 10


def test_headers_through_the_filter_with_a_hybrid_bucket_in_debt():
    """Debt in Redis shows as 0 remaining (never negative), and Retry-After counts the debt."""
    from tests.test_ratelimit import limiter, rate_headers, request
    store, link, clock = make_store()
    f, config = limiter(clock, store=store)
    ctx = request(config, "/own")                  # 100/minute, burst 20
    f.on_request(ctx)
    clock.advance(0)
    key = next(iter(store.buckets))
    link.auto = False
    store.take(key, 100 / 60, 20)
    store.sync()
    link.answer(link.calls[-1], "1 -3.000000")
    ctx = request(config, "/own")
    response = f.on_request(ctx)
    assert response is not None and response.status == 429
    headers = rate_headers(f, ctx)
    assert headers["x-ratelimit-remaining"] == "0" and 'r=0;' in headers["ratelimit"], headers
