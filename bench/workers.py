#!/usr/bin/env python3
"""--workers benchmark (entry point: bench/run.sh workers). Uses bench.py.

workers  wrk on GET /api/users/1 (bench.py's plain proxy config): the upstream directly, the
         gateway as one process (no --workers flag, what --workers 1 amounts to; pinned to
         GATEWAY_CPU as everywhere in the bench), and the gateway with --workers
         WORKER_COUNT (2) pinned to WORKERS_CPUS (default GATEWAY_CPU,CLIENT_CPU: both CPUs of
         a 2-CPU machine). req/s, p99, ratio to the one-process row, CPU of the whole process
         tree (parent + workers), and each worker's share of that CPU in every wrk run: the
         workers share one accept queue, and wrk opens all its connections at once and keeps
         them, so one worker may hold most of them for a whole run (the ratio then drops).

A second process only helps if it has a core to run on: pinned to GATEWAY_CPU alone, two
workers would share one core and the comparison would say nothing. Their second core is the
load generator's (CLIENT_CPU: wrk, the upstream nginx, this script), so one worker competes
with wrk and nginx for CPU 0: the ratio is what --workers 2 gains on this 2-CPU machine, not
what it gains with a core of its own per worker.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench
from bench import CLIENT_CPU, GATEWAY_CPU, TWISTD, Gateway, Upstream, log

WORKER_COUNT = int(bench._env("WORKER_COUNT", "2"))
WORKERS_CPUS = bench._env("WORKERS_CPUS", f"{GATEWAY_CPU},{CLIENT_CPU}")
WORKERS_PORT = int(bench._env("WORKERS_PORT", "19085"))


def children(pid: int) -> list[int]:
    out: set[int] = set()
    for name in glob.glob(f"/proc/{pid}/task/*/children"):
        try:
            with open(name) as f:
                out.update(int(x) for x in f.read().split())
        except OSError:
            pass
    return sorted(out)


_process_ticks = bench.proc_ticks
SNAPSHOTS: dict[int, list[dict[int, int]]] = {}     # parent pid -> {worker pid: ticks}, per call


def tree_ticks(pid: int) -> int:
    """CPU ticks of pid and its children: the --workers parent and its workers (bench.py
    counts the gateway's own process, which for --workers is the idle parent). wrk_run calls
    it before and after each run: the snapshots give each worker's share of every run."""
    ticks = {child: _process_ticks(child) for child in children(pid)}
    if ticks:
        SNAPSHOTS.setdefault(pid, []).append(ticks)
    return _process_ticks(pid) + sum(ticks.values())


def worker_shares(pid: int) -> list[list[int]]:
    """Per wrk run (warm-up first), each worker's % of the workers' CPU time in that run."""
    snaps = SNAPSHOTS.get(pid, [])
    out = []
    for before, after in zip(snaps[0::2], snaps[1::2], strict=False):
        used = {w: after[w] - before.get(w, 0) for w in after}
        total = sum(used.values()) or 1
        out.append([round(100 * used[w] / total) for w in sorted(used)])
    return out


class WorkersGateway(Gateway):
    """`twistd -n txgateway --config FILE --workers N`, the process tree pinned to `cpus`."""

    def __init__(self, name: str, upstream: Upstream, count: int, cpus: str, port: int) -> None:
        super().__init__(name, upstream, port=port)
        self.count = count
        self.cpus = cpus

    def start(self) -> None:
        with open(self.config, "w") as f:
            f.write(self.yaml.format(gw_port=self.port, up_port=self.upstream.port,
                                     access_log=json.dumps(self.access_log)))
        if bench.port_busy(self.port):
            raise SystemExit(f"port {self.port} is already in use (set WORKERS_PORT)")
        self.proc = bench.start([TWISTD, "-n", "--pidfile=", "txgateway", "--config", self.config,
                                 "--workers", str(self.count)], self.cpus, self.logfile)
        bench.wait_http(self.port, "/api/users/1", self.proc, self.logfile, "txgateway --workers")
        deadline = time.monotonic() + 30
        while self._log_text().count(f"starting on {self.port}") < self.count:
            if time.monotonic() > deadline or not self.alive():
                raise SystemExit(f"{self.count} workers not listening within 30s; log {self.logfile}:\n"
                                 + bench.tail(self.logfile))
            time.sleep(0.1)
        log(f"txgateway --workers {self.count}: parent pid {self.pid}, workers {self.workers()} on "
            f"127.0.0.1:{self.port} (CPUs {self.cpus}), config {self.config}, log {self.logfile}")

    def _log_text(self) -> str:
        try:
            with open(self.logfile, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def workers(self) -> list[int]:
        return children(self.pid)

    def rss_mib(self) -> float:
        return sum(bench.proc_status_kib(p, "VmRSS") for p in [self.pid, *self.workers()]) / 1024

    def hwm_mib(self) -> float:
        return sum(bench.proc_status_kib(p, "VmHWM") for p in [self.pid, *self.workers()]) / 1024

    def worker_cpu_seconds(self) -> dict[int, float]:
        return {pid: round(_process_ticks(pid) / bench.CLK_TCK, 2) for pid in self.workers()}


def scenario_workers(up: Upstream) -> dict:
    bench.proc_ticks = tree_ticks          # wrk_run's gateway CPU: the whole process tree
    multi = WorkersGateway(f"workers{WORKER_COUNT}", up, WORKER_COUNT, WORKERS_CPUS, WORKERS_PORT)
    rows = [("direct", None, f"http://127.0.0.1:{up.port}/users/1"),
            ("proxy", Gateway("proxy", up, port=bench.GATEWAY_PORT), None),
            (multi.name, multi, None)]
    for _, gw, _ in rows:
        if gw is not None:
            gw.start()
    try:
        pids_before = multi.workers()
        levels = bench.compare_rows(rows, up)
        worker_cpu = multi.worker_cpu_seconds()
        shares = worker_shares(multi.pid)
        restarted = sorted(set(multi.workers()) ^ set(pids_before))
        rss = {name: round(gw.rss_mib(), 1) for name, gw, _ in rows if gw is not None}
        problems = {name: gw.new_problems() for name, gw, _ in rows if gw is not None}
    finally:
        shutdown = {name: gw.stop() for name, gw, _ in rows if gw is not None}
    ratios = {c: level[multi.name].get("ratio_to_proxy") for c, level in levels.items()}
    log(f"  {multi.name}/proxy req/s: {ratios}; worker CPU seconds {worker_cpu}")
    return {"levels": levels, "ratio": ratios, "worker_cpu_seconds": worker_cpu, "worker_shares": shares,
            "workers_changed": restarted,
            "rss_mib": rss, "problems": problems, "shutdown": shutdown, "row": multi.name,
            "cpus": {"proxy": GATEWAY_CPU, multi.name: WORKERS_CPUS, "load": CLIENT_CPU}}


def report(summary: dict) -> str:
    out = [f"txgateway --workers bench {bench.STAMP} ({summary['env']['cpu']}; {summary['env']['commit']})"]
    if "workers" in summary:
        w = summary["workers"]
        name = w["row"]
        out += bench.rows_table("workers", w["levels"])
        out.append("")
        out.append(f"pinning: proxy (one process, no --workers) on CPU {w['cpus']['proxy']}; {name} (parent + "
                   f"{WORKER_COUNT} workers) on CPUs {w['cpus'][name]}; wrk, nginx and this script on CPU "
                   f"{w['cpus']['load']}, so one worker shares CPU {w['cpus']['load']} with the load generator.")
        for c, level in w["levels"].items():
            cpu = ", ".join(f"{row} {bench.fmt(s.get('gw_cpu_pct'))}%" for row, s in level.items() if row != "direct")
            out.append(f"{c:>5} conns: {name}/proxy req/s = {bench.fmt(w['ratio'][c], '.3f')}; gateway CPU "
                       f"(process tree): {cpu}")
        out.append(f"{name}: worker CPU seconds at the end {w['worker_cpu_seconds']}; workers restarted during the "
                   f"runs: {w['workers_changed'] or 'none'}; RSS MiB {w['rss_mib']}; shutdown {w['shutdown']}")
        out.append(f"{name}: each worker's share of the workers' CPU per wrk run (warm-up, then measured runs, "
                   f"levels in order): {' '.join('/'.join(map(str, run)) for run in w['worker_shares'])} %. wrk opens "
                   f"its connections at once and keeps them: whichever worker wakes first may accept most of them")
        for row, lines in w["problems"].items():
            if lines:
                out.append(f"!! {row}: {len(lines)} warning/error lines, first: {lines[0][:200]}")
    out.append(f"details: {bench.RUN_DIR}/")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    up = Upstream()
    return bench.run_scenarios("workers", argv, {"workers": lambda: scenario_workers(up)}, [up], report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
