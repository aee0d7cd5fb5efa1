"""When and how spans leave the gateway (ops/tracing.py): batches on a timer or when full, encoded
a slice per reactor turn, posted to a real OTLP/HTTP receiver, retried, dropped and counted.

The export timer and the retries' backoff run on an injected `Clock`; the encoding's slices (a
reactor turn apart) and the posts run on the reactor, to 127.0.0.1."""

from __future__ import annotations

import gc
from types import FunctionType
from typing import Any

import pytest_twisted
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from twisted.internet.task import Clock

from tests.conftest import free_port
from tests.integration.test_admin import call
from tests.integration.test_auth import now_clock, wait_for
from tests.integration.test_tracing import Receiver, receiver  # noqa: F401
from txgateway.core.logtext import printable
from txgateway.ops.otlp import Encoder
from txgateway.ops.spans import SERVER, SpanRecord, _text
from txgateway.ops.tracing import Tracing, _Encoding, _Post
from txgateway.ops.tracingconfig import TracingConfig


class CountingEncoder:
    """The tracer's encoder, noting the size of each slice it encodes (the compiled Encoder's
    methods cannot be replaced on it)."""

    def __init__(self, encoder: Encoder) -> None:
        self.encoder = encoder
        self.slices: list[int] = []

    def start(self) -> Any:
        return self.encoder.start()

    def add(self, spans: Any, records: list[SpanRecord]) -> None:
        self.slices.append(len(records))
        self.encoder.add(spans, records)


def tracer(reactor: Any, url: str) -> tuple[Tracing, Clock, list[int]]:
    """A tracer exporting to `url` on a fake clock, and the size of each slice it encodes."""
    clock = now_clock()
    tracing = Tracing(TracingConfig(url), reactor, clock)
    counting = CountingEncoder(tracing.encoder)
    tracing.encoder = counting  # type: ignore[assignment]
    return tracing, clock, counting.slices


def record(tracing: Tracing, n: int) -> None:
    for i in range(n):
        tracing.queue.add(SpanRecord(f"span {i}", SERVER, i + 1, 0, False, "", {"i": i}))


async def exported(tracing: Tracing, clock: Clock) -> None:
    """The export now due, waited for (its encoding's slices and its post run on the reactor)."""
    clock.advance(0)
    sending = tracing.sending
    assert sending is not None
    await sending


def retry_due(clock: Clock, backoff: float) -> Any:
    """The export's next attempt is scheduled `backoff` seconds from now (the last one failed)."""
    return lambda: any(abs(c.getTime() - clock.seconds() - backoff) < 1e-6 for c in clock.getDelayedCalls())


