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
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import unquote_to_bytes

import orjson
from twisted.logger import LogLevel

from txgateway.core.periodic import Periodic

if TYPE_CHECKING:
    from txgateway.core.pipeline import RequestContext

__all__ = ["DEFAULT_REDACT", "FIELDS", "AccessLog", "JsonLinesWriter", "Layout", "TextStream", "redact_query"]


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
        if isinstance(record, AccessRecord):     # compiled: a native call, not a method lookup
            self.stream.write(record.json_line())

    def write(self, record: AccessRecord) -> None:
        """One record's line: what `__call__` does with an event, for AccessLog's direct call."""
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


# Every field a line can hold, in the default order (`access_log_fields:` picks and orders
# them), and whether the line puts quotes around its value (True: a string that needs no
# escaping and is never null) or takes the JSON text AccessRecord.values made (escaped, a
# number, or null).
# One a line: AccessRecord.values and AccessLog.on_finished follow this order.
_QUOTED = {
    "time": True,
    "correlation_id": True,      # a validated charset or a UUID
    "request_id": True,
    "client_ip": False,
    "method": True,              # an llhttp-validated token
    "host": False,
    "path": False,
    "query": False,
    "http_version": True,
    "route": False,
    "upstream": False,
    "target": False,
    "upstream_addr": False,
    "status": False,
    "upstream_status": False,
    "duration_ms": False,
    "upstream_ms": False,
    "retries": False,
    "bytes_in": False,
    "bytes_out": False,
    "user_id": False,
    "user_agent": False,
    "referer": False,
    "rate_limit": False,
    "breaker": False,
    "error": False,
    "detail": False,
    "tls": False,
}
FIELDS: tuple[str, ...] = tuple(_QUOTED)
# Notes with fields of their own above; any other note a filter adds follows the fields.
_NOTED: Final = frozenset({"breaker", "upstream_error"})
# Query parameters whose values the log shows as REDACTED unless `access_log_redact:` says otherwise.
DEFAULT_REDACT: tuple[str, ...] = ("access_token", "api_key", "apikey", "password", "secret", "token")


class Layout:
    """Which fields a line holds, in which order: the constant text around their values,
    made once (at start-up). A line is one `"".join` (a %-format of as many fields costs
    several times more)."""

    __slots__ = ("tail", "template", "line", "end", "noted_field", "noted_value", "noted_end", "picks", "headers",
                 "redact")

    def __init__(self, fields: tuple[str, ...] = FIELDS, redact: tuple[str, ...] = DEFAULT_REDACT) -> None:
        pieces = []
        after = ""
        for i, name in enumerate(fields):
            quoted = _QUOTED[name]
            pieces.append('%s%s"%s":%s' % (after, "," if i else "{", name, '"' if quoted else ""))
            after = '"' if quoted else ""
        self.tail = after                 # after the last value
        # The line as a list: the text before each field's value, a place for the value, and
        # the end when no filter added fields. A line copies it and fills the places with one
        # slice assignment (not two appends a field).
        self.template: list[str] = [text for piece in pieces for text in (piece, "")] + [after + "}\n"]
        # The template's working copy for lines without filters' fields: its places are
        # refilled line after line (made one at a time), so no list is copied and freed a line.
        self.line = self.template[:]
        self.end = self.template[-1]
        # A line with one filter's field (a cached route's `cache`) fills `line` too, its end
        # then the field's piece and the line's end (`note_end`): the last such line's note and end.
        self.noted_field = ""
        self.noted_value: Any = None
        self.noted_end = ""
        # None: every field in FIELDS order, AccessRecord.values as they are
        self.picks: tuple[int, ...] | None = None if fields == FIELDS else tuple(FIELDS.index(f) for f in fields)
        self.headers = "user_agent" in fields or "referer" in fields  # only then are the headers searched
        self.redact = frozenset(name.lower().encode("latin-1") for name in redact)

    def noted_line(self, values: tuple[str, ...], field: str, value: Any) -> str:
        """A line with one filter's field: `line` filled, its end the field's and the line's."""
        line = self.line
        line[1:-1:2] = values
        line[-1] = self.note_end(field, value)
        text = "".join(line)
        line[-1] = self.end
        return text

    def note_end(self, field: str, value: Any) -> str:
        """The end of a line whose one filter's field is `field`: `value`, made again only when
        the note is not the last line's (a route's lines mostly repeat one: MISS, MISS...)."""
        if value is self.noted_value and field == self.noted_field:
            return self.noted_end
        end = self.tail + _note_piece(field, value) + "}\n"
        if isinstance(value, str):      # an object that cannot change since
            self.noted_field, self.noted_value, self.noted_end = field, value, end
        return end


