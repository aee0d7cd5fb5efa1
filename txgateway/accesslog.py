"""The access log: one JSON object per request, through twisted.logger, buffered.

Events go through a `twisted.logger.Logger` whose observer writes JSON lines to stdout or
a file and flushes on a timer, so a busy gateway does one write per interval instead of one
per request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from twisted.internet.task import LoopingCall
from twisted.logger import LogLevel

__all__ = ["AccessLog", "JsonLinesWriter"]


class JsonLinesWriter:
    """A log observer that writes each event's `access` record as one JSON line."""

    def __init__(self, stream: IO[str], clock: Any, flush_interval: float = 0.5) -> None:
        self.stream = stream
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._interval = flush_interval
        self._dumps = json.JSONEncoder(separators=(",", ":"), default=str).encode

    @classmethod
    def open(cls, destination: str, clock: Any) -> JsonLinesWriter | None:
        """`-` is stdout, `off` disables the log, anything else is a file appended to."""
        if destination == "off":
            return None
        if destination == "-":
            return cls(sys.stdout, clock)
        return cls(open(destination, "a", encoding="utf-8", buffering=1 << 16), clock)

    def __call__(self, event: dict[str, Any]) -> None:
        record = event.get("access")
        if record is not None:
            self.stream.write(self._dumps(record) + "\n")

    def start(self) -> None:
        if not self._flusher.running:
            self._flusher.start(self._interval, now=False)

    def stop(self) -> None:
        if self._flusher.running:
            self._flusher.stop()
        self.flush()

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass


class AccessLog:
    """Turns a finished RequestContext into the SPEC's access-log record.

    Each record is a twisted.logger event (namespace `txgateway.access`, level info, the
    record under `access`) handed straight to the observer: `Logger.emit`'s generic checks
    cost more than the rest of the log line at tens of thousands of requests per second.
    """

    namespace = "txgateway.access"

    def __init__(self, observer: Any | None) -> None:
        self.observer = observer
        self._second = -1
        self._stamp = ""

    def _timestamp(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._stamp}.{int((wall - second) * 1000):03d}Z"

    def record(self, ctx: Any, now: float) -> None:
        if self.observer is None:
            return
        route = ctx.route
        notes = ctx.notes
        wall = time.time()
        self.observer({"log_namespace": self.namespace, "log_level": LogLevel.info, "log_time": wall,
                       "log_format": None, "access": {
            "time": self._timestamp(wall),
            "correlation_id": ctx.correlation_id,
            "client_ip": ctx.client_ip,
            "method": ctx.method.decode("latin-1"),
            "path": ctx.path.decode("latin-1"),
            "route": route.prefix if route is not None else None,
            "upstream": ctx.upstream,
            "target": ctx.target_url,
            "status": ctx.status,
            "duration_ms": round((now - ctx.start) * 1000.0, 3),
            "upstream_ms": round(ctx.upstream_ms, 3) if ctx.upstream_ms is not None else None,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "user_id": None,
            "rate_limit": None,
            "breaker": None,
            "error": ctx.error_code,
            "detail": notes.get("upstream_error") if notes else None,
        }})
