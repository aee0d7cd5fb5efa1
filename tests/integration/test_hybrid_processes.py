"""`backend: hybrid` across two real gateway processes sharing one real Redis (issue 4).

Two `twistd -n txgateway --config FILE` daemons (as in test_lifecycle.py), one redis-server
(the `redis_server` fixture), one stdlib HTTP upstream in a thread, and an open-loop load of
LOAD req/s for SECONDS s from one tenant, split evenly over both gateways (asyncio, raw
keep-alive sockets, like `scenario_shared` in bench/limits.py). The limit is RATE/s with a
burst of BURST, one bucket per tenant, shared through Redis and synced every SYNC s.

What one exact bucket admits under a demand always above the rate, over a load lasting T s:

    ideal = BURST + RATE * T

README ("Shared limits") documents how far hybrid may exceed that: between two syncs each
instance refills its own copy of the bucket, so the instances together admit up to about
INSTANCES x RATE x SYNC more than the shared bucket allows; and when a burst starts, every
instance may spend what it saw left at its last sync (at most BURST), i.e. (INSTANCES - 1) x
BURST more than the one real budget. The excess is charged to Redis as debt and repaid by
admitting less afterwards, so it does not accumulate over a longer window. Hence:

    bound = ideal + INSTANCES * RATE * SYNC + (INSTANCES - 1) * BURST

The test asserts `admitted <= bound` and, so that a limiter which simply rejects too much
cannot pass, `admitted >= 0.85 * ideal`. `on_redis_error: deny` makes any moment where
Redis was not consulted visible (503s, `deny` in the access log) instead of silently
falling back to local limits. Run with -s to see the measured numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.conftest import free_port
from tests.integration.test_lifecycle import Daemon, assert_clean_shutdown
from tests.stdlib_upstream import QuietHandler, StdlibUpstream

HOST = "127.0.0.1"
RATE = 50                     # tokens per second (tier t: rate 50/second)
BURST = 50
SYNC = 0.1                    # rate_limits.sync_interval
INSTANCES = 2
LOAD = 400                    # req/s offered, over both gateways together
SECONDS = 4.0                 # how long the load lasts
CONNECTIONS = 8               # keep-alive client connections, alternating between the gateways
WAIT = 5.0                    # bound on any single network wait
LOAD_PATH = "/api/hybrid"
WARMUP_PATH = "/api/warmup"


# --- the upstream: stdlib, keep-alive, answers 200 at once ---------------------------------------

class _Ok(QuietHandler):
    def do_GET(self) -> None:
        self.answer(b"ok\n")


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    """A StdlibUpstream on a free port; its URL. Shut down on exit."""
    with StdlibUpstream(_Ok) as server:
        yield server.url


# --- the gateways ---------------------------------------------------------------------------------

def gateway_config(port: int, upstream_url: str, redis_url: str, access_log: Path) -> str:
    """The same config for every instance but the listen port (and where its access log goes)."""
    return f"""\
listen:
  - endpoint: "tcp:{port}:interface={HOST}"
access_log: "{access_log}"
drain_timeout: 2s
redis: {{url: "{redis_url}", timeout: 200ms}}
rate_limits:
  backend: hybrid
  sync_interval: {int(SYNC * 1000)}ms
  on_redis_error: deny
  tiers: {{t: {{rate: {RATE}/second, burst: {BURST}}}}}
upstreams:
  u: {{targets: ["{upstream_url}"], connect_timeout: 1s, timeout: 5s}}
routes:
  - {{prefix: /api, upstream: u, rate_limit: {{key: 'header:X-Tenant'}}}}
