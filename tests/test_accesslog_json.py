"""A filter's structured note (compose's `calls`) is written with orjson when that gives the
text json.dumps would write, and by json.dumps otherwise: either way the same line."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from typing import Any

import pytest

from txgateway.ops.accesslog import _json


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