@pytest_twisted.ensureDeferred
async def test_a_batch_waits_for_the_delay_and_is_encoded_a_slice_per_turn(reactor, receiver):  # noqa: F811
    tracing, clock, slices = tracer(reactor, receiver.url)
    record(tracing, 200)
    clock.advance(4.9)
    assert tracing.sending is None and receiver.headers == []          # not before the 5 s delay
    clock.advance(0.1)
    sending = tracing.sending
    assert sending is not None and slices == [64]      # one slice in this turn, the others in the next ones
    await sending
    assert slices == [64, 64, 64, 8]
    assert len(receiver.spans) == 200 and tracing.counts == [200, 0]
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"
    assert receiver.headers[0]["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
    assert {span.name for _, span in receiver.spans} == {f"span {i}" for i in range(200)}
    assert clock.getDelayedCalls() == []                                # nothing left: no timer runs idle


@pytest_twisted.ensureDeferred
async def test_a_full_batch_goes_at_once_and_a_full_queue_drops_what_it_cannot_hold(reactor, receiver):  # noqa: F811
    tracing, clock, slices = tracer(reactor, receiver.url)
    record(tracing, 2100)
    assert tracing.counts == [0, 52]                # 2048 wait at most: the rest are dropped, counted
    for _ in range(4):                              # a batch of 512 is due at once, the next as it settles
        await exported(tracing, clock)
    assert slices == [64] * 32 and len(receiver.headers) == 4
    assert tracing.counts == [2048, 52] and tracing.queue.records == []


@pytest_twisted.ensureDeferred
async def test_an_export_the_collector_keeps_refusing_is_retried_then_counted_as_dropped(reactor):
    refusing = Receiver(status=503)
    try:
        tracing, clock, _ = tracer(reactor, refusing.url)
        record(tracing, 3)
        clock.advance(5)
        sending = tracing.sending
        assert sending is not None
        for attempt, backoff in enumerate((1, 2, 4), start=1):     # the SDK exporter's backoff, within 10 s
            await wait_for(reactor, retry_due(clock, backoff))
            assert len(refusing.headers) == attempt
            clock.advance(backoff)
        await sending
        assert len(refusing.headers) == 4 and tracing.counts == [0, 3]
    finally:
        refusing.close()


@pytest_twisted.ensureDeferred
async def test_a_collector_that_is_down_loses_the_batch_not_the_gateway(reactor):
    tracing, clock, _ = tracer(reactor, f"http://127.0.0.1:{free_port()}/v1/traces")
    record(tracing, 5)
    clock.advance(5)
    sending = tracing.sending
    assert sending is not None
    for backoff in (1, 2, 4):                       # connection refused: retried like a 503
        await wait_for(reactor, retry_due(clock, backoff))
        clock.advance(backoff)
    await sending
    assert tracing.counts == [0, 5]
    record(tracing, 1)                              # the next span starts the next delay
    assert [c.getTime() - clock.seconds() for c in clock.getDelayedCalls()] == [5.0]


@pytest_twisted.ensureDeferred
async def test_a_settled_export_is_freed_without_the_cyclic_gc(reactor, receiver):  # noqa: F811
    """The daemon's GC rarely runs (service/tap.py's tune_gc): a batch's records, protobuf
    message and body must go with reference counting once its export settles, taken or refused,
    or the traced daemon holds every batch until a collection (RSS +20 MiB at 256 connections)."""
    refusing = Receiver(status=400)
    tracers = []
    gc.collect()
    gc.disable()
    try:
        for url in (receiver.url, refusing.url):
            tracing, clock, _ = tracer(reactor, url)
            tracers.append(tracing)
            record(tracing, 200)
            clock.advance(5)
            sending = tracing.sending
            assert sending is not None
            await sending
        assert [t.counts for t in tracers] == [[200, 0], [0, 200]]
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        # Per-export objects and closures only: a Tracing's own Poster and its Agent's pool
        # hold cycles of their own (one set per Tracing, earlier tests' too), never per batch.
        held = [o for o in gc.garbage if isinstance(o, (SpanRecord, ExportTraceServiceRequest, _Encoding, _Post))
                or (isinstance(o, FunctionType) and o.__module__ == "txgateway.ops.tracing")]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
        refusing.close()
    assert held == []


@pytest_twisted.ensureDeferred
async def test_the_gateway_exports_its_spans_on_its_clock(reactor, echo, receiver, gateway):  # noqa: F811
    clock = now_clock()
    gw = await gateway(f'\n    tracing: {{otlp_endpoint: "{receiver.url}"}}' + f"""
    upstreams:
      u: {{targets: ["{echo.url}"]}}
    routes:
      - {{prefix: /api, upstream: u}}
    """, clock=clock)
    for i in range(3):
        assert (await call(gw.port, f"/api/{i}")).status == 200
    tracing = gw.gateway.tracing
    assert receiver.spans == [] and tracing.sending is None
    clock.advance(5)
    await exported(tracing, clock)
    assert len(receiver.spans) == 6 and tracing.counts == [6, 0]


@pytest_twisted.ensureDeferred
async def test_stopping_exports_what_is_left_and_waits_at_most_3_s(reactor, receiver):  # noqa: F811
    tracing, _, _ = tracer(reactor, receiver.url)
    record(tracing, 3)
    await tracing.stop(Clock())                      # the last spans go at once, not after the delay
    assert len(receiver.spans) == 3 and tracing.counts == [3, 0]

    down, _, _ = tracer(reactor, f"http://127.0.0.1:{free_port()}/v1/traces")
    record(down, 3)
    exit_clock = Clock()
    stopping = down.stop(exit_clock)
    await wait_for(reactor, lambda: down.sending is not None and bool(down.clock.getDelayedCalls()))   # refused: a retry waits
    assert not stopping.called
    exit_clock.advance(3)                            # the gateway's exit is not held up any longer
    await stopping


def test_recorded_text_is_escaped_as_the_process_log_escapes_it():
    """ops/spans.py skips printable's regex for plain ASCII; anything else goes through it."""
    for value in (b"/api/users/1", b"ua 1.0 (x; y)", b"/a\\b", b"/a\x01b", b"\x7f", b"/caf\xc3\xa9", b"\xff", b""):
        assert _text(value) == printable(value)
    assert _text(b"/a\x1bb") == "/a\\x1bb"