"""


def distinct_free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


# --- the client: open-loop load over raw keep-alive connections ----------------------------------

def request(path: str, tenant: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: api.test\r\nX-Tenant: {tenant}\r\n\r\n".encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server will close) of one Content-Length-framed response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            close = b"close" in value.lower()
        elif name == b"transfer-encoding":
            raise AssertionError(f"unexpected Transfer-Encoding (this client reads Content-Length only): {head!r}")
    if length is None:
        raise AssertionError(f"response without Content-Length: {head!r}")
    await reader.readexactly(length)
    return status, close


@dataclass
class Load:
    statuses: Counter[int] = field(default_factory=Counter)
    by_gateway: dict[int, Counter[int]] = field(default_factory=dict)
    sent_at: list[float] = field(default_factory=list)       # when each request went out
    admitted_at: list[float] = field(default_factory=list)   # when each 200 came back

    @property
    def sent(self) -> int:
        return len(self.sent_at)

    @property
    def span(self) -> float:
        """T: from the first request sent to the last."""
        return max(self.sent_at) - min(self.sent_at)


async def _connection(port: int, data: bytes, start: float, interval: float, until: float, load: Load) -> None:
    """One keep-alive connection sending `data` every `interval` s from `start` until `until`.

    Open loop: a late answer delays only this connection's next request, and the schedule does
    not slip (requests due meanwhile go out at once)."""
    counts = load.by_gateway.setdefault(port, Counter())
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), WAIT)
    try:
        at = start
        while at < until:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            load.sent_at.append(time.monotonic())
            writer.write(data)
            status, close = await asyncio.wait_for(read_response(reader), WAIT)
            load.statuses[status] += 1
            counts[status] += 1
            if status == 200:
                load.admitted_at.append(time.monotonic())
            if close:
                writer.close()
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), WAIT)
            at += interval
    finally:
        writer.close()


async def drive(ports: list[int], tenant: str) -> Load:
    """LOAD req/s for SECONDS s over CONNECTIONS connections, alternating between `ports`."""
    load = Load()
    interval = CONNECTIONS / LOAD          # per connection
    start = time.monotonic() + 0.3         # connections open first
    until = start + SECONDS
    data = request(LOAD_PATH, tenant)
    await asyncio.wait_for(asyncio.gather(*[
        _connection(ports[i % len(ports)], data, start + i / LOAD, interval, until, load)
        for i in range(CONNECTIONS)]), SECONDS + 2 * WAIT)
    return load


async def _one(port: int, tenant: str) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port), WAIT)
    try:
        writer.write(request(WARMUP_PATH, tenant))
        status, _ = await asyncio.wait_for(read_response(reader), WAIT)
        return status
    finally:
        writer.close()


def access_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


# --- the test -----------------------------------------------------------------------------------

def test_hybrid_across_two_processes_over_admits_within_the_documented_bound(redis_server, tmp_path):
    ports = distinct_free_ports(INSTANCES)
    tenant = f"tenant-{uuid.uuid4().hex[:12]}"          # a fresh, full bucket
    daemons: list[Daemon] = []
    logs: list[Path] = []
    with upstream() as upstream_url:
        try:
            for i, port in enumerate(ports):
                directory = tmp_path / f"gw{i}"
                directory.mkdir()
                logs.append(directory / "access.log")
                config = directory / "gateway.yaml"
                config.write_text(gateway_config(port, upstream_url, redis_server.url, logs[-1]))
                daemons.append(Daemon(directory, config))
            for daemon, port in zip(daemons, ports, strict=True):
                daemon.wait_for_port(port)

            # Each gateway proxies one request decided by Redis (a key it has not seen): Redis is
            # reachable from both and the upstream answers, before the clock starts.
            for i, port in enumerate(ports):
                status = asyncio.run(_one(port, f"warmup-{i}-{tenant}"))
                assert status == 200, (status, daemons[i].output)

            load = asyncio.run(drive(ports, tenant))

            for daemon in daemons:
                daemon.proc.send_signal(signal.SIGTERM)
            for daemon in daemons:
                assert_clean_shutdown(daemon, daemon.wait())
                assert "redis lost" not in daemon.output, daemon.output
        finally:
            for daemon in daemons:
                daemon.kill()

    admitted = load.statuses[200]
    rejected = load.statuses[429]
    span = load.span
    ideal = BURST + RATE * span
    excess_bound = INSTANCES * RATE * SYNC + (INSTANCES - 1) * BURST
    bound = ideal + excess_bound
    after = [t for t in load.admitted_at if t - min(load.sent_at) >= 1.5]  # once the onset has passed
    steady = len(after) / max(span - 1.5, 1e-9)
    print(f"\nhybrid, {INSTANCES} gateway processes, {RATE}/s burst {BURST}, sync {SYNC * 1000:.0f}ms: "
          f"sent {load.sent} in {span:.2f}s ({load.sent / span:.0f} req/s); admitted {admitted}, "
          f"rejected {rejected}; ideal {ideal:.1f} = {BURST} + {RATE} x {span:.2f}; "
          f"bound {bound:.1f} = ideal + {INSTANCES} x {RATE} x {SYNC} + {INSTANCES - 1} x {BURST}; "
          f"admitted/ideal {admitted / ideal:.3f}; after 1.5s {steady:.1f}/s; "
          f"per gateway {[dict(c) for c in load.by_gateway.values()]}")

    # The load was really offered (the client kept up with its schedule), and only the limiter spoke.
    assert load.sent >= 0.95 * LOAD * SECONDS, load.sent
    assert set(load.statuses) <= {200, 429}, load.statuses
    assert all(counts[200] > 0 and counts[429] > 0 for counts in load.by_gateway.values()), load.by_gateway

    assert admitted <= bound, (admitted, ideal, bound)
    assert admitted >= 0.85 * ideal, (admitted, ideal)

    # Each gateway's access log (flushed on SIGTERM) agrees with the client, request for request,
    # and every decision was a hybrid one (no `deny`, no `local:*` fallback).
    for port, path in zip(ports, logs, strict=True):
        records = [r for r in access_records(path) if r["path"] == LOAD_PATH]
        decisions = Counter((r["status"], r["rate_limit"]) for r in records)
        counts = load.by_gateway[port]
        assert decisions == Counter({(200, "allowed"): counts[200], (429, "rejected"): counts[429]}), (decisions, counts)
