"""The gateway's one connection to Redis: every call bounded in time, and an up/down state.

txredisapi with `reconnect=True` never fails a call while Redis is down: it waits for a
connection forever, and its command Deferreds cannot be cancelled. So every call here
carries `redis.timeout`, and the first failure marks Redis down: from then on calls fail at
once (the limiter answers from its `on_redis_error` policy without waiting) while a PING
probe, backing off from 0.25 s to 5 s, finds out when Redis is back. Each change of state
is logged once and counted; status, metrics and the Manhole read it from `RedisLink.state`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

from twisted.internet.defer import CancelledError, Deferred, TimeoutError
from twisted.logger import ILogObserver, Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure

from txgateway.filters.ratelimit.redisconfig import RedisConfig

__all__ = ["RedisLink", "RedisUnavailable"]

_log = Logger(namespace="txgateway.redis")

PROBE_FIRST = 0.25
_GRACE_TURNS = 64      # reactor turns a timed-out call may wait while replies are still arriving
PROBE_MAX = 5.0


class RedisUnavailable(Exception):
    """Redis is down, slow or refused the call; the caller applies its fallback."""


class RedisLink:
    """A lazily connected txredisapi pool (direct or through Sentinel) behind `call()`."""

    def __init__(self, config: RedisConfig, clock: Any) -> None:
        self.config = config
        self.clock = clock
        self.up = True                 # optimistic until a call fails: start-up never waits on Redis
        self.since = clock.seconds()
        self.errors = 0                # failed calls, ever (metrics: txgateway_redis_errors_total)
        self.outages = 0               # up -> down transitions
        self.last_error: str | None = None
        self._handler: Any = None
        self._sentinel: Any = None
        self._probe: Any = None
        self._probe_delay = PROBE_FIRST
        self._replies = 0                # replies received on the pool's connections, ever
        self._response_error: type[Exception] = RedisUnavailable   # txredisapi.ResponseError once started

    @property
    def state(self) -> dict[str, Any]:
        """What status pages show: where, up or down since when, errors."""
        return {"where": self.config.where, "state": "up" if self.up else "down", "since": self.since,
                "errors": self.errors, "outages": self.outages, "last_error": self.last_error}

    def start(self) -> None:
        import txredisapi  # imported late: it installs the global reactor when imported
        self._response_error = txredisapi.ResponseError
        c = self.config
        options: dict[str, Any] = {"dbid": c.db, "poolsize": c.pool_size, "password": c.password,
                                   "username": c.username, "replyTimeout": max(2.0, 10 * c.timeout),
                                   "convertNumbers": False}
        with _quiet_reconnects():
            if c.sentinel_master is not None:
                # Sentinel-made connections take no connectTimeout (the factory's maxDelay
                # bounds them); every call is bounded by redis.timeout anyway.
                self._sentinel = txredisapi.Sentinel(list(c.sentinel_hosts), connectTimeout=c.timeout,
                                                     replyTimeout=max(2.0, 10 * c.timeout))
                self._sentinel.discovery_timeout = max(1.0, 5 * c.timeout)
                self._handler = self._sentinel.master_for(c.sentinel_master, **options)
            else:
                self._handler = txredisapi.lazyConnectionPool(c.host, c.port, connectTimeout=c.timeout, **options)
        # A connection refused for good (wrong password, ...) fails this, once: say why.
        self._handler._connected.addErrback(self._refused)
        # Connect now rather than on the first request: a cold pool under a burst of traffic
        # answered its first call only after 0.4-0.7 s. A failure here just marks Redis down.
        self.call("ping").addErrback(lambda _: None)
        factory = self._handler._factory
        # Reconnect sooner than txredisapi's 1 s..10 s: limits are shared again within ~2 s.
        factory.initialDelay = 0.1
        factory.maxDelay = 2.0
        # Small request/response commands: without TCP_NODELAY, Nagle holds a command back
        # while an earlier one on the connection is unacknowledged.
        add_connection = factory.addConnection

        def add_without_nagle(connection: Any) -> None:
            connection.transport.setTcpNoDelay(True)
            reply_received = connection.replyReceived

            def counted(reply: Any) -> Any:
                self._replies += 1              # _bound: replies are still being delivered
                return reply_received(reply)

            connection.replyReceived = counted
            add_connection(connection)

        factory.addConnection = add_without_nagle

    def stop(self) -> Deferred[Any] | None:
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None
        handler, self._handler = self._handler, None
        if self._sentinel is not None:
            self._sentinel.disconnect()
            self._sentinel = None
        if handler is None:
            return None
        d: Deferred[Any] = handler.disconnect()
        return d.addErrback(lambda _: None)

    def call(self, command: str, *args: Any) -> Deferred[Any]:
        """Run one txredisapi command; fails with RedisUnavailable at once while Redis is down,
        else within `redis.timeout`."""
        if not self.up or self._handler is None:
            return _failed(RedisUnavailable(self.last_error or "not connected"))
        d: Deferred[Any] = getattr(self._handler, command)(*args)
        self._bound(d)
        return d.addErrback(self._call_failed)

    def _bound(self, d: Deferred[Any]) -> None:
        """Fail `d` with TimeoutError after redis.timeout, but only after one more round of
        I/O: when the gateway itself is saturated, Redis's answer may already sit in the socket,
        and our own slowness must not be taken for Redis's."""
        timer: list[Any] = []
        expired: list[bool] = []
        finished: list[bool] = []
        seen = [0]

        def give_up(turns: int) -> None:
            # Not d.called: d is "called" as soon as it waits on the command's own Deferred.
            if finished:
                return
            if self._replies != seen[0] and turns < _GRACE_TURNS:
                # txredisapi delivers the replies of one read one reactor turn apart: while
                # they keep coming, ours may be among them.
                seen[0] = self._replies
                timer.append(self.clock.callLater(0, give_up, turns + 1))
                return
            expired.append(True)
            d.cancel()                             # txredisapi has no canceller: errbacks at once

        def due() -> None:
            seen[0] = self._replies
            timer.append(self.clock.callLater(0, give_up, 0))

        timer.append(self.clock.callLater(self.config.timeout, due))

        def settled(result: Any) -> Any:
            finished.append(True)
            if timer[-1].active():
                timer[-1].cancel()
            if expired and isinstance(result, Failure) and result.check(CancelledError):
                return Failure(TimeoutError())
            return result

        d.addBoth(settled)

    def _call_failed(self, failure: Failure) -> Failure:
        if failure.check(CancelledError):          # the client went away: not Redis's fault
            return failure
        if self._handler is None:                  # stopped with calls out: not an outage
            return Failure(RedisUnavailable("stopped"))
        self.errors += 1
        if failure.check(TimeoutError):
            reason = f"no answer within {self.config.timeout * 1000:g}ms"
        else:
            reason = f"{type(failure.value).__name__}: {failure.getErrorMessage()}"
        if failure.check(self._response_error):
            message = failure.getErrorMessage()
            if message.startswith("READONLY"):
                # Connected to a demoted master (after a Sentinel failover): reconnect, which
                # asks Sentinel for the new master.
                self._drop_connections()
            elif not message.startswith(("LOADING", "MASTERDOWN")):
                # Redis answered about this call: it is up, the call was wrong.
                return Failure(RedisUnavailable(reason))
        self._lost(reason)
        return Failure(RedisUnavailable(reason))

    def _refused(self, failure: Failure) -> None:
        self.errors += 1
        self._lost(failure.getErrorMessage())

    def _drop_connections(self) -> None:
        for connection in list(self._handler._factory.pool):
            connection.transport.loseConnection()

    def _lost(self, reason: str) -> None:
        self.last_error = reason
        if not self.up:
            return
        self.up = False
        self.since = self.clock.seconds()
        self.outages += 1
        _log.warn("redis lost ({where}): {reason}; rate limits follow on_redis_error until it is back",
                  where=self.config.where, reason=reason)
        self._probe_delay = PROBE_FIRST
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        self._probe = self.clock.callLater(self._probe_delay, self._send_probe)
        self._probe_delay = min(PROBE_MAX, self._probe_delay * 2)

    def _send_probe(self) -> None:
        if self._handler is None:
            return
        d: Deferred[Any] = self._handler.ping()
        self._bound(d)
        d.addCallbacks(self._probe_answered, self._probe_failed)

    def _probe_answered(self, _: Any) -> None:
        if self._handler is None:
            return
        down_for = self.clock.seconds() - self.since
        self.up = True
        self.since = self.clock.seconds()
        _log.info("redis back ({where}) after {seconds:.1f}s", where=self.config.where, seconds=down_for)

    def _probe_failed(self, failure: Failure) -> None:
        if self._handler is None:
            return
        self.errors += 1
        self.last_error = failure.getErrorMessage() or type(failure.value).__name__
        self._schedule_probe()


@contextmanager
def _quiet_reconnects() -> Iterator[None]:
    """txredisapi's pool slots are ClientServices, which log every reconnection attempt at
    info level: lines per second per connection while Redis is down. The link already says
    "lost" and "back" once each, so slots made here get a Logger that keeps only warnings
    and worse (ClientService hands its class-level `_log` to each instance it makes)."""
    from twisted.application.internet import ClientService

    def warnings_only(event: dict[str, Any]) -> None:
        if event["log_level"] >= LogLevel.warn:
            globalLogPublisher(event)

    saved = ClientService._log
    ClientService._log = Logger(namespace="txgateway.redis.connect", observer=cast(ILogObserver, warnings_only))
    try:
        yield
    finally:
        ClientService._log = saved


def _failed(error: Exception) -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(Failure(error))
    return d
