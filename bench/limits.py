#!/usr/bin/env python3
"""Rate-limit benchmarks (entry point: bench/run.sh limits | shared). Uses bench.py's set-up.

limits  wrk on GET /api/users/1 with a JWT, in one run: the upstream directly, the plain
        proxy route, and JWT + a per-user rate limit that never rejects with each backend
        (local, redis, hybrid): req/s and p99 per level, ratios to the plain proxy.
shared  two gateway processes sharing one Redis and one limit (SHARED_RATE, default
        100/second, burst = the rate's count), under an open-loop load of SHARED_LOAD
        (1000) req/s for SHARED_SECONDS (10) s split evenly over both: how many requests each
        backend (redis, hybrid) admitted, against what the limit allows (burst + rate x time).

Redis: a redis-server of its own on REDIS_PORT (19379) on CLIENT_CPU, stopped at the end.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench
from bench import CLIENT_CPU, RUN_DIR, Gateway, Upstream, log

REDIS_PORT = int(bench._env("REDIS_PORT", "19379"))
SHARED_RATE = int(bench._env("SHARED_RATE", "100"))
SHARED_LOAD = int(bench._env("SHARED_LOAD", "1000"))
SHARED_SECONDS = float(bench._env("SHARED_SECONDS", "10"))
SYNC_INTERVAL = bench._env("SYNC_INTERVAL", "100ms")
SECRET = "bench-secret-0123456789abcdef0123456789"

LIMITED_YAML = """\
# txgateway config for bench/limits.py (generated; edit the template there): JWT (HS256) and
# a per-user rate limit that never rejects, with rate_limits.backend: {backend}.
listen:
  - endpoint: "tcp:{{gw_port}}:interface=127.0.0.1:backlog=4096"
trusted_proxies: [127.0.0.1/32]
access_log: {{access_log}}
drain_timeout: 2s
auth:
  jwt:
    algorithms: [HS256]
    secret_env: JWT_SECRET
{redis}rate_limits:
  backend: {backend}
{extra}  tiers:
    bench: {{{{rate: {rate}}}}}
upstreams:
  bench:
    targets: ["http://127.0.0.1:{{up_port}}"]
    timeout: 30s
routes:
  - prefix: /api/users
    upstream: bench
    rewrite_prefix: /users
    auth: required
    rate_limit: {{{{key: user}}}}
    request_headers: {{{{set: {{{{X-Api-Version: "2"}}}}}}}}
    response_headers: {{{{remove: [X-Upstream-Debug]}}}}
