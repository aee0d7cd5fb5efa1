"""When and how spans leave the gateway (ops/tracing.py): encoded as they end, batches on a timer
or when full, posted to a real OTLP/HTTP receiver, retried, dropped and counted.

The export timer and the retries' backoff run on an injected `Clock`; the posts run on the
reactor, to 127.0.0.1."""

from __future__ import annotations

import gc
from types import FunctionType
from typing import Any

import pytest_twisted
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from twisted.internet.task import Clock

from tests.conftest import free_port
from tests.integration.test_admin import call
from tests.integration.test_auth import now_clock, wait_for
from tests.integration.test_tracing import Receiver, receiver  # noqa: F401
from txgateway.core.logtext import printable
from txgateway.core.pipeline import RequestContext
from txgateway.ops import otlp
from txgateway.ops.otlp import Encoder
from txgateway.ops.spans import CLIENT, SERVER, SpanQueue, SpanRecord, SpanRecorder, _text
from txgateway.ops.tracing import Tracing, _Post
from txgateway.ops.tracingconfig import TracingConfig


def tracer(reactor: Any, url: str) -> tuple[Tracing, Clock]:
    """A tracer exporting to `url` on a fake clock."""
    clock = now_clock()
    return Tracing(TracingConfig(url), reactor, clock), clock


def record(tracing: Tracing, n: int) -> None:
    for i in range(n):
        tracing.queue.add(SpanRecord(f"span {i}", SERVER, (i + 1).to_bytes(16, "big"), b"", False, "", {"i": i}))


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
async def test_a_batch_waits_for_the_delay_held_as_its_spans_encodings(reactor, receiver):  # noqa: F811
    tracing, clock = tracer(reactor, receiver.url)
    record(tracing, 200)
    queue = tracing.queue
    assert queue.waiting == 200 and {type(s) for s in queue.batches[0]} == {bytes}   # encoded as they ended
    clock.advance(4.9)
    assert tracing.sending is None and receiver.headers == []          # not before the 5 s delay
    clock.advance(0.1)
    sending = tracing.sending
    assert sending is not None and queue.waiting == 0 and queue.batches == [[]]
    await sending
    assert len(receiver.spans) == 200 and tracing.counts == [200, 0]
    assert receiver.headers[0]["content-type"] == "application/x-protobuf"
    assert receiver.headers[0]["user-agent"].startswith("OTel-OTLP-Exporter-Python/")
    assert {span.name for _, span in receiver.spans} == {f"span {i}" for i in range(200)}
    assert clock.getDelayedCalls() == []                                # nothing left: no timer runs idle


@pytest_twisted.ensureDeferred
async def test_a_full_batch_goes_at_once_and_a_full_queue_drops_what_it_cannot_hold(reactor, receiver):  # noqa: F811
    tracing, clock = tracer(reactor, receiver.url)
    record(tracing, 2100)
    assert tracing.counts == [0, 52]                # 2048 wait at most: the rest are dropped, counted
    assert len(tracing.queue.batches) == 5          # four of 512, and the next one's, empty
    for _ in range(4):                              # a batch of 512 is due at once, the next as it settles
        await exported(tracing, clock)
    assert len(receiver.headers) == 4 and len(receiver.spans) == 2048
    assert tracing.counts == [2048, 52] and tracing.queue.waiting == 0