_CONFIG_STRINGS: Final[dict[Any, str]] = {None: "null"}  # route prefixes, upstream names, target URLs


def _config_string(value: Any) -> str:
    """JSON for values from the config (few, repeated): escaped once, then remembered."""
    text = _CONFIG_STRINGS.get(value)
    if text is None:
        text = _CONFIG_STRINGS[value] = encode_basestring_ascii(value)
    return text


# Strings lines repeat: client and upstream addresses (a connection's are the same objects,
# their hashes kept), Host values, user ids, rate-limit outcomes. Escaping one costs several
# times a lookup. Bounded (most are the client's choice): past it, escaped per line.
_REPEATED: Final[dict[str, str]] = {}
_REPEATED_MAX: Final = 4096


def _repeated_string(value: str) -> str:
    text = _REPEATED.get(value)
    if text is None:
        text = encode_basestring_ascii(value)
        if len(_REPEATED) < _REPEATED_MAX:
            _REPEATED[value] = text
    return text


def _repeated_json(value: Any) -> str:
    """`_json(value)`; a string through `_repeated_string`."""
    if isinstance(value, str):
        return _repeated_string(value)
    return _json(value)


class _LastText:
    """The JSON text of the last value given, kept while the same string object comes again:
    a client's requests carry one identity, whose user id is the same object line after line,
    and a limit outcome is one of a few constants. One identity check instead of the
    repeated-strings lookup (a hash and a dict probe)."""

    __slots__ = ("value", "text")

    def __init__(self) -> None:
        self.value: Any = None
        self.text = ""

    def of(self, value: Any) -> str:
        if value is self.value:
            return self.text
        text = _repeated_json(value)
        if isinstance(value, str):      # a string cannot change since
            self.value, self.text = value, text
        return text


_USER_ID: Final = _LastText()
_RATE_LIMIT: Final = _LastText()


_THOUSANDTHS: Final[tuple[str, ...]] = tuple(".%03d" % i for i in range(1000))   # ".000" ... ".999"


_INTS: Final[tuple[str, ...]] = tuple(str(i) for i in range(1024))   # statuses, retries, small sizes


def _int_text(value: int) -> str:
    """`str(value)`, from a table below 1024: status, retries and most byte counts."""
    if 0 <= value < 1024:
        return _INTS[value]
    return str(value)


