"""`transform:` reshapes JSON bodies on a route: responses (filters/reshape.py's operations)
and request bodies (`request: {set, remove}`).

    - prefix: /api/users
      upstream: users
      transform:
        deny: [password_hash]
        rename: {name: full_name}
        request: {set: {requested_by: "{user_id}"}, remove: [is_admin]}

Only JSON bodies (`application/json`, `+json`, not content-encoded) within `max_body_size`
(default 1 MiB) are transformed; anything else streams through untouched. A response is
held until its end, its head too (it goes out with the new body's `Content-Length`; its
`ETag`, which named the upstream's bytes, is dropped); one whose size is not announced is
held only up to the bound and released as it is past it (then chunked). A request body with a `Content-Length` is
read before it goes upstream, edited and sent with its new length; a chunked one passes as
it streams. On a composed route the response transform applies to the merged answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml
from twisted.internet.defer import Deferred

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader, _Invalid
from txgateway.config.units import parse_size
from txgateway.core.jsonbody import BadJSON, dumps, is_json, loads
from txgateway.core.pipeline import (
    BodyHook,
    HeadHook,
    LocalResponse,
    RequestContext,
    RequestHook,
    ResponseHead,
    error_response,
)
from txgateway.filters.reshape import (
    NO_PATH,
    RESHAPE_KEYS,
    Reshape,
    dotted_path,
    identity_value,
    parents,
    parse_reshape,
)

__all__ = ["TRANSFORM", "BodyEdit", "Transform", "TransformPolicy"]

_IDENTITY_VALUE = re.compile(r"\{(user_id|user_role|user_tier)\}")
_STALE = frozenset({b"etag", b"content-md5", b"digest"})


@dataclass(frozen=True)
class BodyEdit:
    """`request: {set, remove}`: fields set (string values may name `{user_id}`,
    `{user_role}`, `{user_tier}`) and removed, dotted paths."""

    set: tuple[tuple[tuple[str, ...], Any], ...] = ()
    remove: tuple[tuple[str, ...], ...] = ()

    def apply(self, value: Any, identity: Any) -> Any:
        if not isinstance(value, dict):
            return value
        for path in self.remove:
            for parent in parents(value, path):
                parent.pop(path[-1], None)
        for path, new in self.set:
            level = value
            for key in path[:-1]:
                nxt = level.get(key)
                if not isinstance(nxt, dict):
                    nxt = level[key] = {}
                level = nxt
            level[path[-1]] = _stamped(new, identity)
        return value


def _stamped(value: Any, identity: Any) -> Any:
    """`value` with its `{user_*}` names replaced; a whole-string name of an absent value: null."""
    if not isinstance(value, str) or "{" not in value:
        return value
    whole = _IDENTITY_VALUE.fullmatch(value)
    if whole is not None:
        return identity_value(identity, whole.group(1))
    return _IDENTITY_VALUE.sub(lambda m: identity_value(identity, m.group(1)) or "", value)


@dataclass(frozen=True)
class TransformPolicy:
    response: Reshape | None = None
    request: BodyEdit | None = None
    max_body_size: int = 2**20


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> TransformPolicy | None:
    if "transform" not in fields:
        return None
    path = f"{path}.transform"
    f = r.mapping(fields["transform"], path, {**RESHAPE_KEYS, "request": "", "max_body_size": ""})
    before = len(r.problems)
    response = r.attempt(lambda: parse_reshape(r, f, path), None)
    request = r.attempt(lambda: _body_edit(r, f["request"], f"{path}.request"), None) if "request" in f else None
    values: dict[str, Any] = {}
    if "max_body_size" in f:
        values["max_body_size"] = r.attempt(lambda: r.parsed(f["max_body_size"], f"{path}.max_body_size", parse_size),
                                            2**20)
    if len(r.problems) != before:
        raise _Invalid()
    if response is None and request is None:
        raise r.fail(fields["transform"], path, "expected at least one of: " + ", ".join([*RESHAPE_KEYS, "request"]))
    return TransformPolicy(response, request, **values)


def _body_edit(r: Reader, node: yaml.Node, path: str) -> BodyEdit:
    f = r.mapping(node, path, {"set": "", "remove": ""})
    sets = []
    if "set" in f:
        for name, key_node, value in r.free_mapping(f["set"], f"{path}.set"):
            sets.append((r.attempt(lambda: dotted_path(r, key_node, f"{path}.set.{name}"), NO_PATH),
                         yaml.safe_load(yaml.serialize(value))))
    removes = []
    if "remove" in f:
        removes = [r.attempt(lambda: dotted_path(r, item, item_path), NO_PATH) for item_path, item in
                   r.sequence(f["remove"], f"{path}.remove")]
    return BodyEdit(tuple(sets), tuple(removes))


class _Held:
    __slots__ = ("chunks", "size", "released")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.released = False        # past the bound: streams on untouched


class Transform:
    """The filter of one route with `transform:`."""

    name = "transform"
    on_finished = None

    def __init__(self, policy: TransformPolicy, clock: Any, idle_timeout: float) -> None:
        self.reshape = policy.response
        self.edit = policy.request
        self.limit = policy.max_body_size
        self.clock = clock
        self.idle_timeout = idle_timeout
        # Only the phases the route's transform uses (the others cost nothing).
        self.on_request: RequestHook | None = self._read_body if self.edit is not None else None
        self.on_response_head: HeadHook | None = self._hold if self.reshape is not None else None
        self.on_response_body: BodyHook | None = self._release if self.reshape is not None else None

    # -- request body ----------------------------------------------------------------

    def _read_body(self, ctx: RequestContext) -> Deferred[LocalResponse | None] | None:
        length = ctx.content_length
        if ctx.chunked or not length or length > self.limit or not is_json(ctx.header(b"content-type")):
            return None
        return _BodyReader(ctx, self).start()

    # -- response body ---------------------------------------------------------------

    def _hold(self, ctx: RequestContext, head: ResponseHead) -> None:
        if (not 200 <= head.status < 300 or head.status == 204 or ctx.method == b"HEAD"
                or (head.length is not None and head.length > self.limit)):
            return
        content_type = encoding = None
        for name, value in head.headers:
            if name == b"content-type":
                content_type = value
            elif name == b"content-encoding":
                encoding = value
        if not is_json(content_type) or (encoding is not None and encoding.strip().lower() != b"identity"):
            return
        head.headers = [h for h in head.headers if h[0] not in _STALE]
        head.length = None
        ctx.held_head = head
        ctx.set_state(self.name, _Held())

    def _release(self, ctx: RequestContext, chunk: bytes, end: bool) -> bytes:
        held: _Held | None = ctx.get_state(self.name)      # typed: compiled, native attribute access
        if held is None or held.released:
            return chunk
        held.chunks.append(chunk)
        held.size += len(chunk)
        if held.size > self.limit:
            held.released = True
            out = b"".join(held.chunks)
            held.chunks = []
            return out
        if not end:
            return b""
        chunks = held.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        held.chunks = []
        try:
            return self.reshape.rewrite(body)    # type: ignore[union-attr]
        except BadJSON:
            ctx.note("transform", "response left as it was: not valid JSON")
            return body


class _BodyReader:
    """Reads one request body (bounded by its Content-Length) for `request:` edits."""

    def __init__(self, ctx: RequestContext, transform: Transform) -> None:
        self.ctx = ctx
        self.transform = transform
        self.chunks: list[bytes] = []
        self.done: Deferred[LocalResponse | None] = Deferred(lambda _: self._stop())
        self.timer: Any = None

    def start(self) -> Deferred[LocalResponse | None]:
        self.timer = self.transform.clock.callLater(self.transform.idle_timeout, self._idle)
        self.ctx.downstream.read_body(self.ctx, self)
        return self.done

    def _stop(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def _idle(self) -> None:
        self.timer = None
        if not self.done.called:
            self.done.callback(error_response(self.ctx, 408, "REQUEST_TIMEOUT",
                                              "the request body did not arrive in time"))

    def body_chunk(self, data: bytes) -> None:
        self.chunks.append(data)

    def body_end(self) -> None:
        if self.done.called:
            return
        self._stop()
        ctx = self.ctx
        body = b"".join(self.chunks)
        self.chunks = []
        try:
            body = dumps(self.transform.edit.apply(loads(body), ctx.identity))     # type: ignore[union-attr]
        except BadJSON:
            ctx.note("transform", "request body left as it was: not valid JSON")
        ctx.content_length = len(body)
        ctx.downstream = _Replay(ctx.downstream, body)
        self.done.callback(None)


class _Replay:
    """The request's transport, but its body is the edited one, already read."""

    def __init__(self, downstream: Any, body: bytes) -> None:
        self.original = downstream
        self.body = body
        self.tls = downstream.tls

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        if self.body:
            sink.body_chunk(self.body)
        sink.body_end()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.original, name)


def _build(resources: Any, policy: TransformPolicy, route: Any) -> Transform:
    return Transform(policy, resources.clock, resources.config.limits.idle_timeout)


TRANSFORM = FilterKind(name="transform", build=_build, route_keys=("transform",), parse_route=parse_route)