@pytest_twisted.ensureDeferred
async def test_an_export_the_collector_keeps_refusing_is_retried_then_counted_as_dropped(reactor):
    refusing = Receiver(status=503)
    try:
        tracing, clock = tracer(reactor, refusing.url)
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
    tracing, clock = tracer(reactor, f"http://127.0.0.1:{free_port()}/v1/traces")
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
    """The daemon's GC rarely runs (service/tap.py's tune_gc): a span's record must go with
    reference counting once it is encoded, and a batch's body once its export settles, taken or refused,
    or the traced daemon holds every batch until a collection (RSS +20 MiB at 256 connections)."""
    refusing = Receiver(status=400)
    tracers = []
    gc.collect()
    gc.disable()
    try:
        for url in (receiver.url, refusing.url):
            tracing, clock = tracer(reactor, url)
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
        held = [o for o in gc.garbage if isinstance(o, (SpanRecord, _Post))
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
    tracing, _ = tracer(reactor, receiver.url)
    record(tracing, 3)
    await tracing.stop(Clock())                      # the last spans go at once, not after the delay
    assert len(receiver.spans) == 3 and tracing.counts == [3, 0]

    down, _ = tracer(reactor, f"http://127.0.0.1:{free_port()}/v1/traces")
    record(down, 3)
    exit_clock = Clock()
    stopping = down.stop(exit_clock)
    await wait_for(reactor, lambda: down.sending is not None and bool(down.clock.getDelayedCalls()))   # refused: a retry waits
    assert not stopping.called
    exit_clock.advance(3)                            # the gateway's exit is not held up any longer
    await stopping


def test_recorded_text_is_escaped_as_the_process_log_escapes_it():
    """ops/spans.py skips printable's regex for plain ASCII; anything else goes through it. Its
    answers are kept for short values: asked again, the same."""
    for value in (b"/api/users/1", b"ua 1.0 (x; y)", b"/a\\b", b"/a\x01b", b"\x7f", b"/caf\xc3\xa9", b"\xff", b"",
                  b"/long/\x01" * 40):
        assert _text(value) == printable(value)
        assert _text(value) == printable(value)
    assert _text(b"/a\x1bb") == "/a\\x1bb"


def test_a_server_span_takes_the_forwarded_span_id_unless_it_is_zero():
    """ops/spans.py: the server span's id is the one the forwarding filter drew for the
    `traceparent` it sends; an all-zero one (invalid, W3C) is replaced by a new id."""
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    recorder = SpanRecorder(SpanQueue(10, 10, lambda record: b"", lambda waiting: None))
    for drawn in ("00f067aa0ba902b7", "0" * 16):
        ctx = RequestContext(b"GET", b"/", b"/", b"", b"1.1", [], None, b"http", "127.0.0.1", object(), 0.0)  # type: ignore[arg-type]
        ctx.traceparent = f"00-{trace}-{drawn}-00".encode()
        recorder.start(ctx, False)
        server = ctx.get_state("tracing").server
        assert server.span_id != bytes(8) and server.trace_id.hex() == trace
        assert ctx.traceparent == f"00-{trace}-{server.span_id.hex()}-01".encode()
        assert drawn == "0" * 16 or server.span_id.hex() == drawn


def unordered(span: Span) -> tuple[Span, list[bytes]]:
    """A span without its attributes, and its attributes in key order (OTLP's are a map)."""
    rest = Span()
    rest.CopyFrom(span)
    del rest.attributes[:]
    return rest, sorted(kv.SerializeToString() for kv in span.attributes)


def test_a_span_encoded_as_it_ends_is_the_span_protobuf_builds_field_by_field():
    """ops/otlp.py joins encodings protobuf made (the span's own, its recurring parts kept from
    earlier spans); decoded, the request is what opentelemetry-proto's messages say, however
    often the kept parts start over."""
    attributes = {"http.request.method": "GET", "url.path": "/a", "http.response.status_code": 503,
                  "ok": True, "ratio": 0.5, "list": ("a", "b")}
    server = SpanRecord("GET /a", SERVER, b"\x07" * 16, b"\x05" * 8, True, "k=v", dict(attributes))
    client = SpanRecord("GET", CLIENT, b"\x07" * 16, server.span_id, False, "", dict(attributes, **{"url.full": "http://u/a"}))
    client.fail("503", "refused")
    expected = ExportTraceServiceRequest()
    scope_spans = expected.resource_spans.add().scope_spans.add()
    records = (server, client) * 3     # each value seen once (encoded with its span), twice (kept), then reused
    for record in records:
        record.end = record.start + 1
        span = scope_spans.spans.add(trace_id=record.trace_id, span_id=record.span_id,
                                     parent_span_id=record.parent_id, trace_state=record.trace_state,
                                     name=record.name, kind=record.kind, flags=0x300 if record.remote_parent else 0x100,
                                     start_time_unix_nano=record.start, end_time_unix_nano=record.end)
        for key, value in record.attributes.items():
            kv = span.attributes.add(key=key)
            otlp._set_value(kv.value, value)
        if record.status:
            span.status.code, span.status.message = record.status, record.message
    for start_over in (False, True):             # the recurring parts kept, or made again for each span
        encoder, batch = Encoder({}), []
        for record in records:
            if start_over:
                encoder.remembered = 4096       # the bound reached: what was kept is dropped
            batch.append(encoder.span(record))
        decoded = ExportTraceServiceRequest.FromString(encoder.request(batch))
        got = decoded.resource_spans[0].scope_spans[0].spans
        assert [unordered(s) for s in got] == [unordered(s) for s in scope_spans.spans]
        assert decoded.resource_spans[0].scope_spans[0].scope.name == "txgateway"