def _decimal3(value: float) -> str:
    """`"%.3f" % value` (to within the last digit's rounding) from two integers: a %-format
    of a float cost more than the rest of the field's text."""
    if 0.0 <= value < 1e12:
        n = int(value * 1000.0 + 0.5)
        return _int_text(n // 1000) + _THOUSANDTHS[n % 1000]
    return "%.3f" % value


# What orjson would write its own way goes to `default=str`, as with json.dumps.
_AS_JSON_DOES: Final = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def _json(value: Any) -> str:
    if value is None:
        return "null"
    if value.__class__ is str:
        return encode_basestring_ascii(value)
    if value.__class__ is float:
        return "%.3f" % value
    if value.__class__ is list or value.__class__ is dict:
        # A filter's structured note (compose's `calls`): orjson writes it in a tenth of the
        # json module's instructions. Its output is kept only when it is what json.dumps
        # would write too: ASCII (json escapes the rest), no type orjson writes its own way.
        try:
            text = orjson.dumps(value, default=str, option=_AS_JSON_DOES)
            if text.isascii():
                return text.decode("ascii")
        except orjson.JSONEncodeError:      # keys that are not strings, integers past 64 bits
            pass
    return json.dumps(value, separators=(",", ":"), default=str)


class AccessRecord:
    """One request's access-log fields (in `FIELDS` order); renders itself as one JSON line.

    A template with escaped strings costs a third of `json.dumps` on a dict, which
    matters at the gateway's request rates. `as_dict()` gives the same data as a mapping.
    """

    __slots__ = ("fields", "extra", "layout", "log_field", "log_value")

    def __init__(self, fields: tuple[Any, ...], extra: dict[str, Any] | None = None,
                 layout: Layout | None = None, log_field: str = "", log_value: Any = None) -> None:
        self.fields = fields
        self.extra = extra              # fields filters added (ctx.note) beyond the fixed ones
        self.layout = layout if layout is not None else _DEFAULT
        self.log_field = log_field      # ctx.log_note's field, before `extra` ("": none)
        self.log_value = log_value

    def as_dict(self) -> dict[str, Any]:
        """The fields the layout picks, in its order, then the filters' notes."""
        every = dict(zip(FIELDS, self.fields, strict=True))
        picks = self.layout.picks
        out = every if picks is None else {FIELDS[i]: self.fields[i] for i in picks}
        if self.log_field:
            out[self.log_field] = self.log_value
        if self.extra:
            out.update(self.extra)
        return out

    def values(self) -> tuple[str, ...]:
        """The JSON text of every field (without the quotes the layout adds), in FIELDS order."""
        (stamp, cid, request_id, client, method, host, path, query, version, route, upstream, target,
         upstream_addr, status, upstream_status, duration, upstream_ms, retries, bytes_in, bytes_out, user_id,
         user_agent, referer, rate_limit, breaker, error, detail, tls) = self.fields
        # Module names called directly (compiled: native calls and dict primitives, where
        # local aliases of them would be generic calls).
        esc = encode_basestring_ascii
        config = _CONFIG_STRINGS
        return (
            stamp,
            cid,
            request_id,
            _repeated_string(client),
            method,
            "null" if host is None else _repeated_string(host),
            esc(path),
            "null" if query is None else esc(query),
            version,
            config.get(route) or _config_string(route),
            config.get(upstream) or _config_string(upstream),
            config.get(target) or _config_string(target),
            "null" if upstream_addr is None else _repeated_string(upstream_addr),
            _int_text(status),
            "null" if upstream_status is None else _int_text(upstream_status),
            _decimal3(duration),
            "null" if upstream_ms is None else _decimal3(upstream_ms),
            _int_text(retries),
            _int_text(bytes_in),
            _int_text(bytes_out),
            "null" if user_id is None else _USER_ID.of(user_id),
            "null" if user_agent is None else esc(user_agent),
            "null" if referer is None else esc(referer),
            "null" if rate_limit is None else _RATE_LIMIT.of(rate_limit),
            "null" if breaker is None else _json(breaker),
            "null" if error is None else _json(error),
            "null" if detail is None else _json(detail),
            config.get(tls) or _config_string(tls),
        )

    def json_line(self) -> str:
        layout = self.layout
        values = self.values()
        picks = layout.picks
        if picks is not None:
            values = tuple([values[i] for i in picks])
        extra = self.extra
        field = self.log_field
        if not extra:
            if field:               # one filter's field (a cached route's): the working list too
                return layout.noted_line(values, field, self.log_value)
            line = layout.line
            line[1:-1:2] = values
            return "".join(line)
        if len(extra) == 1 and not field:
            for k, v in extra.items():
                return layout.noted_line(values, k, v)
        parts = layout.template[:]
        parts[1:-1:2] = values
        parts[-1] = layout.tail
        if field:
            parts.append(_note_piece(field, self.log_value))
        for k, v in extra.items():
            parts.append(_note_piece(k, v))
        parts.append("}\n")
        return "".join(parts)


_DEFAULT: Final = Layout()
_MILLIS: Final[tuple[str, ...]] = tuple(".%03dZ" % i for i in range(1000))   # a timestamp's end, ".000Z" ... ".999Z"
_VERSIONS: Final = {b"1.1": "1.1", b"1.0": "1.0", b"2": "2"}
_INFO: Final = LogLevel.info
_METHODS: Final = {m: m.decode() for m in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS")}


class AccessLog:
    """Turns a finished RequestContext into the access-log record README.md documents.

    Each record is a twisted.logger event (namespace `txgateway.access`, level info, the
    AccessRecord under `access`) handed straight to the observer: `Logger.emit`'s generic
    checks cost more than the rest of the log line at tens of thousands of requests per second.
    The gateway's own JsonLinesWriter is handed the AccessRecord alone (`write`), the same line.
    """

    namespace = "txgateway.access"
    name = "access_log"          # a filter of every chain, with only a finish phase
    on_request = None
    on_response_head = None
    on_response_body = None

    def __init__(self, observer: Any | None, layout: Layout | None = None) -> None:
        self.observer = observer
        self.layout = layout if layout is not None else _DEFAULT
        self._second = -1
        self._stamp = ""

    def _timestamp(self, wall: float) -> str:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self._stamp + _MILLIS[int((wall - second) * 1000)]

    def on_finished(self, ctx: RequestContext) -> None:
        if self.observer is None:
            return
        layout = self.layout
        now = ctx.end
        route = ctx.route
        notes = ctx.notes
        wall = time.time()
        user_agent: bytes | None = None
        referer: bytes | None = None
        if layout.headers:
            # Each field as a tuple object, its value read only when it is one of these: a
            # `tuple[bytes, bytes]` loop unpacks (touches) every value, cold at 256 connections
            # (docs/performance.md, "foot").
            for field in cast("list[tuple[bytes, ...]]", ctx.headers):
                name = field[0]
                if name[0] == 117 and name == b"user-agent":     # 117: "u"
                    user_agent = field[1]
                elif name[0] == 114 and name == b"referer":    # 114: "r"
                    referer = field[1]
        extra = _extra(notes) if notes else None
        # Notes with fields of their own are looked for only when there are some: `_extra`
        # hands back the notes themselves when none has (a cached route's `cache` alone).
        own = notes if notes and extra is not notes else None
        detail = own.get("upstream_error") if own else None
        upstream_status = ctx.upstream_status
        status = ctx.status
        host = ctx.host
        record = AccessRecord((
            self._timestamp(wall),
            ctx.correlation_id,
            ctx.correlation_id,
            ctx.client_ip,
            _METHODS.get(ctx.method) or ctx.method.decode("latin-1"),
            None if host is None else host.decode("latin-1"),
            ctx.path.decode("latin-1"),
            redact_query(ctx.query, layout.redact) if ctx.query else None,
            _VERSIONS.get(ctx.version) or ctx.version.decode("latin-1"),
            route.prefix if route is not None else None,
            ctx.upstream,
            ctx.target_url,
            ctx.upstream_addr,
            status,
            upstream_status if upstream_status and upstream_status != status else None,
            (now - ctx.start) * 1000.0,
            ctx.upstream_ms,
            ctx.retries,
            ctx.bytes_in,
            ctx.bytes_out,
            ctx.identity.user_id if ctx.identity is not None else None,
            None if user_agent is None else user_agent.decode("latin-1"),
            None if referer is None else referer.decode("latin-1"),
            ctx.rate_limit,
            own.get("breaker") if own else None,
            ctx.error_code,
            detail if detail is not None else ctx.error_detail,
            ctx.downstream.tls), extra, layout, ctx.log_field, ctx.log_value)
        observer = self.observer
        if isinstance(observer, JsonLinesWriter):
            # The gateway's own writer, called natively: no event dict, which only other
            # twisted.logger observers (tests' captures) read.
            observer.write(record)
        else:
            observer({"log_namespace": self.namespace, "log_level": _INFO, "log_time": wall, "log_format": None,
                      "access": record})


def redact_query(query: bytes, names: frozenset[bytes]) -> str:
    """The query string without its `?`, each parameter named in `names` (lower case, after
    percent-decoding) with its value shown as REDACTED."""
    parts = query[1:].split(b"&")
    if names:
        for i, part in enumerate(parts):
            name, equals, _ = part.partition(b"=")
            if equals and (unquote_to_bytes(name) if 37 in name else name).lower() in names:   # 37: "%"
                parts[i] = name + b"=REDACTED"
    return b"&".join(parts).decode("latin-1")


def _extra(notes: dict[str, Any]) -> dict[str, Any] | None:
    """The notes without a field of their own: `notes` itself when none has one (a finished
    request's notes no longer change), else a copy without them."""
    mine = 0
    for key in notes:
        if key in _NOTED:
            mine += 1
    if not mine:
        return notes
    if mine == len(notes):
        return None
    return {k: v for k, v in notes.items() if k not in _NOTED}


# A string note's `,"field":"value"` piece, by field and value: most notes repeat a few values
# (the cache's HIT and MISS on every request of a cached route), and formatting one costs
# two JSON escapes and a %-format.
_PIECES: Final[dict[str, dict[str, str]]] = {}
_PIECES_PER_FIELD: Final = 256          # values remembered per field (a note may be a message)


def _note_piece(field: str, value: Any) -> str:
    if not isinstance(value, str):      # a type check; `.__class__` is an attribute lookup
        return ",%s:%s" % (_json(field), _json(value))
    pieces = _PIECES.get(field)
    if pieces is None:
        pieces = _PIECES[field] = {}
    piece = pieces.get(value)
    if piece is None:
        piece = ",%s:%s" % (_json(field), _json(value))
        if len(pieces) < _PIECES_PER_FIELD:
            pieces[value] = piece
    return piece
