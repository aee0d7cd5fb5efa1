"""Traffic split: a route sends a share of its requests to a second upstream (a canary).

    split: {upstream: orders-v2, percent: 5, sticky: user, header: X-Canary}

The share is `percent` of the route's requests. Without `sticky` it is exact: a counter
sends request n to the other upstream when floor(n * share) steps up, so any run of 10 000
requests holds the share to the request. With `sticky: user` (the identity's user id, else
the client address) or `sticky: client_ip`, a hash of that key picks the side, so one user
always lands on the same side while the share holds over many users. `header` lets a client
(a tester) choose: `1` the other upstream, `0` the route's own; any other value is ignored.
It runs after auth and the rate limit, so the user id is known and both sides share limits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import yaml

from txgateway.config.contract import FilterKind, Resources, Scope
from txgateway.config.reader import Reader, _Invalid
from txgateway.core.pipeline import RequestContext
from txgateway.core.route import Route
from txgateway.filters.headerconfig import header_name
from txgateway.upstream.config import upstream_name

__all__ = ["SPLIT", "Split", "SplitFilter"]

_SCALE = 10_000          # shares in hundredths of a percent


@dataclass(frozen=True)
class Split:
    upstream: str                  # the other upstream
    share: int                     # of _SCALE requests (percent * 100)
    sticky: str | None = None      # "user" | "client_ip" | None (exact share by count)
    header: bytes | None = None    # lower-case name of the header that chooses


def bucket(key: str) -> int:
    """A stable place in [0, _SCALE) for a user id or address (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % _SCALE


class SplitFilter:
    """One route's split: sets `ctx.upstream` to the other upstream for its share."""

    name = "split"
    on_response_head = None
    on_response_body = None
    on_finished = None

    def __init__(self, policy: Split) -> None:
        self.other = policy.upstream
        self.share = policy.share
        self.sticky = policy.sticky
        self.header = policy.header
        self.count = 0             # requests decided by count (no sticky key)

    def on_request(self, ctx: RequestContext) -> None:
        if self.header is not None:
            chosen = ctx.header(self.header)
            if chosen == b"1":
                ctx.upstream = self.other
                return
            if chosen == b"0":
                return
        if self.goes_other(ctx):
            ctx.upstream = self.other

    def goes_other(self, ctx: RequestContext) -> bool:
        sticky = self.sticky
        if sticky is None:
            before = self.count
            self.count = before + 1
            return (before + 1) * self.share // _SCALE > before * self.share // _SCALE
        identity = ctx.identity
        key = ("user:" + identity.user_id) if sticky == "user" and identity is not None else "ip:" + ctx.client_ip
        return bucket(key) < self.share


def _parse_route(r: Reader, fields: dict[str, yaml.Node], path: str, scope: Scope) -> Split | None:
    if "split" not in fields:
        return None
    node = fields["split"]
    path = f"{path}.split"
    f = r.mapping(node, path, {"upstream": "", "percent": "", "sticky": "", "header": ""})
    before = len(r.problems)
    r.require(node, f, path, ("upstream", "percent"))
    upstream = r.attempt(lambda: upstream_name(r, f["upstream"], f"{path}.upstream", scope), None) \
        if "upstream" in f else None
    percent = r.attempt(lambda: r.number(f["percent"], f"{path}.percent", 0, 100), None) if "percent" in f else None
    sticky = r.attempt(lambda: r.choice(f["sticky"], f"{path}.sticky", ("user", "client_ip")), None) \
        if "sticky" in f else None
    header = r.attempt(lambda: header_name(r, f["header"], f"{path}.header", from_clients=True).lower(), None) if "header" in f else None
    if len(r.problems) != before or upstream is None or percent is None or upstream not in scope.upstreams:
        raise _Invalid()
    return Split(upstream, round(percent * 100), sticky, header)


def _check_routes(r: Reader, routes: list[tuple[str, yaml.Node, Any]]) -> None:
    """A split needs a route that proxies (it picks between two upstreams)."""
    for path, node, _ in routes:
        if isinstance(node, yaml.MappingNode) and not any(
                isinstance(k, yaml.ScalarNode) and k.value == "upstream" for k, _ in node.value):
            r.fail(node, f"{path}.split", "splits between upstreams: the route needs upstream:")


def _build(resources: Resources, policy: Split, route: Route) -> SplitFilter:
    return SplitFilter(policy)


SPLIT = FilterKind(name="split", build=_build, route_keys=("split",), parse_route=_parse_route,
                   check_routes=_check_routes)
