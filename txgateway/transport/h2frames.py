"""The server side of HTTP/2's framing layer (RFC 9113), compiled with mypyc.

In place of h2's `H2Connection` (interpreted, with hyperframe objects per frame and a state
machine of bound methods per stream event: most of the instructions of an HTTP/2 request).
`H2Frames` turns received bytes into `Event`s for h2.py and queues the frames h2.py asks
for; it knows what a server needs: the preface, stream states (a stream is in `streams` from
its HEADERS until both sides ended it or it was reset), flow control both ways, our SETTINGS
(MAX_CONCURRENT_STREAMS, MAX_HEADER_LIST_SIZE) and the peer's, PING, GOAWAY, RST_STREAM,
padding and priority fields (skipped). Frames of unknown types are ignored.

Header blocks are decoded by hpackdecode.py and encoded by h2headers.ResponseEncoder. A block
is bounded while it arrives: more than `max_header_bytes` or `MAX_BLOCK_FRAMES` frames
(HEADERS + CONTINUATION) ends the connection with ENHANCE_YOUR_CALM before more of it is
stored (the CONTINUATION flood, CVE-2024-27316).

A connection error queues GOAWAY and raises `H2Error`; h2.py then stops reading and closes.
A stream error queues RST_STREAM and reports the stream as `ABORTED`.
"""

from __future__ import annotations

from typing import Final

from txgateway.transport.h2headers import ResponseEncoder
from txgateway.transport.hpackdecode import Decoder, HeaderListTooLarge, HPACKError

__all__ = ["ABORTED", "DATA", "ENDED", "GOAWAY", "REQUEST", "RESET", "WINDOW", "Event", "H2Error", "H2Frames"]

# Error codes (RFC 9113 7).
NO_ERROR: Final = 0x0
PROTOCOL_ERROR: Final = 0x1
INTERNAL_ERROR: Final = 0x2
FLOW_CONTROL_ERROR: Final = 0x3
STREAM_CLOSED: Final = 0x5
FRAME_SIZE_ERROR: Final = 0x6
REFUSED_STREAM: Final = 0x7
CANCEL: Final = 0x8
COMPRESSION_ERROR: Final = 0x9
ENHANCE_YOUR_CALM: Final = 0xB

# Events.
REQUEST: Final = 1  # a request's header block: headers, ended (END_STREAM came with it)
DATA: Final = 2  # data, size (flow-controlled length, padding included: acknowledge it)
ENDED: Final = 3  # the client ended its side (END_STREAM on DATA or trailers)
RESET: Final = 4  # the client reset the stream (error_code)
ABORTED: Final = 5  # we reset the stream for a stream error
WINDOW: Final = 6  # the peer opened a window (stream_id 0: every stream's)
GOAWAY: Final = 7  # the peer sent GOAWAY (error_code)

MAX_BLOCK_FRAMES: Final = 32  # HEADERS + CONTINUATION frames of one header block
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA: Final = 0x0
_HEADERS: Final = 0x1
_PRIORITY: Final = 0x2
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PUSH_PROMISE: Final = 0x5
_PING: Final = 0x6
_GOAWAY: Final = 0x7
_WINDOW_UPDATE: Final = 0x8
_CONTINUATION: Final = 0x9
_END_STREAM: Final = 0x1
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4
_PADDED: Final = 0x8
_PRIORITY_FLAG: Final = 0x20
_HEADER_TABLE_SIZE: Final = 0x1
_ENABLE_PUSH: Final = 0x2
_MAX_CONCURRENT_STREAMS: Final = 0x3
_INITIAL_WINDOW_SIZE: Final = 0x4
_MAX_FRAME_SIZE: Final = 0x5
_MAX_HEADER_LIST_SIZE: Final = 0x6
_DEFAULT_WINDOW: Final = 65535
_DEFAULT_FRAME_SIZE: Final = 16384  # also the largest frame we accept (we never raise it)
_MAX_WINDOW: Final = 2**31 - 1


