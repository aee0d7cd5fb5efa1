"""The access log: one JSON object per request, through twisted.logger, buffered.

Events go through a `twisted.logger.Logger` whose observer writes JSON lines to stdout or
a file and flushes on a timer, so a busy gateway does one write per interval instead of one
per request. A file is reopened on request (`reopen`: SIGUSR1 and SIGHUP), so that logrotate
can move it away and the next line starts the new file.
"""

from __future__ import annotations

import json
import time
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
from typing import Any, Protocol

from twisted.logger import LogLevel

from txgateway.core.periodic import Periodic

__all__ = ["AccessLog", "JsonLinesWriter", "TextStream"]


class TextStream(Protocol):
    """Where JSON lines go: a text file, stdout, or a twisted.logger LoggingFile."""

    def write(self, text: str, /) -> Any: ...
    def flush(self) -> Any: ...
    def close(self) -> Any: ...


class JsonLinesWriter:
    """A log observer that writes each event's `access` record as one JSON line."""

    def __init__(self, stream: TextStream, clock: Any, flush_interval: float = 0.5, path: str | None = None) -> None:
        self.stream = stream
        self.path = path                  # the file `reopen` opens again; None: not a file
        self._flusher = Periodic(clock, flush_interval, self.flush)

    @classmethod
    def open(cls, destination: str, clock: Any, stdout: TextStream) -> JsonLinesWriter | None:
        """`-` is `stdout`, `off` disables the log, anything else is a file appended to."""
        if destination == "off":
            return None
        if destination == "-":
            return cls(stdout, clock)
        return cls(_append(destination), clock, path=destination)

    def __call__(self, event: dict[str, Any]) -> None:
        record = event.get("access")
        if record is not None:
            self.stream.write(record.json_line())

    def start(self) -> None:
        self._flusher.start()

    def stop(self) -> None:
        self._flusher.stop()
        self.flush()

    def flush(self) -> None:
        try:
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def reopen(self) -> None:
        """Continue in a file opened again at `path` (created if logrotate moved the old one
        away), after writing out what the old one still buffers. Raises OSError, and keeps
        writing to the old file, when `path` cannot be opened."""
        if self.path is None:
            return
        stream = _append(self.path)
        old, self.stream = self.stream, stream
        try:
            old.close()
        except (OSError, ValueError):
            pass


def _append(path: str) -> TextStream:
    return open(path, "a", encoding="utf-8", buffering=1 << 16)


_FIELDS = ("time", "correlation_id", "client_ip", "method", "path", "route", "upstream", "target",
           "status", "duration_ms", "upstream_ms", "bytes_in", "bytes_out", "user_id", "rate_limit",
           "breaker", "error", "detail", "tls")
# correlation_id (validated charset or a UUID) and method (an llhttp-validated token) need
# no escaping; every other string is escaped.
_LINE = ('{"time":"%s","correlation_id":"%s","client_ip":%s,"method":"%s","path":%s,"route":%s,'
         '"upstream":%s,"target":%s,"status":%d,"duration_ms":%.3f,"upstream_ms":%s,"bytes_in":%d,'
         '"bytes_out":%d,"user_id":%s,"rate_limit":%s,"breaker":%s,"error":%s,"detail":%s,"tls":%s%s}\n')
# Notes with fields of their own above; any other note a filter adds follows "tls".
_NOTED = frozenset({"rate_limit", "breaker", "upstream_error"})


_CONFIG_STRINGS: dict[Any, str] = {None: "null"}  # route prefixes, upstream names, target URLs


def _config_string(value: Any) -> str:
    """JSON for values from the config (few, repeated): escaped once, then remembered."""
    text = _CONFIG_STRINGS.get(value)
    if text is None:
        text = _CONFIG_STRINGS[value] = encode_basestring_ascii(value)
    return text


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if value.__class__ is str:
        return encode_basestring_ascii(value)
    if value.__class__ is float:
        return "%.3f" % value
    return json.dumps(value, separators=(",", ":"), default=str)


class AccessRecord:
    """One request's access-log fields (in `_FIELDS` order); renders itself as one JSON line.

    A fixed template with escaped strings costs a third of `json.dumps` on a dict, which
    matters at the gateway's request rates. `as_dict()` gives the same data as a mapping.
    """

    __slots__ = ("fields", "extra")

    def __init__(self, fields: tuple[Any, ...], extra: dict[str, Any] | None = None) -> None:
        self.fields = fields
        self.extra = extra              # fields filters added (ctx.note) beyond the fixed ones

    def as_dict(self) -> dict[str, Any]:
        out = dict(zip(_FIELDS, self.fields, strict=True))
        if self.extra:
            out.update(self.extra)
        return out

    def json_line(self) -> str:
        (stamp, cid, client, method, path, route, upstream, target, status, duration, upstream_ms,
         bytes_in, bytes_out, user_id, rate_limit, breaker, error, detail, tls) = self.fields
        j = _json
        esc = encode_basestring_ascii
        config = _CONFIG_STRINGS.get
        return _LINE % (stamp, cid, esc(client), method, esc(path),
                        config(route) or _config_string(route), config(upstream) or _config_string(upstream),
                        config(target) or _config_string(target), status, duration,
                        "null" if upstream_ms is None else "%.3f" % upstream_ms, bytes_in, bytes_out,
                        "null" if user_id is None else j(user_id),
                        "null" if rate_limit is None else j(rate_limit),
                        "null" if breaker is None else j(breaker),
                        "null" if error is None else j(error),
                        "null" if detail is None else j(detail),
                        config(tls) or _config_string(tls),
                        "".join(",%s:%s" % (j(k), j(v)) for k, v in self.extra.items()) if self.extra else "")


class AccessLog:
    """Turns a finished RequestContext into the access-log record README.md documents.

    Each record is a twisted.logger event (namespace `txgateway.access`, level info, the
    AccessRecord under `access`) handed straight to the observer: `Logger.emit`'s generic
    checks cost more than the rest of the log line at tens of thousands of requests per second.
    """

    namespace = "txgateway.access"
    name = "access_log"          # a filter of every chain, with only a finish phase
    on_request = None
    on_response_head = None
    on_response_body = None

    def __init__(self, observer: Any | None) -> None:
        self.observer = observer
        self._second = -1
        self._stamp = ""

    def _timestamp(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return "%s.%03dZ" % (self._stamp, (wall - second) * 1000)

    def on_finished(self, ctx: Any) -> None:
        if self.observer is None:
            return
        now = ctx.end
        route = ctx.route
        notes = ctx.notes
        wall = time.time()
        upstream_ms = ctx.upstream_ms
        self.observer({"log_namespace": self.namespace, "log_level": LogLevel.info, "log_time": wall,
                       "log_format": None, "access": AccessRecord((
            self._timestamp(wall), ctx.correlation_id, ctx.client_ip, ctx.method.decode("latin-1"),
            ctx.path.decode("latin-1"), route.prefix if route is not None else None, ctx.upstream,
            ctx.target_url, ctx.status, (now - ctx.start) * 1000.0,
            upstream_ms, ctx.bytes_in, ctx.bytes_out,
            ctx.identity.user_id if ctx.identity is not None else None,
            notes.get("rate_limit") if notes else None,
            notes.get("breaker") if notes else None, ctx.error_code,
            notes.get("upstream_error") if notes else None,
            ctx.downstream.tls), _extra(notes) if notes else None)})


def _extra(notes: dict[str, Any]) -> dict[str, Any] | None:
    for key in notes:
        if key not in _NOTED:
            return {k: v for k, v in notes.items() if k not in _NOTED}
    return None
