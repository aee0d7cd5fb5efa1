"""OpenTelemetry spans for the requests the gateway serves, exported to an OTLP/HTTP collector.

One server span per request, continuing the caller's `traceparent` (parent-based sampling: a
caller's sampled flag decides; a trace the gateway starts is kept at `sample_ratio`), and a
client span per upstream attempt, so retries show; a composed route's calls (terminals/compose/)
are client spans of the same server span, one per attempt of each call. The `traceparent` sent
upstream carries the attempt's own span id, and `ctx.traceparent` (metrics' exemplars) its trace id.

Recording is ops/spans.py's (compiled): plain records, each encoded as it ends (ops/otlp.py,
compiled) and kept as bytes in a bounded queue. Exporting is here, on the reactor and
never in the way of a request: every `_SCHEDULE_DELAY` seconds (sooner when `_BATCH` spans wait)
a batch's bytes become an OTLP request, posted with Twisted's Agent (the SDK exporter's headers,
a timeout, its retries on 429/502/503/504 and connection errors). There is no export thread: the
SDK's BatchSpanProcessor held the GIL for whole batches while it encoded and posted, and the
reactor waited. Spans a collector did not take, or that found the queue full, are
counted (`dropped`) for /metrics. Imported only when the config has `tracing:`.
"""

from __future__ import annotations

import codecs
from typing import Any

from opentelemetry.exporter.otlp.proto.http import _OTLP_HTTP_HEADERS
from opentelemetry.sdk.resources import Resource
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, BrowserLikePolicyForHTTPS
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer
from zope.interface import implementer

from txgateway.core.fetch import quiet_pool
from txgateway.ops.otlp import Encoder
from txgateway.ops.sampling import TraceGate
from txgateway.ops.spans import SpanQueue, SpanRecorder
from txgateway.ops.tracingconfig import TracingConfig

__all__ = ["Tracing"]

_SCHEDULE_DELAY = 5.0    # seconds between exports (the SDK's BatchSpanProcessor's default)
_BATCH = 512             # spans per export, and how many waiting make one due at once (the SDK's)
_QUEUE_LIMIT = 2048      # spans waiting at most; more are dropped (the SDK's)
_EXPORT_TIMEOUT = 10.0   # seconds one export may take, retries included (the SDK exporter's)
_RETRYABLE = frozenset({429, 502, 503, 504})   # statuses the SDK exporter retries, as connection errors
_STOP_WAIT = 3.0         # seconds a stopping gateway waits for the last export
_log = Logger(namespace="txgateway.ops.tracing")


@implementer(IBodyProducer)
class _Body:
    """An encoded batch as a request body, written in one go (Twisted's FileBodyProducer, which
    treq uses, reads it back from a file object a cooperator's task at a time)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Drain(Protocol):
    """Reads an answer's body to its end (the connection is then reused), firing its status."""

    def __init__(self, done: Deferred[int], status: int) -> None:
        self.done = done
        self.status = status

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(self.status)     # cut short or not, the collector answered `status`


def _status(response: Any) -> Deferred[int]:
    done: Deferred[int] = Deferred()
    response.deliverBody(_Drain(done, response.code))
    return done


@implementer(IAgentEndpointFactory)
class _Collector:
    """The collector's endpoint, made once at start (TCP, or TLS verified as Agent verifies).
    Agent makes a HostnameEndpoint for every request: each runs the host through IDNA and
    each connection resolves it in a thread (getaddrinfo), so the first export imported the
    `idna` codec (~3M instructions) and started the reactor's thread pool in the middle of
    serving. An address (the usual local collector, 127.0.0.1:4318) needs no resolving."""

    def __init__(self, reactor: Any, url: bytes) -> None:
        uri = URI.fromBytes(url)
        host = uri.host.decode("ascii")
        endpoint: Any = TCP4ClientEndpoint(reactor, host, uri.port) if isIPAddress(host) else \
            TCP6ClientEndpoint(reactor, host, uri.port) if isIPv6Address(host) else \
            HostnameEndpoint(reactor, host, uri.port)
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(BrowserLikePolicyForHTTPS().creatorForNetloc(uri.host, uri.port), endpoint)
        self.endpoint = endpoint

    def endpointForURI(self, uri: URI) -> Any:
        return self.endpoint


