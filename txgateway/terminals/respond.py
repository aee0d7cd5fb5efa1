"""The local-answer terminal: `respond: {status, body, headers}` answers from the gateway.

For mocks, maintenance pages and redirects: the route's filters run as for any route (auth,
limits, header rules), then the gateway answers itself and no upstream is involved.

    - prefix: /old-docs
      respond: {status: 308, headers: {Location: "https://docs.example.com/"}}
    - prefix: /api/v0
      respond: {status: 410, body: {error: "v0 is gone; use /api/v1"}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import Scope, TerminalKind
from txgateway.config.reader import Reader, _Invalid
from txgateway.filters.headerconfig import header_name, header_value

__all__ = ["RESPOND", "LocalAnswer", "LocalAnswerSettings"]

_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"upgrade", b"te",
                      b"trailer"})


@dataclass(frozen=True)
class LocalAnswerSettings:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()


class LocalAnswer:
    """The terminal of a `respond:` route: the same answer to every request it lets through."""

    def __init__(self, settings: LocalAnswerSettings) -> None:
        self.settings = settings

    def forward(self, ctx: Any) -> Any:
        from txgateway.core.pipeline import LocalResponse
        s = self.settings
        return LocalResponse(s.status, list(s.headers), s.body)

    def cancel(self, ctx: Any) -> None:
        pass        # nothing in flight: the answer is given at once


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> LocalAnswerSettings:
    path = f"{path}.respond"
    f = r.mapping(fields["respond"], path, {"status": "", "body": "", "headers": ""})
    before = len(r.problems)
    status = r.attempt(lambda: r.integer(f["status"], f"{path}.status", 200), 200) if "status" in f else 200
    if not 200 <= status <= 599:
        r.fail(f["status"], f"{path}.status", f"expected a status from 200 to 599, got {status}")
    headers: list[tuple[bytes, bytes]] = []
    if "headers" in f:
        no_headers: list[tuple[str, yaml.Node, yaml.Node]] = []
        for name, key_node, value_node in r.attempt(lambda: r.free_mapping(f["headers"], f"{path}.headers"), no_headers):
            header = r.attempt(lambda: header_name(r, key_node, f"{path}.headers.{name}"), None)
            value = r.attempt(lambda: header_value(r, value_node, f"{path}.headers.{name}"), None)
            if header is None or value is None:
                continue
            if header.lower() in _FRAMING:
                r.fail(key_node, f"{path}.headers.{name}", "framing headers are the gateway's to set")
                continue
            headers.append((header.lower(), value))
    body = b""
    if "body" in f:
        node = f["body"]
        if isinstance(node, yaml.ScalarNode):
            body = r.attempt(lambda: r.string(node, f"{path}.body"), "").encode()
            default_type = b"text/plain; charset=utf-8"
        else:   # a mapping or a list: sent as JSON
            body = json.dumps(yaml.safe_load(yaml.serialize(node))).encode()
            default_type = b"application/json"
        if not any(name == b"content-type" for name, _ in headers):
            headers.append((b"content-type", default_type))
    if status in (204, 304) and body:
        r.fail(f["body"], f"{path}.body", f"a {status} answer has no body")
    if len(r.problems) != before:
        raise _Invalid()
    return LocalAnswerSettings(status, body, tuple(headers))


RESPOND = TerminalKind(name="respond", route_key="respond", parse_route=_parse_route,
                       build=lambda resources, config: None, make=lambda _, settings, route: LocalAnswer(settings))
