"""filters/allowdecode.py against the general path: `Reshape.rewrite` through msgspec's
decoder gives the bytes (or the BadJSON) that orjson + reshape's functions give."""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pytest

from tests.configcheck import BASE
from txgateway.config.schema import parse_config
from txgateway.core.jsonbody import BadJSON, dumps, loads
from txgateway.filters.reshape import Reshape

SPECS = [
    "{allow: [id, name, email, address, orders.*.id, orders.*.total, orders.*.status], "
    "rename: {name: full_name, address.zip: postcode}, add: {api_version: 2}}",
    "{allow: [id, address.city, orders.*.id]}",
    "{allow: [orders.*, '*', x]}",
    "{allow: ['*.id', '*.name.first']}",
    "{allow: [a.b.c, a.d, orders.*.*.id, orders.count], deny: [a.d], pick: {orders: id}}",
    "{allow: [id, meta], deny: [meta.secret], rename: {id: ident, meta.x: y}}",
    "{allow: []}",
    "{target: data, allow: [id, orders.*.total], rename: {id: ident}}",
    "{target: a.b}",
    "{target: orders, deny: [x]}",
]
KEYS = ["data", "id", "name", "email", "address", "orders", "city", "zip", "total", "status", "*", "a", "b", "c", "d",
        "first", "meta", "secret", "x", "count", "é", "日本"]


def reshape(spec: str) -> Reshape:
    config = parse_config(BASE + f"  - {{prefix: /x, upstream: users, transform: {spec}}}\n", "c.yaml")
    response: Reshape = config.routes[-1].policies["transform"].response
    assert response.decoder is not None
    return response


def general(r: Reshape, body: bytes) -> bytes | str:
    try:
        return dumps(r.apply(loads(body)))
    except BadJSON:
        return "BadJSON"


def rewritten(r: Reshape, body: bytes) -> bytes | str:
    try:
        return r.rewrite(body)
    except BadJSON:
        return "BadJSON"


def scalar(rng: random.Random) -> Any:
    kind = rng.randrange(9)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([0, -1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 2**64, -(2**63) - 1, 10**30])
    if kind == 2:
        return rng.randrange(-10**6, 10**6)
    if kind == 3:       # any finite double, from its bits
        value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        return value if value == value and abs(value) != float("inf") else 0.5
    if kind == 4:
        return rng.choice([0.1, -0.0, 1e16, 1.5e-7, 19.5, 5e-324, 1.7976931348623157e308, 100.0])
    if kind == 5:
        return rng.choice(["", "Ada", "é\u00e9", "日本語", "emoji \U0001f600", "quote \" back \\ slash",
                           "ctl \n\t\u0001\u001f", "nul \u0000", "</script>", "\u2028\u2029"])
    return "".join(rng.choice("ab yz\u00e9\u4e2d") for _ in range(rng.randrange(8)))


def value(rng: random.Random, depth: int) -> Any:
    kind = rng.randrange(10) if depth < 5 else 9
    if kind < 4:
        return {rng.choice(KEYS): value(rng, depth + 1) for _ in range(rng.randrange(6))}
    if kind < 6:
        return [value(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind < 8:        # the shape the specs name, more often than chance would give it
        return [{"id": value(rng, depth + 2), "total": scalar(rng), "name": {"first": scalar(rng)}}
                for _ in range(rng.randrange(3))]
    return scalar(rng)


def document(rng: random.Random) -> bytes:
    doc = {rng.choice(KEYS): value(rng, 1) for _ in range(rng.randrange(1, 8))} if rng.randrange(8) else value(rng, 0)
    text = json.dumps(doc, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, None, 1]),
                      separators=rng.choice([(",", ":"), (", ", ": ")]))
    return text.encode()


@pytest.mark.parametrize("spec", SPECS)
def test_random_documents_give_the_same_bytes_both_ways(spec: str) -> None:
    r = reshape(spec)
    rng = random.Random(spec)
    fast = 0
    for _ in range(1500):
        body = document(rng)
        assert rewritten(r, body) == general(r, body), body
        try:
            r.decoder.decode(body)
            fast += 1
        except ValueError:
            pass
    assert fast > 100       # the decoder answered a good share itself (not only the general path)


NESTED = b"[" * 10_000 + b"]" * 10_000
ODD = [
    b'{"id":1,"id":{"x":1}}', b'{"orders":[{"id":1}],"orders":5}', b'{"orders":5,"orders":[{"id":2}]}',
    b'{"address":{"city":"a"},"address":{"zip":"b"}}', b'{"orders":[{"id":1},null,[{"id":2}],3]}',
    b'{"orders":{"*":{"id":1},"id":2}}', b'{"address":null,"id":1}', b'{"address":"Oslo","id":1}',
    b'[{"id":1},{"name":{"first":"A","last":"B"}}]', b'"just a string"', b"null", b"[]", b"{}",
    b'{"x":"\xff","id":1}', b'{"id":"\xc3\xa9"}', b'{"x":"\xed\xa0\x80","id":1}', b'{"x":"\\ud800","id":1}',
    b'{"x":"\x01","id":1}', b'{"x":01,"id":1}', b'{"x":NaN,"id":1}', b'{"id":1E2,"x":-0}',
    b'{"x":123456789012345678901234567890,"id":1}', b'{"id":123456789012345678901234567890}',
    b'{"id":-9223372036854775809}', b'{"id":18446744073709551615}', b'{"id":1} x', b"", b"\xef\xbb\xbf{}",
    b'{"id":1,}', b'{"id":[1,2,]}', b'  {"id" : 1 }\n',
    b'{"x":' + NESTED + b',"id":1}', b'{"id":' + NESTED + b"}",
    b'{"x":' + b"[" * 1000 + b"]" * 1000 + b',"id":1}', b'{"meta":' + b"[" * 300 + b"]" * 300 + b"}",
]


@pytest.mark.parametrize("spec", SPECS)
def test_odd_and_bad_documents_give_the_same_answer_both_ways(spec: str) -> None:
    r = reshape(spec)
    for body in ODD:
        assert rewritten(r, body) == general(r, body), body


def test_a_number_past_a_double_is_refused_where_kept_and_not_read_where_dropped() -> None:
    """The one difference: orjson refuses the whole body, the decoder never reads a field
    allow drops (the reshaped answer has no trace of it; the general path would have passed
    the body untouched, dropped field included)."""
    r = reshape("{allow: [id]}")
    assert rewritten(r, b'{"id":1e400}') == general(r, b'{"id":1e400}') == "BadJSON"
    assert general(r, b'{"x":1e400,"id":1}') == "BadJSON"
    assert rewritten(r, b'{"x":1e400,"id":1}') == b'{"id":1}'
