"""Weighted targets and a route's split through real sockets: real upstreams (the three
targets of test_balancing, each answering with its name), real clients, the gateway between."""

from __future__ import annotations

import json
import textwrap
from collections import Counter

import pytest_twisted

from tests.conftest import ISSUER, assert_envelope, mint_token, parse_responses, raw
from tests.integration.test_balancing import targets  # noqa: F401 (the fixture)
from txgateway.filters.split import bucket


def gets(paths_and_headers: list[tuple[str, str]]) -> bytes:
    """Pipelined GETs on one connection, the last closing it."""
    out = []
    for i, (path, headers) in enumerate(paths_and_headers):
        close = "Connection: close\r\n" if i == len(paths_and_headers) - 1 else ""
        out.append(f"GET {path} HTTP/1.1\r\nHost: a\r\n{headers}{close}\r\n")
    return "".join(out).encode()


def served_by(data: bytes) -> list[str]:
    responses = parse_responses(data)
    assert all(r.status == 200 for r in responses), [(r.status, r.body) for r in responses]
    return [json.loads(r.body)["target"] for r in responses]


async def serve(port: int, requests: list[tuple[str, str]]) -> list[str]:
    """Which target served each request, sent pipelined 16 at a time (the gateway queues 16)."""
    out = []
    for i in range(0, len(requests), 16):
        out += served_by(await raw(port, gets(requests[i:i + 16])))
    return out


def split_config(a, b, split: str, top: str = "") -> str:
    return top + textwrap.dedent(f"""
    upstreams:
      stable: {{targets: ["{a.url}"]}}
      canary: {{targets: ["{b.url}"]}}
    routes:
      - prefix: /api/orders
        upstream: stable
        split: {split}
      - {{prefix: /api/other, upstream: stable}}
    """)


@pytest_twisted.ensureDeferred
async def test_a_split_by_count_sends_exactly_its_share_and_the_header_chooses(reactor, targets, gateway):  # noqa: F811
    a, b, _ = targets
    gw = await gateway(split_config(a, b, "{upstream: canary, percent: 25, header: X-Canary}"))
    sides = await serve(gw.port, [(f"/api/orders/{i}", "") for i in range(200)])
    assert Counter(sides) == {"a": 150, "b": 50}
    assert sides[:8] == ["a", "a", "a", "b", "a", "a", "a", "b"]            # spread out, one in four
    chosen = served_by(await raw(gw.port, gets([("/api/orders/x", "X-Canary: 1\r\n")] * 5
                                               + [("/api/orders/y", "X-Canary: 0\r\n")] * 5)))
    assert chosen == ["b"] * 5 + ["a"] * 5
    assert served_by(await raw(gw.port, gets([("/api/other/1", "X-Canary: 1\r\n")]))) == ["a"]   # no split there
    assert [x["upstream"] for x in gw.log[-11:-1]] == ["canary"] * 5 + ["stable"] * 5


@pytest_twisted.ensureDeferred
async def test_a_sticky_split_keeps_each_user_on_one_side_and_holds_the_share(reactor, targets, gateway,  # noqa: F811
                                                                              secret_file):
    a, b, _ = targets
    auth = (f"auth:\n  jwt:\n    algorithms: [HS256]\n    secret_file: {secret_file}\n"
            f"    issuer: {ISSUER}\n    audience: api\n")
    gw = await gateway(split_config(a, b, "{upstream: canary, percent: 20, sticky: user}", top=auth).replace(
        "split:", "auth: required\n    split:"))
    users = [f"user-{i}" for i in range(400)]
    tokens = {u: mint_token(sub=u) for u in users}
    batch = [(f"/api/orders/{u}", f"Authorization: Bearer {tokens[u]}\r\n") for u in users]
    first = await serve(gw.port, batch)
    second = await serve(gw.port, batch)
    assert first == second                                         # the same user, the same side
    # The side is the user's hash, the same in any process: about 20% (86 of these 400).
    assert first == ["b" if bucket("user:" + u) < 2000 else "a" for u in users]
    assert abs(first.count("b") / 400 - 0.2) < 0.03
    (r,) = parse_responses(await raw(gw.port, gets([("/api/orders/anon", "")])))
    assert_envelope(r, 401, "UNAUTHORIZED")                        # auth before the split


@pytest_twisted.ensureDeferred
async def test_weighted_targets_share_requests_by_weight(reactor, targets, gateway):  # noqa: F811
    a, b, c = targets
    gw = await gateway(f"""
    upstreams:
      users:
        targets:
          - {{url: "{a.url}", weight: 3}}
          - {{url: "{b.url}", weight: 1}}
          - "{c.url}"
    routes:
      - {{prefix: /api/users, upstream: users}}
    """)
    sides = await serve(gw.port, [(f"/api/users/{i}", "") for i in range(100)])
    assert Counter(sides) == {"a": 60, "b": 20, "c": 20}
    assert sides[:5] == ["a", "b", "a", "c", "a"]                  # smooth: a's turns spread out
