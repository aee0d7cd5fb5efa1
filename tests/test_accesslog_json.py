"""A filter's structured note (compose's `calls`) is written with orjson when that gives the
text json.dumps would write, and by json.dumps otherwise: either way the same line. A string
note's piece is remembered (the cache notes HIT or MISS on every request): the same text."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import pytest

from txgateway.ops.accesslog import FIELDS, AccessRecord, _extra, _json
from txgateway.testing import make_ctx


@dataclass
class Point:
    x: int


NOTES: list[Any] = [
    [{"call": "user", "upstream": "users", "status": 200, "ms": 1.234}, {"call": "orders", "status": None}],
    {"nested": {"list": [1, 2.5, True, False, None, "a\"b\\c\n"]}, "big": 10**17},
    {"name": "Zoë", "emoji": "\U0001F600"},                   # not ASCII: json escapes it
    {1: "a key that is not a string"},
    [2**70],                                                   # past 64 bits
    {"when": datetime.datetime(2026, 12, 6, 15, 0), "point": Point(1)},   # default=str, as json does
    [1e16, 0.1, -0.0],
]


@pytest.mark.parametrize("note", NOTES)
def test_a_structured_note_is_written_as_json_dumps_writes_it(note: Any) -> None:
    text = _json(note)       # how AccessRecord.json_line writes a note's value
    assert text == json.dumps(note, separators=(",", ":"), default=str)
    assert text.isascii()


FIELDS_OF_A_LINE: tuple[Any, ...] = ("2026-12-06T15:00:00.000Z", "c", "c", "127.0.0.1", "GET", None, "/p", None,
                                     "1.1", *[None] * 4, 200, None, 1.5, None, 0, 0, 0, *[None] * 8)


@pytest.mark.parametrize("calls", [
    [("cache", "MISS")], [("cache", "MISS")],                    # the second from the last line's end
    [("cache", "HIT")], [("cache", "MISS"), ("cache", "HIT")],
    [("cache", "MISS"), ("filter_error", "x (response head)")], [("cors", "preflight"), ("cache", "MISS")],
    [("cache", "STALE"), ("breaker", "open")], [("breaker", "open"), ("cache", "STALE")],
    [("auth_service", "cached"), ("cache", "MISS"), ("cache", "HIT")], [("cache", "MISS"), ("calls", [1, "a"])],
])
def test_a_log_note_makes_the_line_and_record_a_note_makes(calls: list[tuple[str, Any]]) -> None:
    """The cache's verdict in RequestContext's two slots (log_note) when it is the first note:
    the line and the record as when every field is a note, in the order they were noted."""
    slots, noted = make_ctx(), make_ctx()
    for field, value in calls:
        (slots.log_note if field == "cache" else slots.note)(field, value)
        noted.note(field, value)
    mine = AccessRecord(FIELDS_OF_A_LINE, _extra(slots.notes) if slots.notes else None, None, slots.log_field,
                        slots.log_value)
    theirs = AccessRecord(FIELDS_OF_A_LINE, _extra(noted.notes) if noted.notes else None)
    assert mine.json_line() == theirs.json_line()
    assert list(mine.as_dict().items()) == list(theirs.as_dict().items())


@pytest.mark.parametrize("notes", [
    {"cache": "MISS"}, {"cache": "MISS"},                   # the second from the remembered piece
    {"cache": "HIT", "calls": [1, "a\"b"]}, {"cache": "Zo\u00eb \"\\"},
    {"breaker": "open"}, {"breaker": "open", "cache": "STALE"}, {"breaker": "x", "upstream_error": "y"},
])
def test_the_notes_follow_the_fields_as_json_writes_them(notes: dict[str, Any]) -> None:
    line = AccessRecord(FIELDS_OF_A_LINE, _extra(notes)).json_line()
    assert line.isascii() and line.endswith("}\n")
    written = json.loads(line)
    assert list(written)[:len(FIELDS)] == list(FIELDS)
    assert {k: v for k, v in written.items() if k not in FIELDS} == \
        {k: v for k, v in notes.items() if k not in ("breaker", "upstream_error")}
