"""core/hopbyhop.FieldNames: a connection's lower-cased field names, kept by place."""

from __future__ import annotations

from txgateway.core.hopbyhop import FieldNames


def test_the_same_name_at_the_same_place_is_the_same_object():
    names = FieldNames()
    first = names.lower(b"Content-Type", 0)
    assert first == b"content-type"
    assert names.lower(b"Content-Type-"[:-1], 0) is first     # another object, equal


def test_another_name_at_a_place_replaces_the_one_kept_there():
    names = FieldNames()
    names.lower(b"Server", 0)
    names.lower(b"Date", 1)
    assert names.lower(b"X-Other", 0) == b"x-other"
    assert names.lower(b"X-Other", 0) == b"x-other"
    assert names.lower(b"Date", 1) == b"date"


def test_places_past_the_ones_kept_are_lowered_without_being_kept():
    names = FieldNames()
    assert names.lower(b"Skipped", 5) == b"skipped"      # not the next place: not kept
    assert names.lower(b"Far", 1000) == b"far"
    assert [names.lower(b"N-%d" % i, i) for i in range(100)] == [b"n-%d" % i for i in range(100)]
    assert [names.lower(b"N-%d" % i, i) for i in range(100)] == [b"n-%d" % i for i in range(100)]
