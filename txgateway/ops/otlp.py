"""Spans encoded for OTLP, compiled (setup.py): ops/spans.py's records into opentelemetry-proto's
messages, for ops/tracing.py to post. Interpreted, the loop over a batch's spans and their
attributes cost more than protobuf's own work on them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from txgateway import __version__
from txgateway.ops.spans import SpanRecord

__all__ = ["Encoder"]

_VARIED: Final = frozenset({"url.path", "url.query", "url.full"})   # attributes whose values rarely recur
_KNOWN_LIMIT: Final = 4096      # attribute encodings kept at most
# OTLP's span flags: "has is_remote" always, "is remote" when the parent is the caller's.
_LOCAL_PARENT: Final = 0x100
_REMOTE_PARENT: Final = 0x300


class Encoder:
    """Batches of SpanRecords as an OTLP ExportTraceServiceRequest of opentelemetry-proto's
    messages. The SDK's encoder built each span, attribute and value with keyword constructors
    that upb then copied (~40 % of its ~300k instructions a span). Here a span's scalars go in
    its `add()`; an attribute whose value recurs (a method, a route, a status: most of them) is
    serialized once, as a Span holding only that attribute, by protobuf itself, and a span's
    recurring attributes are merged in with one `MergeFromString` of those encodings joined
    (protobuf's own rule: concatenated encodings merge, repeated fields append). Values unique
    to a request (`_VARIED`) are set directly."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        """`resource`: the SDK Resource's attributes (service.name, telemetry.sdk.*, ...)."""
        self.resource = ResourceMessage()
        for key, value in resource.items():
            kv = self.resource.attributes.add()
            kv.key = key
            _set_value(kv.value, value)
        self.scope = InstrumentationScope(name="txgateway", version=__version__)
        self.known: dict[tuple[str, Any], bytes] = {}   # (key, value) -> a Span with that attribute, encoded

    def start(self) -> tuple[ExportTraceServiceRequest, Any]:
        """An empty request (this gateway's resource and scope) and its repeated spans field."""
        request = ExportTraceServiceRequest()
        resource_spans = request.resource_spans.add()
        resource_spans.resource.CopyFrom(self.resource)
        scope_spans = resource_spans.scope_spans.add()
        scope_spans.scope.CopyFrom(self.scope)
        return request, scope_spans.spans

    def add(self, spans: Any, records: list[SpanRecord]) -> None:
        known = self.known
        for record in records:
            span = spans.add(trace_id=record.trace_id.to_bytes(16, "big"), span_id=record.span_id.to_bytes(8, "big"),
                             flags=_REMOTE_PARENT if record.remote_parent else _LOCAL_PARENT,
                             name=record.name, kind=record.kind,
                             start_time_unix_nano=record.start, end_time_unix_nano=record.end)
            if record.parent_id:
                span.parent_span_id = record.parent_id.to_bytes(8, "big")
            if record.trace_state:
                span.trace_state = record.trace_state
            parts = []
            for key, value in record.attributes.items():
                if key in _VARIED or (type(value) is not str and type(value) is not int):   # not True == 1
                    kv = span.attributes.add()
                    kv.key = key
                    _set_value(kv.value, value)
                else:
                    part = known.get((key, value))
                    if part is None:
                        part = self._remember(key, value)
                    parts.append(part)
            span.MergeFromString(b"".join(parts))
            if record.status:
                span.status.code = record.status
                if record.message:
                    span.status.message = record.message

    def _remember(self, key: str, value: Any) -> bytes:
        if len(self.known) >= _KNOWN_LIMIT:       # bounded: values that turn out to vary start it over
            self.known.clear()
        one = Span()
        kv = one.attributes.add()
        kv.key = key
        _set_value(kv.value, value)
        part = self.known[key, value] = one.SerializeToString()
        return part


def _set_value(out: AnyValue, value: Any) -> None:
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    else:       # the SDK's resource may hold a sequence (from OTEL_RESOURCE_ATTRIBUTES: strings only)
        out.string_value = str(value)
