"""Token buckets shared through Redis: `redis` (exact) and `hybrid` (local answers, shared budget).

Both run one Lua script (BUCKET_LUA) that refills buckets with the time from Redis `TIME`,
so gateway clocks never matter, and sets each key to expire when its bucket would be full.
txredisapi sends it with EVALSHA and sends the source again after NOSCRIPT (a restarted or
flushed Redis). Redis >= 5 is needed (scripts replicated by effects, so `TIME` is allowed).

`redis`: every decision is made by the script in Redis: exact across instances. Decisions
asked for in one reactor turn share one script call (one round trip).

`hybrid`: each instance answers from in-process buckets and, every `sync_interval`, charges
what it admitted to the shared buckets and reads back what is left, in one script call per
256 keys. The shared bucket may go into debt (down to -burst), so what instances admitted
beyond the budget is paid back by admitting less afterwards: the long-run rate is exact and
over-admission is transient, at most about instances x rate x sync_interval per interval
(plus, at the onset of a burst on a fresh key, what every instance saw in the bucket at its
last sync). A key an instance has not seen is decided by Redis (exact) and seeds the local
bucket; a key whose local bucket is full again is forgotten, so memory stays bounded.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure

from txgateway.core.periodic import Periodic
from txgateway.filters.ratelimit.filter import _SLACK, Decision, take
from txgateway.filters.ratelimit.redislink import RedisLink, RedisUnavailable

__all__ = ["BUCKET_LUA", "HybridStore", "RedisStore", "parse_reply"]

_log = Logger(namespace="txgateway.filters.ratelimit.filter")

KEY_PREFIX = "txgw:rl:"
SCRIPT_KEYS = 256           # keys per script call: bounds how long one call holds Redis

# ARGV[1] is the mode: "take" (one token if there is one) or "charge" (subtract the cost
# unconditionally, down to -burst). Then (per_second, burst, cost) for each key in KEYS.
# Returns ONE string, "allowed tokens" per key ("1 4.000000 0 0.500000"): Redis truncates
# Lua numbers, and a reply of one bulk string per value costs txredisapi a reactor turn per
# value (its LineReceiver re-enters through callLater(0) after each bulk string), which
# under load made a 250-key answer take 0.3-0.7 s.
BUCKET_LUA = """
local mode = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local out = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[3 * i - 1])
  local burst = tonumber(ARGV[3 * i])
  local cost = tonumber(ARGV[3 * i + 1])
  local state = redis.call('HMGET', key, 't', 'u')
  local tokens = tonumber(state[1]) or burst
  local updated = tonumber(state[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - updated) * rate)
  local allowed = 0
  if mode == 'charge' then
    tokens = math.max(-burst, tokens - cost)
    allowed = 1
  elseif tokens >= cost - 1e-9 then
    tokens = tokens - cost
    allowed = 1
  end
  redis.call('HSET', key, 't', string.format('%.6f', tokens), 'u', string.format('%.6f', now))
  redis.call('PEXPIRE', key, math.ceil((burst - tokens) / rate * 1000) + 1)
  out[i] = allowed .. ' ' .. string.format('%.6f', tokens)
end
return table.concat(out, ' ')
"""


def parse_reply(reply: str) -> list[tuple[bool, float]]:
    """BUCKET_LUA's answer: (allowed, tokens left) per key, in KEYS order."""
    values = reply.split()
    return [(values[i] == "1", float(values[i + 1])) for i in range(0, len(values), 2)]


class RedisStore:
    """`backend: redis`: every decision made in Redis by one atomic script, exact across instances.

    Decisions asked for in the same reactor turn go to Redis together, as one script call
    over their keys (in order, so two takes from one bucket see each other): under load one
    round trip and one send() serve many requests, which is most of what a decision costs.
    """

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self._waiting: list[tuple[str, float, int, Deferred[tuple[bool, float]]]] = []
        self._flush: Any = None

    def start(self) -> None:
        self.link.start()

    def stop(self) -> Deferred[Any] | None:
        return self.link.stop()

    def take(self, key: str, per_second: float, burst: int) -> Deferred[Decision]:
        return self.take_raw(key, per_second, burst).addCallback(
            lambda answer: Decision(answer[0], answer[1], per_second, burst))

    def take_raw(self, key: str, per_second: float, burst: int) -> Deferred[tuple[bool, float]]:
        """(allowed, tokens left in Redis: below zero when the bucket is in debt)."""
        if not self.link.up:
            raise RedisUnavailable(self.link.last_error or "down")
        d: Deferred[tuple[bool, float]] = Deferred()
        self._waiting.append((key, per_second, burst, d))
        if self._flush is None:
            self._flush = self.link.clock.callLater(0, self._send)
        return d

    def _send(self) -> None:
        self._flush = None
        waiting, self._waiting = self._waiting, []
        for start in range(0, len(waiting), SCRIPT_KEYS):
            part = waiting[start:start + SCRIPT_KEYS]
            args: list[Any] = ["take"]
            for _, per_second, burst, _ in part:
                args += [repr(per_second), burst, 1]
            d = self.link.call("eval", BUCKET_LUA, [KEY_PREFIX + key for key, _, _, _ in part], args)
            d.addCallbacks(self._answered, self._unanswered, callbackArgs=(part,), errbackArgs=(part,))

    @staticmethod
    def _answered(reply: str, part: list[tuple[str, float, int, Deferred[tuple[bool, float]]]]) -> None:
        for (_, _, _, d), answer in zip(part, parse_reply(reply), strict=True):
            if not d.called:            # else: the client left meanwhile (cancelled)
                d.callback(answer)

    @staticmethod
    def _unanswered(failure: Failure, part: list[tuple[str, float, int, Deferred[tuple[bool, float]]]]) -> None:
        for _, _, _, d in part:
            if not d.called:
                d.errback(failure)


