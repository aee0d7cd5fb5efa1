"""`upstream_errors: envelope`: an upstream's error page becomes the gateway's JSON envelope.

With `envelope`, an upstream answer with a 5xx status (or a 4xx listed in `include`) whose
body is not JSON reaches the client as `{"error": {"code": "UPSTREAM_ERROR", ...}}` with
the upstream's status and the request's correlation id, and nothing of the upstream's page
(headers describing the page go too). The page's first bytes go to the access log
(`upstream_excerpt`), never to the client. JSON error bodies (an API's own errors) and
`pass` (the default) leave the answer as it is.

    - prefix: /api/legacy
      upstream: legacy
      upstream_errors: envelope                        # 5xx pages
    - prefix: /api/shop
      upstream: shop
      upstream_errors: {mode: envelope, include: [404, 409]}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Scope
from txgateway.config.reader import Reader, _Invalid
from txgateway.core.jsonbody import is_json
from txgateway.core.pipeline import RequestContext, ResponseHead, error_response

__all__ = ["UPSTREAM_ERRORS", "UpstreamErrors", "UpstreamErrorsPolicy"]

EXCERPT = 256      # bytes of the upstream's page kept for the access log
_KEPT = frozenset({b"retry-after"})


@dataclass(frozen=True)
class UpstreamErrorsPolicy:
    include: frozenset[int] = frozenset()     # 4xx statuses enveloped too


def parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> UpstreamErrorsPolicy | None:
    if "upstream_errors" not in fields:
        return None
    node = fields["upstream_errors"]
    path = f"{path}.upstream_errors"
    if isinstance(node, yaml.ScalarNode):
        return None if r.choice(node, path, ("pass", "envelope")) == "pass" else UpstreamErrorsPolicy()
    f = r.mapping(node, path, {"mode": "", "include": ""})
    mode = r.choice(f["mode"], f"{path}.mode", ("pass", "envelope")) if "mode" in f else "envelope"
    include: set[int] = set()
    before = len(r.problems)
    for item_path, item in r.sequence(f["include"], f"{path}.include") if "include" in f else ():
        status = r.attempt(lambda: r.integer(item, item_path), None)
        if status is not None and not 400 <= status <= 499:
            r.fail(item, item_path, f"expected a 4xx status (5xx are always included), got {status}")
        elif status is not None:
            include.add(status)
    if len(r.problems) != before:
        raise _Invalid()
    return UpstreamErrorsPolicy(frozenset(include)) if mode == "envelope" else None


class UpstreamErrors:
    """Holds nothing: an enveloped page's bytes are dropped as they come (all but the excerpt)."""

    name = "upstream_errors"
    on_request = None
    on_finished = None

    def __init__(self, policy: UpstreamErrorsPolicy) -> None:
        self.include = policy.include

    def on_response_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        status = head.status
        if ctx.upstream_ms is None or ctx.error_code is not None:      # the gateway's own answer
            return
        if status < 500 and status not in self.include:
            return
        content_type = None
        kept = []
        for name, value in head.headers:
            if name == b"content-type":
                content_type = value
            elif name in _KEPT:
                kept.append((name, value))
        if is_json(content_type):
            return
        envelope = error_response(ctx, status, "UPSTREAM_ERROR", f"the upstream answered {status}", kept)
        head.headers = envelope.headers
        head.length = len(envelope.body)
        ctx.note("upstream_excerpt", "")
        ctx.set_state(self.name, [envelope.body, b""])

    def on_response_body(self, ctx: RequestContext, chunk: bytes, end: bool) -> bytes:
        held = ctx.get_state(self.name)
        if held is None:
            return chunk
        if len(held[1]) < EXCERPT and chunk:
            held[1] = (held[1] + chunk)[:EXCERPT]
            ctx.note("upstream_excerpt", held[1].decode("utf-8", "replace"))
        return held[0] if end else b""


def _build(resources: Any, policy: UpstreamErrorsPolicy, route: Any) -> UpstreamErrors:
    return UpstreamErrors(policy)


UPSTREAM_ERRORS = FilterKind(name="upstream_errors", build=_build, route_keys=("upstream_errors",),
                             parse_route=parse_route)