"""


def limited_yaml(backend: str, rate: str, access_log: bool = True) -> str:
    redis = f'redis: {{{{url: "redis://127.0.0.1:{REDIS_PORT}/0", timeout: 200ms}}}}\n' if backend != "local" else ""
    extra = f"  sync_interval: {SYNC_INTERVAL}\n" if backend == "hybrid" else ""
    text = LIMITED_YAML.format(backend=backend, redis=redis, extra=extra, rate=rate)
    return text if access_log else text.replace("access_log: {access_log}", "access_log: \"off\"")


def token(sub: str = "bench-user") -> str:
    import jwt
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 86400}, SECRET, algorithm="HS256")


class Redis:
    def __init__(self) -> None:
        self.proc = None
        self.dir = os.path.join(RUN_DIR, "redis")

    def start(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        if bench.port_busy(REDIS_PORT):
            raise SystemExit(f"port {REDIS_PORT} is already in use (set REDIS_PORT)")
        logfile = os.path.join(self.dir, "redis.log")
        self.proc = bench.start(["redis-server", "--port", str(REDIS_PORT), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", self.dir], CLIENT_CPU, logfile)
        deadline = time.monotonic() + 10
        while not bench.port_busy(REDIS_PORT):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise SystemExit("redis-server did not start:\n" + bench.tail(logfile))
            time.sleep(0.05)
        log(f"redis-server pid {self.proc.pid} on 127.0.0.1:{REDIS_PORT} (CPU {CLIENT_CPU})")

    def stop(self) -> None:
        if self.proc is not None:
            bench.stop(self.proc)
            self.proc = None


# --------------------------------------------------------------------------------------------
# limits: throughput and latency with each backend
# --------------------------------------------------------------------------------------------

def scenario_limits(up: Upstream) -> dict:
    auth = {"Authorization": f"Bearer {token()}"}
    env = {"JWT_SECRET": SECRET}
    rows = [("direct", None, f"http://127.0.0.1:{up.port}/users/1"),
            ("proxy", Gateway("proxy", up, port=19080), None)]
    for i, backend in enumerate(("local", "redis", "hybrid")):
        gw = Gateway(f"jwt-{backend}", up, limited_yaml(backend, "1000000000/minute"), 19081 + i, auth, env)
        rows.append((f"jwt+{backend}", gw, None))
    for _, gw, _ in rows:
        if gw is not None:
            gw.start()
    try:
        levels = bench.compare_rows(rows, up, {name: auth for name, _, _ in rows if name.startswith("jwt")})
    finally:
        shutdown = {name: gw.stop() for name, gw, _ in rows if gw is not None}
    return {"levels": levels, "shutdown": shutdown}


# --------------------------------------------------------------------------------------------
# shared: two instances, one limit
# --------------------------------------------------------------------------------------------

async def _connection(port: int, auth: str, interval: float, start: float, until: float,
                      admitted: list[float], counts: dict[int, int]) -> None:
    """One keep-alive connection sending a request every `interval` s (open loop: a late
    response delays only this connection's next request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"GET /api/users/1 HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {auth}\r\n\r\n").encode()
    at = start
    try:
        while at < until:
            delay = at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            counts[status] = counts.get(status, 0) + 1
            if status == 200:
                admitted.append(time.monotonic() - start)
            at += interval
    finally:
        writer.close()


async def _load(ports: list[int], auth: str) -> dict:
    per_conn_rate = 50.0
    conns = max(1, round(SHARED_LOAD / per_conn_rate))
    interval = conns / SHARED_LOAD
    start = time.monotonic() + 0.5
    until = start + SHARED_SECONDS
    admitted: list[float] = []
    counts: dict[int, int] = {}
    await asyncio.gather(*[
        _connection(ports[i % len(ports)], auth, interval, start + i * interval / conns, until, admitted, counts)
        for i in range(conns)])
    return {"admitted_times": admitted, "statuses": counts, "connections": conns}


def scenario_shared(up: Upstream) -> dict:
    out: dict = {"limit": f"{SHARED_RATE}/second (burst {SHARED_RATE})", "load_rps": SHARED_LOAD,
                 "seconds": SHARED_SECONDS, "backends": {}}
    env = {"JWT_SECRET": SECRET}
    for backend in ("redis", "hybrid"):
        gws = [Gateway(f"shared-{backend}-{i}", up, limited_yaml(backend, f"{SHARED_RATE}/second", access_log=False),
                       19090 + i, {"Authorization": f"Bearer {token('warmup')}"}, env) for i in range(2)]
        for gw in gws:
            gw.start()
        try:
            auth = token(f"shared-{backend}-{time.time()}")       # a fresh bucket
            result = asyncio.run(_load([gw.port for gw in gws], auth))
        finally:
            shutdown = [gw.stop() for gw in gws]
        times = result.pop("admitted_times")
        allowed = SHARED_RATE + SHARED_RATE * SHARED_SECONDS     # burst + rate x time
        steady = [t for t in times if t >= 2.0]                   # after the burst is spent
        steady_rate = len(steady) / (SHARED_SECONDS - 2.0)
        sent = sum(result["statuses"].values())
        out["backends"][backend] = {
            **result, "sent": sent, "admitted": len(times), "allowed_by_limit": allowed,
            "admitted_over_allowed": round(len(times) / allowed, 4),
            "steady_admitted_per_s": round(steady_rate, 1),
            "steady_over_rate": round(steady_rate / SHARED_RATE, 4),
            "shutdown": shutdown,
        }
        log(f"  shared {backend}: sent {sent} in {SHARED_SECONDS:g}s, admitted {len(times)} "
            f"(limit allows {allowed:.0f}: {len(times) / allowed:.3f}x), steady {steady_rate:.1f}/s "
            f"vs {SHARED_RATE}/s ({steady_rate / SHARED_RATE:.3f}x), statuses {result['statuses']}")
    return out


def report(summary: dict) -> str:
    out = [f"txgateway rate-limit bench {bench.STAMP} ({summary['env']['cpu']}; {summary['env']['commit']})"]
    if "limits" in summary:
        out += bench.rows_table("limits", summary["limits"]["levels"])
    if "shared" in summary:
        s = summary["shared"]
        out.append("")
        out.append(f"shared: 2 instances, one limit {s['limit']}, load {s['load_rps']} req/s for {s['seconds']:g} s")
        for backend, b in s["backends"].items():
            out.append(f"  {backend:<7} admitted {b['admitted']} of {b['sent']} (limit allows {b['allowed_by_limit']:.0f}: "
                       f"{b['admitted_over_allowed']:.3f}x); after the burst {b['steady_admitted_per_s']}/s "
                       f"({b['steady_over_rate']:.3f}x the rate); statuses {b['statuses']}")
    out.append(f"details: {RUN_DIR}/")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    up = Upstream()
    return bench.run_scenarios("limits", argv, {"limits": lambda: scenario_limits(up),
                                                "shared": lambda: scenario_shared(up)}, [up, Redis()], report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