class HybridStore:
    """`backend: hybrid`: in-process buckets reconciled with Redis every `interval`."""

    def __init__(self, link: RedisLink, clock: Any, interval: float, max_buckets: int = 100_000) -> None:
        self.link = link
        self.clock = clock
        self.exact = RedisStore(link)
        self.max_buckets = max_buckets
        # key -> [tokens, updated, per_second, burst, pending, in_flight]: pending is admitted
        # here and not yet charged to Redis; in_flight is being charged by the running sync.
        self.buckets: dict[str, list[float]] = {}
        self.syncs = 0
        self._syncing = False
        self._ticker = Periodic(clock, interval, self.sync)

    def start(self) -> None:
        self.link.start()
        self._ticker.start()

    def stop(self) -> Deferred[Any] | None:
        self._ticker.stop()
        return self.link.stop()

    def take(self, key: str, per_second: float, burst: int) -> Decision | Deferred[Decision]:
        if not self.link.up:
            raise RedisUnavailable(self.link.last_error or "down")
        bucket = self.buckets.get(key)
        if bucket is None:
            d = self.exact.take_raw(key, per_second, burst)
            return d.addCallback(self._seed, key, per_second, burst)
        now = self.clock.seconds()
        allowed, left = take(bucket[0], bucket[1], now, per_second, burst)
        bucket[0], bucket[1], bucket[2], bucket[3] = left, now, per_second, burst
        if allowed:
            bucket[4] += 1
        return Decision(allowed, left, per_second, burst)

    def _seed(self, answer: tuple[bool, float], key: str, per_second: float, burst: int) -> Decision:
        """Redis decided a key this instance did not hold: hold it from now on, debt included.
        A later answer for the same key (several first takes at once) can only lower it."""
        allowed, tokens = answer
        bucket = self.buckets.get(key)
        if bucket is not None:
            bucket[0] = min(bucket[0], tokens - bucket[4])
        elif self.link.up and len(self.buckets) < self.max_buckets:
            self.buckets[key] = [tokens, self.clock.seconds(), per_second, burst, 0, 0]
        return Decision(allowed, tokens, per_second, burst)

    def sync(self) -> Deferred[None] | None:
        """Charge what was admitted here, read back what is left, forget full buckets."""
        if self._syncing or not self.link.up:
            return None
        now = self.clock.seconds()
        batch: list[tuple[str, list[float]]] = []
        for key, bucket in list(self.buckets.items()):
            tokens, updated, per_second, burst, pending, _ = bucket
            if not pending and tokens + (now - updated) * per_second >= burst - _SLACK:
                del self.buckets[key]          # full again: Redis knows as much as we do
                continue
            bucket[5], bucket[4] = pending, 0
            batch.append((key, bucket))
        if not batch:
            return None
        self._syncing = True
        calls = []
        for start in range(0, len(batch), SCRIPT_KEYS):
            part = batch[start:start + SCRIPT_KEYS]
            args: list[Any] = ["charge"]
            for _, (_, _, per_second, burst, _, in_flight) in part:
                args += [repr(per_second), int(burst), int(in_flight)]
            d = self.link.call("eval", BUCKET_LUA, [KEY_PREFIX + key for key, _ in part], args)
            calls.append(d.addCallback(self._synced, part))
        done: Deferred[Any] = DeferredList(calls, fireOnOneErrback=True, consumeErrors=True)
        return done.addCallbacks(self._sync_done, self._sync_failed)

    def _synced(self, reply: str, part: list[tuple[str, list[float]]]) -> None:
        now = self.clock.seconds()
        for (_, bucket), (_, tokens) in zip(part, parse_reply(reply), strict=True):
            # What Redis has left, minus what was admitted here since the sync went out.
            bucket[0] = tokens - bucket[4]
            bucket[1] = now
            bucket[5] = 0

    def _sync_done(self, _: Any) -> None:
        self._syncing = False
        self.syncs += 1

    def _sync_failed(self, failure: Failure) -> None:
        # Redis is down (the link says so and the filter falls back); local state is stale
        # by the time it returns, so start over from Redis then.
        self._syncing = False
        self.buckets.clear()
        if not failure.value.subFailure.check(RedisUnavailable):
            _log.failure("rate-limit sync failed", failure.value.subFailure)