class H2Error(Exception):
    """A connection error: GOAWAY with `code` is queued, the connection must end."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class Event:
    """What a received frame (or header block) means for h2.py; `kind` says which fields hold."""

    __slots__ = ("kind", "stream_id", "headers", "ended", "data", "size", "error_code")

    def __init__(self, kind: int, stream_id: int) -> None:
        self.kind = kind
        self.stream_id = stream_id
        self.headers: list[tuple[bytes, bytes]] = []
        self.ended = False
        self.data = b""
        self.size = 0
        self.error_code = 0


class _Stream:
    __slots__ = ("send_window", "recv_window", "unacked", "remote_closed", "local_closed")

    def __init__(self, send_window: int, recv_window: int) -> None:
        self.send_window = send_window
        self.recv_window = recv_window
        self.unacked = 0               # bytes consumed and not yet given back by WINDOW_UPDATE
        self.remote_closed = False
        self.local_closed = False


def _frame_head(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return bytes((length >> 16, (length >> 8) & 0xFF, length & 0xFF, kind, flags,
                  stream_id >> 24, (stream_id >> 16) & 0xFF, (stream_id >> 8) & 0xFF, stream_id & 0xFF))


def _u32(data: bytes, i: int) -> int:
    return data[i] << 24 | data[i + 1] << 16 | data[i + 2] << 8 | data[i + 3]


class H2Frames:
    """One server connection's frames and stream states."""

    def __init__(self, encoder: ResponseEncoder, max_streams: int, max_header_bytes: int,
                 connection_window: int) -> None:
        self.encoder = encoder
        self.decoder = Decoder(max_header_bytes)
        self.max_streams = max_streams
        self.max_header_bytes = max_header_bytes
        self.streams: dict[int, _Stream] = {}
        self.highest = 0                          # the highest stream id the client opened
        self.out: list[bytes] = []
        self.closed = False                       # we sent GOAWAY: new streams are ignored
        # The peer's settings and our send windows.
        self.max_frame_size = _DEFAULT_FRAME_SIZE
        self.initial_send_window = _DEFAULT_WINDOW
        self.send_window = _DEFAULT_WINDOW
        # Our receive windows: the connection's is raised to connection_window at once.
        self.connection_window = connection_window
        self.recv_window = connection_window
        self.unacked = 0
        # Received bytes: the preface still expected, a partial frame, the open header block.
        self._preface = 0                         # bytes of PREFACE matched so far (24: done)
        self._settled = False                     # the client's first SETTINGS came
        self._buffer = b""
        self._block: list[bytes] = []
        self._block_stream = 0                    # 0: no block open
        self._block_size = 0
        self._block_ended = False

    # -- sending ------------------------------------------------------------------------

    def initiate(self) -> None:
        """Our SETTINGS and the connection window."""
        settings = bytes((0, _MAX_CONCURRENT_STREAMS)) + self.max_streams.to_bytes(4, "big") \
            + bytes((0, _MAX_HEADER_LIST_SIZE)) + self.max_header_bytes.to_bytes(4, "big")
        self.out.append(_frame_head(len(settings), _SETTINGS, 0, 0) + settings)
        if self.connection_window > _DEFAULT_WINDOW:
            self._window_update(0, self.connection_window - _DEFAULT_WINDOW)

    def data_to_send(self) -> bytes:
        out = self.out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def window(self, stream_id: int) -> int:
        """What may be sent on a stream now (both windows)."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.closed:
            return 0
        return min(stream.send_window, self.send_window)

    def send_headers(self, stream_id: int, headers: list[tuple[bytes, bytes]], end_stream: bool = False) -> bool:
        """A HEADERS frame (with CONTINUATIONs if the block is large); False if the stream is
        no longer open on our side."""
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_closed or self.closed:
            return False
        block = self.encoder.encode(headers)
        size = self.max_frame_size
        flags = _END_STREAM if end_stream else 0
        if len(block) <= size:
            self.out.append(_frame_head(len(block), _HEADERS, flags | _END_HEADERS, stream_id) + block)
        else:
            kind = _HEADERS
            for start in range(0, len(block), size):
                part = block[start:start + size]
                last = start + size >= len(block)
                self.out.append(_frame_head(len(part), kind, flags | (_END_HEADERS if last else 0), stream_id))
                self.out.append(part)
                kind, flags = _CONTINUATION, 0
        if end_stream:
            self._local_end(stream_id, stream)
        return True

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> bool:
        """One DATA frame within the windows and the peer's frame size (the caller sized it by
        `window` and `max_frame_size`); False if the stream is no longer open on our side."""
        stream = self.streams.get(stream_id)
        size = len(data)
        if stream is None or stream.local_closed or self.closed or (size and size > min(stream.send_window,
                                                                                          self.send_window)):
            return False
        stream.send_window -= size
        self.send_window -= size
        self.out.append(_frame_head(size, _DATA, _END_STREAM if end_stream else 0, stream_id))
        if size:
            self.out.append(data)
        if end_stream:
            self._local_end(stream_id, stream)
        return True

    def reset_stream(self, stream_id: int, code: int) -> None:
        """RST_STREAM, if the stream is still open on the wire (and the connection: nothing
        follows our GOAWAY, clients such as h2 take any frame after it as an error)."""
        if self.streams.pop(stream_id, None) is not None and not self.closed:
            self._rst(stream_id, code)

    def close(self, code: int = NO_ERROR, debug: bytes = b"") -> None:
        """GOAWAY: the streams opened so far are the last this connection serves."""
        self.closed = True
        payload = self.highest.to_bytes(4, "big") + code.to_bytes(4, "big") + debug
        self.out.append(_frame_head(len(payload), _GOAWAY, 0, 0) + payload)

    def acknowledge(self, size: int, stream_id: int) -> None:
        """`size` received bytes were consumed: give their windows back, in WINDOW_UPDATEs of
        at least half a window (or whatever reopens a window that is closed)."""
        if size <= 0 or self.closed:
            return
        self.unacked += size
        if self.unacked * 2 >= self.connection_window or self.recv_window <= 0:
            self.recv_window += self.unacked
            self._window_update(0, self.unacked)
            self.unacked = 0
        stream = self.streams.get(stream_id)
        if stream is not None and not stream.remote_closed:
            stream.unacked += size
            if stream.unacked * 2 >= _DEFAULT_WINDOW or stream.recv_window <= 0:
                stream.recv_window += stream.unacked
                self._window_update(stream_id, stream.unacked)
                stream.unacked = 0

    def _window_update(self, stream_id: int, increment: int) -> None:
        self.out.append(_frame_head(4, _WINDOW_UPDATE, 0, stream_id) + increment.to_bytes(4, "big"))

    def _rst(self, stream_id: int, code: int) -> None:
        self.out.append(_frame_head(4, _RST_STREAM, 0, stream_id) + code.to_bytes(4, "big"))

    def _local_end(self, stream_id: int, stream: _Stream) -> None:
        stream.local_closed = True
        if stream.remote_closed:
            del self.streams[stream_id]

    def _fail(self, code: int, message: str) -> H2Error:
        """A connection error: GOAWAY queued, the error for the caller to raise."""
        if not self.closed:
            self.close(code, message.encode()[:128])
        return H2Error(code, message)

    # -- receiving ----------------------------------------------------------------------

    @property
    def block_open(self) -> bool:
        """A header block was begun and not ended (or its first frame is still arriving)."""
        if self._block_stream:
            return True
        buffer = self._buffer
        return len(buffer) > 3 and (buffer[3] == _HEADERS or buffer[3] == _CONTINUATION)

    def receive(self, data: bytes) -> list[Event]:
        """The events of `data`; raises H2Error on a connection error (GOAWAY queued)."""
        events: list[Event] = []
        if self._preface < 24:
            data = self._match_preface(data)
            if not data:
                return events
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        i = 0
        n = len(data)
        while n - i >= 9:
            length = data[i] << 16 | data[i + 1] << 8 | data[i + 2]
            if length > _DEFAULT_FRAME_SIZE:
                raise self._fail(FRAME_SIZE_ERROR, f"frame of {length} bytes, over {_DEFAULT_FRAME_SIZE}")
            kind = data[i + 3]
            if self._block_stream and kind == _CONTINUATION:
                # Bounded before the frame is complete: a flood stops at its first large frames.
                if self._block_size + length > self.max_header_bytes:
                    raise self._fail(ENHANCE_YOUR_CALM, "header block larger than max_header_bytes")
                if len(self._block) >= MAX_BLOCK_FRAMES:
                    raise self._fail(ENHANCE_YOUR_CALM, "header block split into too many CONTINUATION frames")
            elif kind == _HEADERS and length > self.max_header_bytes:
                raise self._fail(ENHANCE_YOUR_CALM, "header block larger than max_header_bytes")
            end = i + 9 + length
            if end > n:
                break
            flags = data[i + 4]
            stream_id = _u32(data, i + 5) & 0x7FFFFFFF
            if not self._settled:
                if kind != _SETTINGS or flags & _ACK:
                    raise self._fail(PROTOCOL_ERROR, "the client preface did not go on with SETTINGS")
                self._settled = True
            self._frame(kind, flags, stream_id, data[i + 9:end], events)
            i = end
        if i < n:
            self._buffer = data[i:]
        return events

    def _match_preface(self, data: bytes) -> bytes:
        """Match the client preface; what follows it."""
        take = min(24 - self._preface, len(data))
        if data[:take] != PREFACE[self._preface:self._preface + take]:
            raise self._fail(PROTOCOL_ERROR, "invalid client preface")
        self._preface += take
        return data[take:]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if self._block_stream and kind != _CONTINUATION:
            raise self._fail(PROTOCOL_ERROR, "a frame inside a header block")
        if kind == _DATA:
            self._data(flags, stream_id, payload, events)
        elif kind == _HEADERS:
            self._headers(flags, stream_id, payload, events)
        elif kind == _CONTINUATION:
            if not self._block_stream or stream_id != self._block_stream:
                raise self._fail(PROTOCOL_ERROR, "CONTINUATION outside a header block")
            self._block.append(payload)
            self._block_size += len(payload)
            if flags & _END_HEADERS:
                self._block_done(events)
        elif kind == _WINDOW_UPDATE:
            self._window_update_received(stream_id, payload, events)
        elif kind == _SETTINGS:
            self._settings(flags, stream_id, payload, events)
        elif kind == _PING:
            if stream_id:
                raise self._fail(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise self._fail(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
            if not flags & _ACK:
                self.out.append(_frame_head(8, _PING, _ACK, 0) + payload)
        elif kind == _RST_STREAM:
            if not stream_id:
                raise self._fail(PROTOCOL_ERROR, "RST_STREAM on stream 0")
            if len(payload) != 4:
                raise self._fail(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
            if stream_id > self.highest:
                raise self._fail(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
            if self.streams.pop(stream_id, None) is not None:
                event = Event(RESET, stream_id)
                event.error_code = _u32(payload, 0)
                events.append(event)
        elif kind == _PRIORITY:
            if not stream_id:
                raise self._fail(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                raise self._fail(FRAME_SIZE_ERROR, "PRIORITY of other than 5 bytes")
        elif kind == _GOAWAY:
            if stream_id:
                raise self._fail(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise self._fail(FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
            event = Event(GOAWAY, 0)
            event.error_code = _u32(payload, 4)
            events.append(event)
        elif kind == _PUSH_PROMISE:
            raise self._fail(PROTOCOL_ERROR, "PUSH_PROMISE from a client")

    def _unpad(self, flags: int, payload: bytes) -> bytes:
        if not flags & _PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise self._fail(PROTOCOL_ERROR, "padding as long as the frame")
        return payload[1:len(payload) - payload[0]]

    def _data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id or stream_id > self.highest:
            raise self._fail(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
        size = len(payload)
        if size > self.recv_window:
            raise self._fail(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        self.recv_window -= size
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            self.acknowledge(size, 0)               # nobody reads it: only the window matters
            if stream is not None:
                self._stream_error(stream_id, STREAM_CLOSED, events)
            return
        if size > stream.recv_window:
            raise self._fail(FLOW_CONTROL_ERROR, f"DATA beyond the window of stream {stream_id}")
        stream.recv_window -= size
        event = Event(DATA, stream_id)
        event.data = data
        event.size = size
        events.append(event)
        if flags & _END_STREAM:
            self._remote_end(stream_id, stream, events)

    def _remote_end(self, stream_id: int, stream: _Stream, events: list[Event]) -> None:
        stream.remote_closed = True
        if stream.local_closed:
            del self.streams[stream_id]
        events.append(Event(ENDED, stream_id))

    def _stream_error(self, stream_id: int, code: int, events: list[Event]) -> None:
        if self.streams.pop(stream_id, None) is not None:
            self._rst(stream_id, code)
            events.append(Event(ABORTED, stream_id))

    def _headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if not stream_id or not stream_id & 1:
            raise self._fail(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        payload = self._unpad(flags, payload)
        if flags & _PRIORITY_FLAG:
            if len(payload) < 5:
                raise self._fail(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        self._block = [payload]
        self._block_size = len(payload)
        self._block_stream = stream_id
        self._block_ended = bool(flags & _END_STREAM)
        if flags & _END_HEADERS:
            self._block_done(events)

    def _block_done(self, events: list[Event]) -> None:
        """A complete header block: a request, trailers, or one to decode and drop."""
        stream_id = self._block_stream
        block = self._block[0] if len(self._block) == 1 else b"".join(self._block)
        self._block = []
        self._block_stream = 0
        try:
            headers = self.decoder.decode(block)
        except HPACKError as e:     # one clause: mypyc types `e` by the first of two
            code = ENHANCE_YOUR_CALM if isinstance(e, HeaderListTooLarge) else COMPRESSION_ERROR
            raise self._fail(code, str(e)) from None
        ended = self._block_ended
        stream = self.streams.get(stream_id)
        if stream is not None:                          # trailers
            if stream.remote_closed:
                self._stream_error(stream_id, STREAM_CLOSED, events)
            elif not ended:
                self._stream_error(stream_id, PROTOCOL_ERROR, events)
            else:
                self._remote_end(stream_id, stream, events)
            return
        if stream_id <= self.highest or self.closed:    # a closed stream, or after our GOAWAY
            return
        self.highest = stream_id
        if len(self.streams) >= self.max_streams:
            self._rst(stream_id, REFUSED_STREAM)
            return
        stream = _Stream(self.initial_send_window, _DEFAULT_WINDOW)
        stream.remote_closed = ended
        self.streams[stream_id] = stream
        event = Event(REQUEST, stream_id)
        event.headers = headers
        event.ended = ended
        events.append(event)

    def _window_update_received(self, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if len(payload) != 4:
            raise self._fail(FRAME_SIZE_ERROR, "WINDOW_UPDATE of other than 4 bytes")
        increment = _u32(payload, 0) & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise self._fail(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > _MAX_WINDOW:
                raise self._fail(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            events.append(Event(WINDOW, 0))
            return
        if stream_id > self.highest:
            raise self._fail(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR, events)
            return
        stream.send_window += increment
        if stream.send_window > _MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, events)
            return
        events.append(Event(WINDOW, stream_id))

    def _settings(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id:
            raise self._fail(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & _ACK:
            if payload:
                raise self._fail(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise self._fail(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        opened = False
        for i in range(0, len(payload), 6):
            setting = payload[i] << 8 | payload[i + 1]
            value = _u32(payload, i + 2)
            if setting == _HEADER_TABLE_SIZE:
                self.encoder.header_table_size = value
            elif setting == _ENABLE_PUSH:
                if value > 1:
                    raise self._fail(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH of {value}")
            elif setting == _INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    raise self._fail(FLOW_CONTROL_ERROR, f"SETTINGS_INITIAL_WINDOW_SIZE of {value}")
                delta = value - self.initial_send_window
                self.initial_send_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        raise self._fail(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                opened = opened or delta > 0
            elif setting == _MAX_FRAME_SIZE:
                if not _DEFAULT_FRAME_SIZE <= value <= 2**24 - 1:
                    raise self._fail(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE of {value}")
                self.max_frame_size = value
        self.out.append(_frame_head(0, _SETTINGS, _ACK, 0))
        if opened:
            events.append(Event(WINDOW, 0))
