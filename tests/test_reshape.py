"""filters/reshape.py: the JSON operations of `transform:`, on parsed values."""

from __future__ import annotations

import copy

from tests.configcheck import BASE, config_errors
from txgateway.config.schema import parse_config

DOC = {"data": {"id": 7, "name": "Ann", "password": "x", "address": {"city": "Oslo", "zip": "0150"},
                "orders": [{"id": 1, "total": 42, "internal": True}, {"id": 2, "total": 5, "internal": False}]},
       "meta": {"page": 1}}


def reshape(transform: str):
    config = parse_config(BASE + f"  - {{prefix: /x, upstream: users, transform: {transform}}}\n", "c.yaml")
    return config.routes[-1].policies["transform"].response


def test_target_then_allow_with_a_star_through_a_list():
    out = reshape("{target: data, allow: [id, address.city, orders.*.id]}").apply(copy.deepcopy(DOC))
    assert out == {"id": 7, "address": {"city": "Oslo"}, "orders": [{"id": 1}, {"id": 2}]}


def test_deny_drops_fields_and_elements_fields():
    out = reshape("{deny: [data.password, data.orders.*.internal, meta]}").apply(copy.deepcopy(DOC))
    assert "meta" not in out and "password" not in out["data"]
    assert out["data"]["orders"] == [{"id": 1, "total": 42}, {"id": 2, "total": 5}]


def test_pick_rename_and_add():
    out = reshape("{target: data, pick: {orders: total}, rename: {name: full_name, address.zip: postcode}, "
                  "add: {api_version: 2}}").apply(copy.deepcopy(DOC))
    assert out["orders"] == [42, 5]
    assert out["full_name"] == "Ann" and "name" not in out
    assert out["address"] == {"city": "Oslo", "postcode": "0150"}
    assert out["api_version"] == 2


def test_an_absent_target_is_null_and_allow_keeps_nothing_of_a_scalar():
    assert reshape("{target: nope.deeper}").apply(copy.deepcopy(DOC)) is None
    assert reshape("{allow: [meta.page.x]}").apply(copy.deepcopy(DOC)) == {"meta": {}}


def test_transform_config_mistakes_name_their_key():
    route = "  - {prefix: /x, upstream: users, transform: %s}\n"
    assert config_errors(BASE + route % "{allow: [a..b], rename: {a: b.c}}") == [
        'c.yaml:9: routes[2].transform.allow[0]: expected a dotted path like "user.address.city", got \'a..b\'',
        "c.yaml:9: routes[2].transform.rename.a: expected a field name (no dots), got 'b.c'"]
    assert config_errors(BASE + route % "{max_body_size: 1KiB}") == [
        "c.yaml:9: routes[2].transform: expected at least one of: target, allow, deny, pick, rename, add, request"]
    assert config_errors(BASE + route % "{request: {stamp: {}}}") == [
        "c.yaml:9: routes[2].transform.request.stamp: unknown key (expected one of: remove, set)"]
