"""A request the transport rejects after it entered the pipeline (its body is being relayed) is
counted started once: in_flight returns to 0 and the gateway is not busy, so a drain does not
wait drain_timeout for a request that no longer exists.

The upstream reads and never answers. The body comes in one write (rejected while the request
waits for its upstream connection) or after the head (rejected while the body is relayed).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import deferLater

from tests.conftest import assert_envelope, parse_responses, raw

WAIT = 5.0

HEAD = b"POST /api/x HTTP/1.1\r\nHost: api.test\r\nTransfer-Encoding: chunked\r\n\r\n"
TOO_LARGE = HEAD + b"800\r\n" + b"a" * 0x800 + b"\r\n0\r\n\r\n"          # 2 KiB chunk, limit 1 KiB
MALFORMED = HEAD + b"5\r\nhello\r\nZZZ\r\n"                              # "ZZZ" is no chunk size


def silent(server: Any, data: bytes) -> None:
    """Reads everything, answers nothing."""


async def settled(reactor: Any, gw: Any) -> None:
    """Wait (bounded) until no request is in flight; the assertions below say what is left."""
    deadline = time.monotonic() + WAIT
    while gw.gateway.stats.in_flight and time.monotonic() < deadline:
        await deferLater(reactor, 0.02, lambda: None)


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "head-then-body"])
@pytest_twisted.ensureDeferred
async def test_rejected_chunked_bodies_leave_nothing_in_flight(reactor, raw_upstream, gateway, split):
    up = await raw_upstream(silent)
    gw = await gateway(f"""
        limits: {{max_body_size: 1KiB}}
        upstreams:
          u: {{targets: ["{up.url}"], connect_timeout: 2s, timeout: 30s}}
        routes:
          - {{prefix: /api, upstream: u}}
        """)
    stats = gw.gateway.stats
    for payload, status, code in ((TOO_LARGE, 413, "PAYLOAD_TOO_LARGE"), (MALFORMED, 400, "BAD_REQUEST")):
        finished = stats.finished
        pieces = [HEAD, payload[len(HEAD):]] if split else payload
        (resp,) = parse_responses(await raw(gw.port, pieces, read_timeout=WAIT, pause=0.2 if split else 0.0))
        assert_envelope(resp, status, code)
        await settled(reactor, gw)
        assert stats.finished == finished + 1
        assert stats.in_flight == 0, (status, stats.started, stats.finished)
        assert not gw.gateway._busy()
    if split:
        assert up.requests, "the request had reached the upstream when the transport rejected it"
    assert stats.started == stats.finished == 2
