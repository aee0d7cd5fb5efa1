"""The ids the forwarding filter makes in blocks (core/ids.py): each one a valid random UUID4
and a well-formed new traceparent, different for every request, across blocks."""

from __future__ import annotations

import re
import uuid

from txgateway.core.ids import RequestIds, correlation_id, traceparent

_NEW_TRACE = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-(01|00)\Z")


def test_ids_are_random_uuid4s_and_new_traces_across_blocks() -> None:
    for flags in (b"01", b"00"):
        ids = RequestIds(flags)
        uuids, traces = set(), set()
        for _ in range(1100):            # more than two blocks
            ids.draw()
            parsed = uuid.UUID(ids.uuid)
            assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == ids.uuid
            assert ids.uuid_bytes == ids.uuid.encode()
            assert _NEW_TRACE.match(ids.trace) and ids.trace.endswith(flags), ids.trace
            uuids.add(ids.uuid)
            traces.add(ids.trace[3:35])
        assert len(uuids) == len(traces) == 1100


def test_a_callers_trace_is_continued_with_a_new_span_id() -> None:
    ids = RequestIds()
    ids.draw()
    caller = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert traceparent(caller, ids.trace) == b"00-0af7651916cd43dd8448eb211c80319c-" + ids.trace[36:52] + b"-00"
    assert traceparent(b"00-" + b"0" * 32 + b"-b7ad6b7169203331-01", ids.trace) == ids.trace
    assert traceparent(None, ids.trace) == ids.trace


def test_a_clients_correlation_id_is_kept_when_well_formed() -> None:
    assert correlation_id(b"abc-123", "fresh") == "abc-123"
    assert correlation_id(b"bad id", "fresh") == "fresh"
    assert uuid.UUID(correlation_id(None)).version == 4
