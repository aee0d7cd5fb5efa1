"""JSON reshaping, as `transform:` writes it (Kong's response-transformer, KrakenD's
allow/deny/mapping/target/flatmap): pure functions on parsed JSON, and their parser.

    transform:
      target: data                   # only this sub-object (absent: null)
      allow: [id, name, orders.*.id] # keep only these (dotted; * = each element of a list)
      deny: [password, orders.*.internal]
      pick: {orders: id}             # a list of objects -> the list of one field of each
      rename: {name: full_name, address.zip: postcode}
      add: {api_version: 2}          # static fields at the top level

Applied in that order; `allow` keeps the kept fields in the body's order. Paths come from the
config and are short, so walking them recurses no deeper than the config wrote; the JSON
itself was parsed within core/jsonbody's bounds. A response with `allow` or `target` is
decoded by filters/allowdecode.py, which never builds what they drop; the general path
(orjson, then these functions) answers whatever that decoder does not.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Final

import yaml

from txgateway.config.reader import Reader, _Invalid
from txgateway.core.jsonbody import dumps, loads
from txgateway.filters.allowdecode import allow_decoder

__all__ = ["IDENTITY_ATTRIBUTES", "NO_PATH", "RESHAPE_KEYS", "Reshape", "dotted_path", "get_path", "identity_value", "parents", "parse_reshape"]

RESHAPE_KEYS = {"target": "", "allow": "", "deny": "", "pick": "", "rename": "", "add": ""}
Tree = dict[str, Any]           # a path tree: key -> subtree, or None for "the whole value"


@dataclass(frozen=True)
class Reshape:
    target: tuple[str, ...] | None = None
    allow: Tree | None = None
    deny: Tree | None = None
    pick: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = ()
    rename: tuple[tuple[tuple[str, ...], str], ...] = ()
    add: tuple[tuple[str, Any], ...] = ()
    # allowdecode's decoder for `target` and `allow` (made from them: not compared).
    decoder: Any = dataclasses.field(default=None, compare=False, repr=False)

    def rewrite(self, body: bytes) -> bytes:
        """`dumps(apply(loads(body)))`, BadJSON when the body is not usable JSON; through the
        decoder when there is one. Whatever it refuses (a shape allow does not name, an
        absent target, an integer orjson reads as a float, nesting past its depth) takes the
        general path, so both give the same bytes."""
        decoder = self.decoder
        if decoder is not None:
            try:
                if not body.isascii():
                    body.decode()       # orjson refuses invalid UTF-8 anywhere; msgspec skips it
                value = decoder.decode(body)
                if self.target is not None:
                    for key in self.target:      # objects all the way (the decoder's types)
                        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
                if value is not _MISSING:
                    return dumps(self._after_allow(value))
            except (ValueError, RecursionError):
                pass
        return dumps(self.apply(loads(body)))

    def apply(self, value: Any) -> Any:
        """The reshaped value; `value` may be changed in place (the caller parsed it)."""
        if self.target is not None:
            value = get_path(value, self.target)
        if self.allow is not None:
            value = _allow(value, self.allow)
        return self._after_allow(value)

    def _after_allow(self, value: Any) -> Any:
        if self.deny is not None:
            _deny(value, self.deny)
        for where, field in self.pick:
            _pick(value, where, field)
        for old, new in self.rename:
            _rename(value, old, new)
        if self.add and isinstance(value, dict):
            for key, extra in self.add:
                value[key] = extra
        return value


def identity_value(identity: Any, name: str) -> str | None:
    """`user_id`, `user_role` or `user_tier` of the request's identity (auth's Identity), or
    None (no identity, or no such claim): the values templates may stamp into bodies and paths."""
    if identity is None:
        return None
    value: str | None = getattr(identity, IDENTITY_ATTRIBUTES[name])
    return value


IDENTITY_ATTRIBUTES = {"user_id": "user_id", "user_role": "role", "user_tier": "tier"}
_MISSING: Final = object()      # Final: compiled, a static, not a module-dict lookup per use
NO_PATH: tuple[str, ...] = ()


def get_path(value: Any, path: tuple[str, ...]) -> Any:
    """The value at a dotted path (a digit indexes a list), or None."""
    for key in path:
        if isinstance(value, dict):
            value = value.get(key)
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            return None
    return value


def _allow(value: Any, tree: Tree) -> Any:
    # Typed locals: compiled, dict and list operations on them skip Python's method lookup.
    if isinstance(value, dict):
        source: dict[str, Any] = value
        out: dict[str, Any] = {}
        for key, kept in source.items():       # the body's order, as allowdecode's dicts have it
            sub = tree.get(key, _MISSING)
            if sub is _MISSING:
                continue
            if sub is not None:
                kept = _allow(kept, sub)
            if kept is not _MISSING:
                out[key] = kept
        return out
    if isinstance(value, list) and "*" in tree:
        sub = tree["*"]
        if sub is None:
            return value
        elements: list[Any] = value
        kept_elements = []
        for element in elements:
            kept = _allow(element, sub)
            if kept is not _MISSING:
                kept_elements.append(kept)
        return kept_elements
    return _MISSING


def _deny(value: Any, tree: Tree) -> None:
    if isinstance(value, dict):
        source: dict[str, Any] = value
        for key, sub in tree.items():
            if key in source:
                if sub is None:
                    del source[key]
                else:
                    _deny(source[key], sub)
    elif isinstance(value, list) and "*" in tree:
        elements: list[Any] = value
        sub = tree["*"]
        if sub is None:
            elements.clear()
        else:
            for element in elements:
                _deny(element, sub)


def parents(value: Any, path: tuple[str, ...]) -> list[dict[str, Any]]:
    """The objects holding the last key of `path` (several through a `*`)."""
    if len(path) == 1:
        return [value] if isinstance(value, dict) else []
    level = [value]
    for key in path[:-1]:
        nxt: list[Any] = []
        for v in level:
            if key == "*" and isinstance(v, list):
                nxt.extend(v)
            elif isinstance(v, dict) and key in v:
                nxt.append(v[key])
        level = nxt
    return [v for v in level if isinstance(v, dict)]


def _pick(value: Any, where: tuple[str, ...], field: tuple[str, ...]) -> None:
    for parent in parents(value, where):
        items = parent.get(where[-1])
        if isinstance(items, list):
            parent[where[-1]] = [get_path(e, field) for e in items]


def _rename(value: Any, old: tuple[str, ...], new: str) -> None:
    if len(old) == 1:           # a top-level field (the usual case): no list of parents to make
        if isinstance(value, dict):
            top: dict[str, Any] = value
            if old[0] in top:
                top[new] = top.pop(old[0])
        return
    for parent in parents(value, old):
        if old[-1] in parent:
            parent[new] = parent.pop(old[-1])


def dotted_path(r: Reader, node: yaml.Node, path: str) -> tuple[str, ...]:
    text = r.string(node, path)
    parts = tuple(text.split("."))
    if not text or not all(parts):
        raise r.fail(node, path, f'expected a dotted path like "user.address.city", got {text!r}')
    return parts


def _tree(r: Reader, node: yaml.Node, path: str) -> Tree:
    tree: Tree = {}
    for item_path, item in r.sequence(node, path):
        parts = r.attempt(lambda: dotted_path(r, item, item_path), None)
        if parts is None:
            continue
        level = tree
        for key in parts[:-1]:
            sub = level.setdefault(key, {})
            if sub is None:          # a shorter path already names the whole value
                break
            level = sub
        else:
            level[parts[-1]] = None
    return tree


def _decoded_tree(target: tuple[str, ...] | None, allow: Tree | None) -> Tree | None:
    """What allowdecode's decoder builds for `target` then `allow`: the target's path as
    objects down to the allow tree (or to any value), or None when there is nothing to skip or
    the target may index a list (a digit) or name a `*` key."""
    if target is None:
        return allow
    if any(key.isdigit() or key == "*" for key in target):
        return None
    tree: Tree | None = allow
    for key in reversed(target):
        tree = {key: tree}
    return tree


def _pairs(r: Reader, node: yaml.Node, path: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """A free mapping's entries, or none after a recorded problem."""
    none: list[tuple[str, yaml.Node, yaml.Node]] = []
    return r.attempt(lambda: r.free_mapping(node, path), none)