class Poster:
    """POSTs encoded batches to the collector from the reactor (Twisted's Agent, one kept-alive connection),
    retrying as the SDK exporter does: 429/502/503/504 and connection errors after 1, 2, 4 s
    (a connection error once at once first), within `_EXPORT_TIMEOUT` in all. Its Deferred
    fires True (taken) or False (dropped); it never fails."""

    def __init__(self, reactor: Any, clock: Any, url: str, headers: dict[str, str]) -> None:
        pool = quiet_pool(reactor)
        pool.persistent = True               # one connection kept to the collector between exports
        pool.maxPersistentPerHost = 1
        self.uri = url.encode("ascii")
        # Agent decodes a request's path with the `charmap` codec (URI.originForm): looked up at
        # start, not imported at the first export in the middle of serving (~0.8M instructions).
        codecs.lookup("charmap")
        self.agent = Agent.usingEndpointFactory(reactor, _Collector(reactor, self.uri), pool=pool)
        self.pool = pool
        self.clock = clock
        self.url = url
        # the SDK exporter's Content-Type and User-Agent, then the configured ones
        self.headers = Headers({name: [value] for name, value in {**_OTLP_HTTP_HEADERS, **headers}.items()})

    def post(self, body: bytes) -> Deferred[bool]:
        return _Post(self, body).done


class _Post:
    """One batch's POST and its retries (Poster's policy). Its steps are methods, not closures
    that name each other: such closures are a reference cycle holding the body, which the daemon's
    GC (service/tap.py: frozen, thresholds raised) would free only long after the export."""

    def __init__(self, poster: Poster, body: bytes) -> None:
        self.poster = poster
        self.body = body
        self.done: Deferred[bool] = Deferred()
        self.deadline = poster.clock.seconds() + _EXPORT_TIMEOUT
        self.attempt(0, True)

    def attempt(self, retry: int, again: bool) -> None:
        poster = self.poster
        producer: Any = _Body(self.body)         # an IBodyProducer (mypy has no zope plugin here)
        d = poster.agent.request(b"POST", poster.uri, poster.headers, producer)
        d.addCallback(_status)
        d.addTimeout(max(self.deadline - poster.clock.seconds(), 0.0), poster.clock)
        d.addBoth(self.answered, retry, again)

    def answered(self, result: int | Failure, retry: int, again: bool) -> None:
        if isinstance(result, int) and 200 <= result < 400:
            self.done.callback(True)
            return
        if isinstance(result, Failure) and again:
            # As the SDK exporter: a connection error is retried once at once (a kept-alive
            # connection the collector closed meanwhile; Twisted keeps HTTP/1.0 ones too).
            self.attempt(retry, False)
            return
        clock = self.poster.clock
        backoff = float(2 ** retry)
        retryable = isinstance(result, Failure) or result in _RETRYABLE
        if not retryable or clock.seconds() + backoff >= self.deadline:
            reason = result.getErrorMessage() if isinstance(result, Failure) else f"HTTP {result}"
            _log.warn("tracing: an export to {url} failed ({reason}); its spans are dropped",
                      url=self.poster.url, reason=reason)
            self.done.callback(False)
            return
        clock.callLater(backoff, self.attempt, retry + 1, True)


