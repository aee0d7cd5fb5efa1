"""An `allow` list as a msgspec type: a JSON body decoded without building what allow drops.

Parsing a whole 2 KiB answer into Python objects (orjson) and then dropping most of them was
most of what `transform:` cost. A msgspec decoder given a `TypedDict` per object of the allow
tree skips the fields it does not name (they are checked as JSON, never built) and makes
exactly the dicts and lists `reshape._allow` would keep, in the body's order: `orders.*.id` is
an object or a list of objects with `id`, a path's end (`address`) any value.

It answers the shape allow expects; anything else (a scalar or `null` where the tree goes on,
a non-object element of a listed array, a non-object root) raises `msgspec.ValidationError`,
and the caller then takes the general path, which decides what such a value becomes. A `target`
is the same thing: its path as objects down to the allow tree (reshape._decoded_tree). Built
once per route at config load; msgspec is imported only by configs with `allow` or `target`.
"""

from __future__ import annotations

import typing
from typing import Any, Union

__all__ = ["allow_decoder"]


def allow_decoder(tree: dict[str, Any]) -> Any:
    """A `msgspec.json.Decoder` whose result is `reshape._allow(orjson.loads(body), tree)`
    for every body of the shape the tree names."""
    import msgspec
    counter = [0]
    return msgspec.json.Decoder(_node(tree, counter))


def _node(tree: dict[str, Any], counter: list[int]) -> Any:
    """The type of a value the tree goes on into: an object with the tree's keys (`*`
    included: an object may have such a key), or, under a `*`, a list of its elements."""
    counter[0] += 1
    name = f"Allow{counter[0]}"
    fields = {key: Any if sub is None else _node(sub, counter) for key, sub in tree.items()}
    # total=False: an absent field stays absent. Created at run time, from names in the config.
    make: Any = typing.TypedDict
    obj = make(name, fields, total=False)
    if "*" not in tree:
        return obj
    element = tree["*"]
    items = Any if element is None else _node(element, counter)
    union: Any = Union      # types built at run time, not ones mypy can read
    array: Any = list
    return union[obj, array[items]]