def parse_reshape(r: Reader, f: dict[str, yaml.Node], path: str) -> Reshape | None:
    """The reshaping the keys of RESHAPE_KEYS in `f` describe, or None without any."""
    if not any(key in f for key in RESHAPE_KEYS):
        return None
    before = len(r.problems)
    values: dict[str, Any] = {}
    if "target" in f:
        values["target"] = r.attempt(lambda: dotted_path(r, f["target"], f"{path}.target"), None)
    for key in ("allow", "deny"):
        if key in f:
            values[key] = r.attempt(lambda: _tree(r, f[key], f"{path}.{key}"), None)
    if "pick" in f:
        picks = []
        # A loop, not a generator: compiled, a lambda in one misses the generator's names.
        for name, _, v in _pairs(r, f["pick"], f"{path}.pick"):
            picks.append((tuple(name.split(".")), r.attempt(lambda: dotted_path(r, v, f"{path}.pick.{name}"), NO_PATH)))
        values["pick"] = tuple(picks)
    if "rename" in f:
        renames = []
        for name, key_node, v in _pairs(r, f["rename"], f"{path}.rename"):
            new = r.attempt(lambda: r.string(v, f"{path}.rename.{name}"), "")
            if not new or "." in new:
                r.fail(v, f"{path}.rename.{name}", f"expected a field name (no dots), got {new!r}")
            if not all(name.split(".")):
                r.fail(key_node, f"{path}.rename.{name}", "expected a dotted path")
            renames.append((tuple(name.split(".")), new))
        values["rename"] = tuple(renames)
    if "add" in f:
        values["add"] = tuple((name, yaml.safe_load(yaml.serialize(v))) for name, _, v in _pairs(r, f["add"], f"{path}.add"))
    if len(r.problems) != before:
        raise _Invalid()
    decoded = _decoded_tree(values.get("target"), values.get("allow"))
    if decoded is not None:
        values["decoder"] = allow_decoder(decoded)
    return Reshape(**values)