class Tracing:
    """The tracer: its gate (ops/sampling.py) decides, its recorder (ops/spans.py) records, its
    encoder (ops/otlp.py) encodes each span as it ends, and it exports the queued spans in
    batches (`clock` times the exports and the retries)."""

    def __init__(self, config: TracingConfig, reactor: Any, clock: Any = None) -> None:
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.encoder = Encoder(Resource.create({"service.name": config.service_name}).attributes)
        self.queue = SpanQueue(_QUEUE_LIMIT, _BATCH, self.encoder.span, self._ready)
        self.recorder = SpanRecorder(self.queue)
        # The edge's filter, finish hook and proxies' attempt hook (service/requestpath.py)
        self.gate = TraceGate(self.recorder, config.sample_ratio)
        self.poster = Poster(reactor, self.clock, config.otlp_endpoint, dict(config.headers))
        self.exported = 0
        self.failed = 0                          # spans of exports the collector did not take
        self.timer: Any = None                   # the next export, while spans wait
        self.sending: Deferred[None] | None = None   # the export under way (one at a time)
        self.stopped = False

    def _ready(self, waiting: int) -> None:
        """The queue's signal: the first span arrived (export in `_SCHEDULE_DELAY`) or a batch is full (now)."""
        if self.sending is not None:
            return                               # the export under way schedules the next
        if waiting >= _BATCH:
            self._schedule(0.0)
        elif self.timer is None:
            self._schedule(_SCHEDULE_DELAY)

    def _schedule(self, delay: float) -> None:
        if self.timer is not None and self.timer.active():
            if delay:
                return
            self.timer.cancel()
        self.timer = self.clock.callLater(delay, self._due)

    def _due(self) -> None:
        self.timer = None
        if self.sending is None and self.queue.waiting:
            self._export()

    def _export(self) -> Deferred[None]:
        """Post the oldest batch; then schedule the next if spans wait."""
        spans = self.queue.take()
        self.sending = d = self.poster.post(self.encoder.request(spans)).addCallback(self._settled, len(spans))
        return d

    def _settled(self, taken: bool, count: int) -> None:
        if taken:
            self.exported += count
        else:
            self.failed += count
        self.sending = None
        waiting = self.queue.waiting
        if waiting and not self.stopped:
            self._schedule(0.0 if waiting >= _BATCH else _SCHEDULE_DELAY)

    # -- lifecycle and metrics -----------------------------------------------------------

    def flush(self) -> Deferred[None]:
        """Export everything queued now, batch after batch (tests, and `stop`)."""
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        before = self.sending if self.sending is not None else succeed(None)
        waited: Deferred[None] = Deferred()
        before.addBoth(waited.callback)       # `sending` itself stays the export's own chain
        return waited.addCallback(self._next_batch)

    def _next_batch(self, _: Any) -> Any:
        """A method, not a closure naming itself: that would be a cycle left for the cyclic GC,
        which the daemon seldom runs (service/tap.py)."""
        if self.queue.waiting:
            return self._export().addCallback(self._next_batch)
        return None

    def stop(self, reactor: Any) -> Deferred[None]:
        """Export what is left, waited for at most `_STOP_WAIT` seconds: a collector that is
        down must not hold up the gateway's exit."""
        self.stopped = True
        done: Deferred[None] = Deferred()
        # No closure naming the timer that calls it: a fired DelayedCall keeps its function,
        # and the two would be a cycle left for the seldom-run cyclic GC.
        timer = reactor.callLater(_STOP_WAIT, _settle, done, None)
        self.flush().addBoth(lambda _: _settle(done, timer))
        return done.addCallback(lambda _: self.poster.pool.closeCachedConnections())

    @property
    def counts(self) -> list[int]:
        """[spans exported, spans dropped (refused, failed, or the queue was full)], for /metrics."""
        return [self.exported, self.failed + self.queue.dropped]


def _settle(done: Deferred[None], timer: Any) -> None:
    """Fire `stop`'s Deferred once: when the last export ends or `_STOP_WAIT` passed, the first."""
    if not done.called:
        if timer is not None and timer.active():
            timer.cancel()
        done.callback(None)
