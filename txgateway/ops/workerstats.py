"""--workers: every worker's counters in a file, so that worker 0's /metrics and /status count them all.

The --workers parent makes a private directory (its path in TXGATEWAY_WORKERS_STATE) where
each worker replaces `worker-I.json` every second with its counters (`Stats.snapshot`) and
what it reports as it is now (`gauges`, its breakers and targets). Worker 0, which runs the
admin listener, adds its peers' files to its own live counters on each scrape.

Why files rather than prometheus_client's multiprocess mode: that mode needs a
prometheus_client metric updated per request (a lock and an mmap write per label set, several
microseconds), where the request path here only bumps dicts; and it keeps a file per PID,
which piles up as workers restart. Why not the parent asking each worker over a pipe at scrape
time: the totals would then live in processes that die; a worker that starts again here first
reads its own last file and counts on from there, and worker 0 writes its own file before it
answers a scrape, so no total a scrape showed ever goes backwards (Prometheus would read a drop
as a counter reset), even when a worker is killed. The cost: a peer's counts reach
/metrics up to a second late, which a 15-second scrape interval does not notice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from twisted.logger import Logger

from txgateway.core.periodic import Periodic
from txgateway.ops.stats import Stats, gauges

__all__ = ["STATE_DIR", "WorkerStats"]

STATE_DIR = "TXGATEWAY_WORKERS_STATE"   # in a worker's environment: where the workers' files are
INTERVAL = 1.0
_log = Logger(namespace="txgateway.ops.workerstats")


class WorkerStats:
    """One worker's side: writes its file, restores from it, and (in worker 0) reads the others'."""

    def __init__(self, directory: str, index: int, gateway: Any) -> None:
        self.directory = directory
        self.index = index
        self.gateway = gateway
        self._writer = Periodic(gateway.clock, INTERVAL, self.write)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], index: int, gateway: Any) -> WorkerStats | None:
        directory = environ.get(STATE_DIR)
        return cls(directory, index, gateway) if directory else None

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"worker-{index}.json")

    def restore(self) -> None:
        """Count on from this worker's previous life, if it had one."""
        previous = _read(self._path(self.index))
        if previous is not None:
            self.gateway.stats.add(previous["counters"])

    def start(self) -> None:
        self._writer.start()

    def stop(self) -> None:
        self._writer.stop()
        self.write()

    def write(self) -> None:
        path = self._path(self.index)
        data = {"worker": self.index, "pid": os.getpid(), "counters": self.gateway.stats.snapshot(),
                "gauges": gauges(self.gateway), "status": _status(self.gateway)}
        try:
            with open(path + ".tmp", "w", encoding="utf-8") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(path + ".tmp", path)      # a reader sees the old file or the new one, whole
        except OSError as e:
            _log.warn("cannot write the worker's counters to {path}: {e}", path=path, e=e)

    def peers(self) -> list[dict[str, Any]]:
        """The other workers' last files, by worker number."""
        out = []
        for name in sorted(os.listdir(self.directory)):
            if name.startswith("worker-") and name.endswith(".json") and name != f"worker-{self.index}.json":
                data = _read(os.path.join(self.directory, name))
                if data is not None:
                    out.append(data)
        return sorted(out, key=lambda d: d["worker"])

    def view(self) -> tuple[Stats, list[tuple[str | None, dict[str, Any]]], list[dict[str, Any]]]:
        """(counters of every worker summed, [(worker, gauges)], [each worker's status part]).

        This worker's own file is written first: a count a scrape shows is one a restart of
        this worker, even after SIGKILL, counts on from, so no later scrape shows less."""
        self.write()
        mine = self.gateway.stats
        total = Stats(self.gateway.clock)
        total.started_at = mine.started_at
        total.add(mine.snapshot())
        processes: list[tuple[str | None, dict[str, Any]]] = [(str(self.index), gauges(self.gateway))]
        statuses = [{"worker": self.index, "pid": os.getpid(), **_status(self.gateway)}]
        for peer in self.peers():
            total.add(peer["counters"])
            processes.append((str(peer["worker"]), peer["gauges"]))
            statuses.append({"worker": peer["worker"], "pid": peer["pid"], **peer["status"]})
        return total, processes, statuses


def _status(gateway: Any) -> dict[str, Any]:
    """The per-process part of /status: requests in flight, breakers and targets."""
    return {"in_flight": gateway.stats.in_flight,
            "upstreams": {name: {"breaker": group.breaker.snapshot() if group.breaker is not None else None,
                                 "targets": group.balancer.snapshot()}
                          for name, group in gateway.proxy.groups.items()}}


def _read(path: str) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
            return data
    except (OSError, ValueError):
        return None


def whole_gateway(gateway: Any) -> tuple[Stats, list[tuple[str | None, dict[str, Any]]], list[dict[str, Any]] | None]:
    """What /metrics and /status report: this process alone, or with --workers every worker
    (counters summed; gauges and status parts per worker)."""
    shared: WorkerStats | None = gateway.worker_stats
    if shared is None:
        return gateway.stats, [(None, gauges(gateway))], None
    return shared.view()
