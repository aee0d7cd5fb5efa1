"""Spans encoded for OTLP as they end, compiled (setup.py): each of ops/spans.py's records becomes
its encoding at once, and a batch of them becomes an ExportTraceServiceRequest only when
ops/tracing.py posts it. A waiting batch is bytes (~0.4 kB a span), not records and then a
message of opentelemetry-proto's objects (~1 MB for 512 spans, built and freed at each export).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from google.protobuf.internal.encoder import BytesEncoder  # type: ignore[import-untyped]
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as ResourceMessage
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span

from txgateway import __version__
from txgateway.ops.spans import SpanRecord

__all__ = ["Encoder"]

_KNOWN_LIMIT: Final = 4096      # attribute values seen, and encodings of recurring parts kept, at most
_SEEN: Final = b""              # an attribute value seen once: encoded with the span, kept if seen again
# OTLP's span flags: "has is_remote" always, "is remote" when the parent is the caller's.
_LOCAL_PARENT: Final = 0x100
_REMOTE_PARENT: Final = 0x300

_Field = Callable[[Callable[[bytes], Any], Any, bool], Any]   # (write, the value(s), deterministic)


def _field(message: Any, name: str, repeated: bool = False) -> _Field:
    """protobuf's own encoder of a length-delimited field (its pure-Python implementation's): an
    embedded message and a bytes value are the same on the wire, so a message protobuf already
    encoded goes into its parent's field as it is, not parsed into a message again."""
    encode: _Field = BytesEncoder(message.DESCRIPTOR.fields_by_name[name].number, repeated, False)
    return encode


_SPANS: Final = _field(ScopeSpans, "spans", repeated=True)
_SCOPE_SPANS: Final = _field(ResourceSpans, "scope_spans")
_RESOURCE_SPANS: Final = _field(ExportTraceServiceRequest, "resource_spans")


class Encoder:
    """SpanRecords as the spans of an OTLP ExportTraceServiceRequest, every byte written by
    protobuf. A span is the encodings of Span messages joined (protobuf's rule: concatenated
    encodings merge, repeated fields append): one message with what is the span's own (ids,
    times, the attributes whose values rarely recur), and the parts that recur, each encoded
    once and kept: its name, kind and flags, and each attribute whose value recurs (a method,
    a route, a status: most of them). The SDK's encoder built each span, attribute and value
    as messages that upb then copied (~300k instructions a span); building a span message of
    those parts and merging the recurring ones in still cost ~38k. A value is kept the second
    time it is seen, whatever its attribute: a route's paths and URLs recur too."""

    def __init__(self, resource: Mapping[str, Any]) -> None:
        """`resource`: the SDK Resource's attributes (service.name, telemetry.sdk.*, ...)."""
        message = ResourceMessage()
        for key, value in resource.items():
            kv = message.attributes.add()
            kv.key = key
            _set_value(kv.value, value)
        # What surrounds a batch's spans: a ResourceSpans holding only this gateway's resource,
        # a ScopeSpans holding only its scope.
        self.resource_part = ResourceSpans(resource=message).SerializeToString()
        self.scope_part = ScopeSpans(
            scope=InstrumentationScope(name="txgateway", version=__version__)).SerializeToString()
        self.known: dict[str, dict[Any, bytes]] = {}        # key -> value -> a Span with that attribute, encoded (or _SEEN)
        self.shapes: dict[tuple[str, int, int], bytes] = {}  # (name, kind, flags) -> a Span with those, encoded
        self.remembered = 0

    def span(self, record: SpanRecord) -> bytes:
        """Ended `record`, encoded as a Span."""
        span = Span(trace_id=record.trace_id, span_id=record.span_id, parent_span_id=record.parent_id,
                    start_time_unix_nano=record.start, end_time_unix_nano=record.end)
        if record.trace_state:          # (a keyword less when empty, as it nearly always is)
            span.trace_state = record.trace_state
        known = self.known
        parts = [b""]          # the span's own message, serialized once complete
        for key, value in record.attributes.items():
            part = None
            if type(value) is str or type(value) is int:   # not True == 1
                values = known.get(key)
                part = values.get(value) if values is not None else None
                if part is _SEEN:
                    part = self._remember(key, value)
                elif part is None:
                    self._seen(key, value)
            if part is None:
                _set_value(span.attributes.add(key=key).value, value)
            else:
                parts.append(part)
        if record.status:
            status: Any = span.status       # (its code an int, as the record's, not the stubs' enum type)
            status.code = record.status
            if record.message:
                status.message = record.message
        flags = _REMOTE_PARENT if record.remote_parent else _LOCAL_PARENT
        shape = self.shapes.get((record.name, record.kind, flags))
        if shape is None:
            shape = self._shape(record.name, record.kind, flags)
        parts[0] = span.SerializeToString()
        parts.append(shape)
        return b"".join(parts)

    def request(self, spans: list[bytes]) -> bytes:
        """The ExportTraceServiceRequest of a batch of encoded spans (`span`'s): this gateway's
        resource and scope around them."""
        scope_spans = [self.scope_part]
        _SPANS(scope_spans.append, spans, False)
        resource_spans = [self.resource_part]
        _SCOPE_SPANS(resource_spans.append, b"".join(scope_spans), False)
        request: list[bytes] = []
        _RESOURCE_SPANS(request.append, b"".join(resource_spans), False)
        return b"".join(request)

    def _seen(self, key: str, value: Any) -> None:
        """A value not seen before: most never recur (a path, a URL), and keeping each one's
        encoding would cost more than the span's own message does for it."""
        self._bound()
        self.known.setdefault(key, {})[value] = _SEEN

    def _remember(self, key: str, value: Any) -> bytes:
        self._bound()
        one = Span()
        _set_value(one.attributes.add(key=key).value, value)
        part = self.known.setdefault(key, {})[value] = one.SerializeToString()
        return part

    def _shape(self, name: str, kind: int, flags: int) -> bytes:
        self._bound()
        part = self.shapes[name, kind, flags] = Span(name=name, kind=kind, flags=flags).SerializeToString()   # type: ignore[arg-type]
        return part

    def _bound(self) -> None:
        """Values that turn out to vary start the kept encodings over."""
        if self.remembered >= _KNOWN_LIMIT:
            self.known.clear()
            self.shapes.clear()
            self.remembered = 0
        self.remembered += 1


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
