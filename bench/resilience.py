#!/usr/bin/env python3
"""Upstream resilience benchmarks (entry point: bench/run.sh balance | failover). Uses bench.py.

balance   wrk on GET /api/users/1: the upstream directly, the plain proxy route (one
          target), and a route over two targets with everything on: circuit breaker,
          least_request, retries: 1, passive health, active health checks. req/s and p99
          per level, ratio to the plain proxy.
failover  the resilient route under wrk (FAILOVER_CONNS, 32) for FAILOVER_SECONDS (10) s;
          one of the two targets is killed (SIGKILL, nginx master and worker) at
          FAILOVER_KILL_AT (3) s. Reports the requests that failed (non-2xx and socket
          errors from wrk, statuses from the access log, by second).
"""

from __future__ import annotations

import calendar
import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench
from bench import CLIENT_CPU, LUA, RUN_DIR, Gateway, Upstream, log

SECOND_PORT = int(bench._env("SECOND_UPSTREAM_PORT", "19002"))
FAILOVER_SECONDS = int(bench._env("FAILOVER_SECONDS", "10"))
FAILOVER_KILL_AT = float(bench._env("FAILOVER_KILL_AT", "3"))
FAILOVER_CONNS = int(bench._env("FAILOVER_CONNS", "32"))

RESILIENT_YAML = """\
# txgateway config for bench/resilience.py (generated; edit the template there): one route
# over two targets with the breaker, least_request, retries, passive and active health on.
listen:
  - endpoint: "tcp:{{gw_port}}:interface=127.0.0.1:backlog=4096"
trusted_proxies: [127.0.0.1/32]
access_log: {{access_log}}
drain_timeout: 2s
upstreams:
  bench:
    targets: ["http://127.0.0.1:{{up_port}}", "http://127.0.0.1:{second}"]
    balance: least_request
    timeout: 30s
    connect_timeout: 1s
    retries: 1
    circuit_breaker:
      consecutive_failures: 5
      failure_ratio: 0.5
      window: 10s
      min_requests: 20
      open_for: 30s
      max_open_for: 5m
      half_open_requests: 1
    passive_health: {{{{consecutive_failures: 3, eject_for: 10s}}}}
    health_check: {{{{path: /users/1, interval: 1s, timeout: 500ms}}}}
routes:
  - prefix: /api/users
    upstream: bench
    rewrite_prefix: /users
    request_headers: {{{{set: {{{{X-Api-Version: "2"}}}}}}}}
    response_headers: {{{{remove: [X-Upstream-Debug]}}}}
"""


def resilient_yaml() -> str:
    return RESILIENT_YAML.format(second=SECOND_PORT)


def scenario_balance(up: Upstream, second: Upstream) -> dict:
    rows = [("direct", None, f"http://127.0.0.1:{up.port}/users/1"),
            ("proxy", Gateway("proxy", up, port=19080), None),
            ("resilient", Gateway("resilient", up, resilient_yaml(), 19083), None)]
    for _, gw, _ in rows:
        if gw is not None:
            gw.start()
    try:
        levels = bench.compare_rows(rows, up)
        second_status = second.status()
    finally:
        shutdown = {name: gw.stop() for name, gw, _ in rows if gw is not None}
    return {"levels": levels, "shutdown": shutdown, "second_target_requests": second_status}


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the nginx master and its worker (bench.start gives each its own session)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(5)
    if proc in bench.STARTED:
        bench.STARTED.remove(proc)


def scenario_failover(up: Upstream, second: Upstream) -> dict:
    gw = Gateway("failover", up, resilient_yaml(), 19084)
    gw.start()
    try:
        os.truncate(gw.access_log, 0)
    except OSError:
        pass
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t", "1", "-c", str(FAILOVER_CONNS), "-d", f"{FAILOVER_SECONDS}s",
           "--latency", "-s", LUA, f"http://127.0.0.1:{gw.port}/api/users/1"]
    killed_at: list[float] = []

    def kill_later(start: float) -> None:
        time.sleep(max(0.0, start + FAILOVER_KILL_AT - time.monotonic()))
        assert second.proc is not None
        kill_group(second.proc)
        second.proc = None
        killed_at.append(time.time())
        log(f"  killed the second target (port {second.port}) at {FAILOVER_KILL_AT:g}s")

    start = time.monotonic()
    started_wall = time.time()
    killer = threading.Thread(target=kill_later, args=(start,), daemon=True)
    killer.start()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FAILOVER_SECONDS + 60)
    killer.join()
    time.sleep(1.0)        # the access log flushes
    with open(os.path.join(RUN_DIR, "wrk-failover.txt"), "w") as f:
        f.write(p.stdout + p.stderr)
    m = re.search(r"^WRKJSON (.*)$", p.stdout, re.M)
    w = json.loads(m.group(1)) if m else {}
    by_second: dict[int, collections.Counter] = collections.defaultdict(collections.Counter)
    details: collections.Counter = collections.Counter()
    for entry in bench.access_log_lines(gw.access_log):
        stamp = entry.get("time")
        if not stamp:
            continue
        wall = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + float("0." + stamp[20:23])
        by_second[int(wall - started_wall)][entry.get("status")] += 1
        if entry.get("detail"):
            details[entry["detail"].split(":")[0]] += 1
    problems = gw.new_problems()
    shutdown = gw.stop()
    requests = w.get("requests", 0)
    errors = {k[4:]: v for k, v in w.items() if k.startswith("err_")}
    failed = sum(errors.values())
    result = {
        "requests": requests, "wrk_errors": errors, "failed": failed,
        "failed_pct": round(100.0 * failed / requests, 4) if requests else None,
        "p99_ms": w.get("p99_us", 0) / 1000, "rps": round(requests / (w.get("duration_us", 1) / 1e6), 1),
        "statuses_by_second": {s: dict(c) for s, c in sorted(by_second.items())},
        "access_log_details": dict(details), "kill_at_s": FAILOVER_KILL_AT, "shutdown": shutdown,
        "log_lines": [line for line in problems if "ejected" in line or "breaker" in line or "retry" in line][:20],
    }
    log(f"  failover: {requests} requests, {failed} failed ({result['failed_pct']}%), wrk errors {errors}")
    return result


def report(summary: dict) -> str:
    out = [f"txgateway resilience bench {bench.STAMP} ({summary['env']['cpu']}; {summary['env']['commit']})"]
    if "balance" in summary:
        out += bench.rows_table("balance", summary["balance"]["levels"])
    if "failover" in summary:
        f = summary["failover"]
        out.append("")
        out.append(f"failover: 2 targets, one SIGKILLed at {f['kill_at_s']:g}s of a {FAILOVER_SECONDS}s wrk run "
                   f"(c={FAILOVER_CONNS}): {f['requests']} requests, {f['failed']} failed ({f['failed_pct']}%), "
                   f"{f['rps']:,.0f} req/s, p99 {f['p99_ms']:.2f} ms")
        out.append(f"  wrk errors {f['wrk_errors']}; access log by second: {f['statuses_by_second']}")
        out.append(f"  access-log details: {f['access_log_details']}")
    out.append(f"details: {RUN_DIR}/")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    up, second = Upstream(), Upstream(SECOND_PORT, "nginx-second")
    return bench.run_scenarios("resilience", argv, {"balance": lambda: scenario_balance(up, second),
                                                    "failover": lambda: scenario_failover(up, second)},
                               [up, second], report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
