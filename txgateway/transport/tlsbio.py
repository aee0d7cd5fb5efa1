"""An established TLS connection's data path, compiled and straight to OpenSSL.

Twisted's `TLSMemoryBIOProtocol` is interpreted: a request over it costs four Python frames
(dataReceived, _flushReceiveBIO, write, _flushSendBIO) and pyOpenSSL's wrappers around each
OpenSSL call (a fresh 32 KiB buffer per read, `_raise_ssl_error` even on success, a
`WantReadError` raised to say "nothing more"). Once the handshake is done, `DataPath` (a
native class) does the same work itself: the reactor hands it the ciphertext
(`received`), it decrypts straight into the HTTP/1.1 (or HTTP/2) protocol, and the
protocol's writes (`write`) are encrypted and join the turn's batched send
(core/fastwrite.py). OpenSSL is called through pyOpenSSL's own cffi binding, with one buffer
reused per process (the reactor thread is the only caller).

Everything else stays Twisted's (transport/tls.py, `_TLSProtocol`): the handshake, SNI, ALPN,
closes (close_notify), errors, producers, writes held back. The path runs only while
`ready` is true; the TLS protocol clears it at the first such event, and every call goes
through Twisted's code until its dataReceived leaves the connection established with nothing
pending. A failed OpenSSL call goes to that protocol too
(`read_failed`, `write_failed`), which raises and handles exactly what pyOpenSSL raises.
pyOpenSSL keeps the SSL object and the BIOs private (`_ssl`, `_into_ssl`, `_from_ssl`): this
is the one place that reads them, and `tests/test_fastpaths.py` fails loudly if they change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = ["DataPath", "outgoing"]

_SIZE: Final = 1 << 16
_RECORD: Final = 1 << 14                     # the most plaintext one TLS record carries
_buffer: Final[Any] = _ffi.new("char[]", _SIZE)   # what a read or a BIO drain copies out of, at once
_NULL: Final[Any] = _ffi.NULL
_unpack: Final[Any] = _ffi.unpack
_BIO_write: Final[Any] = _lib.BIO_write
_BIO_read: Final[Any] = _lib.BIO_read
_BIO_get_mem_data: Final[Any] = _lib.BIO_get_mem_data
_SSL_read: Final[Any] = _lib.SSL_read
_SSL_write: Final[Any] = _lib.SSL_write
_SSL_pending: Final[Any] = _lib.SSL_pending


def outgoing(connection: Any) -> bytes:
    """The ciphertext waiting in `connection`'s send BIO (b"" when there is none)."""
    return _drain(connection._from_ssl)


def _drain(bio: Any) -> bytes:
    """All a memory BIO holds, read in one call when it fits the buffer (asking its size first
    would be a second call)."""
    size: int = _BIO_read(bio, _buffer, _SIZE)
    if size <= 0:
        return b""
    if size < _SIZE:
        return _unpack(_buffer, size)
    chunks = [_unpack(_buffer, size)]
    while size == _SIZE:
        size = _BIO_read(bio, _buffer, _SIZE)
        if size > 0:
            chunks.append(_unpack(_buffer, size))
    return b"".join(chunks)


class DataPath:
    """One TLS connection's reads and writes once established (see the module docstring).

    `tls` is the connection's Twisted TLS protocol, `app` the protocol it carries (kept up to
    date by `_TLSProtocol`: ALPN swaps it after the handshake), `send`/`send_now` the TCP
    transport's batched writer. Until `start` (and again after `release`), every call goes
    to Twisted's code."""

    def __init__(self, tls: Any) -> None:
        self.tls: Any = tls
        self.app: Any = None
        self.send: Any = None        # set by `connect`
        self.send_now: Any = None
        self.connection: Any = None  # set by `start`, with the SSL object and its BIOs
        self.ssl: Any = None
        self.into: Any = None
        self.out: Any = None
        self.ready = False           # the handshake is done and nothing unusual happened since
        self.clean = True            # the receive BIO was left empty by the last read
        self.tls12 = False           # TLS 1.2: what OpenSSL writes while reading is sent at once

    def connect(self, send: Callable[[bytes], None], send_now: Callable[[], None]) -> None:
        """The TCP transport's batched writer (core/fastwrite.py)."""
        self.send = send
        self.send_now = send_now

    def start(self, connection: Any) -> None:
        """The handshake is done: reads and writes go straight to `connection`'s OpenSSL objects."""
        self.connection = connection
        self.ssl = connection._ssl
        self.into = connection._into_ssl
        self.out = connection._from_ssl
        self.clean = False           # not known: the first read asks OpenSSL
        self.tls12 = connection.get_protocol_version_name() != "TLSv1.3"
        self.ready = True

    def received(self, data: bytes) -> None:
        """Ciphertext from the socket: its plaintext to the app.

        On TLS 1.3, what OpenSSL writes while reading (a KeyUpdate's answer) waits in the send
        BIO for the next write, as RFC 8446 4.6.3 allows; on TLS 1.2 it is sent at once (the
        refusal of a renegotiation, tls.py). A close or an error is Twisted's, which sends at once."""
        if not self.ready:
            self.tls.twisted_received(data)      # the handshake, a close, held writes: Twisted's
            return
        size = len(data)
        # Exactly one whole record after an empty receive BIO (the usual request): once
        # SSL_read returned its plaintext, there is nothing more to ask OpenSSL for.
        whole = self.clean and size > 5 and size == 5 + (data[3] << 8 | data[4])
        if _BIO_write(self.into, data, size) != size:
            self.connection.bio_write(data)      # never expected: pyOpenSSL raises what went wrong
        ssl = self.ssl
        while True:
            size = _SSL_read(ssl, _buffer, _SIZE)
            if size <= 0:
                self.clean = False               # part of a record may wait in the BIO
                self.tls.read_failed(size)       # nothing more, close_notify, or an error
                break
            self.app.dataReceived(_unpack(_buffer, size))
            if not self.ready:
                # The app closed, aborted or had a write held back: Twisted reads on.
                self.tls._flushReceiveBIO()
                return
            if whole:
                break
            if not _BIO_get_mem_data(self.into, _NULL) and not _SSL_pending(ssl):
                self.clean = True
                break
        if self.tls12 and self.ready:
            out = _drain(self.out)
            if out:
                self.send(out)

    def write(self, data: bytes) -> None:
        """Plaintext from the app: encrypted now, the ciphertext into the turn's send."""
        if not self.ready:
            tls = self.tls
            if tls is not None:                  # else the connection is gone: Twisted drops it too
                tls.twisted_write(data)
            return
        ssl = self.ssl
        size = len(data)
        offset = 0
        while offset < size:
            chunk = data if size <= _RECORD else data[offset:offset + _RECORD]
            written: int = _SSL_write(ssl, chunk, len(chunk))
            if written <= 0:
                out = _drain(self.out)
                if out:
                    self.send(out)
                self.tls.write_failed(data[offset:], written)
                return
            offset += written
        out = _drain(self.out)
        if out:
            self.send(out)

    def release(self) -> None:
        """The connection is gone: drop what it held (no cycle through the TLS protocol)."""
        self.ready = False
        self.tls = self.app = self.send = self.send_now = None
        self.connection = self.ssl = self.into = self.out = None

    def flush(self) -> None:
        """Send what this turn wrote, now (before a close, or bytes that take another path)."""
        send_now = self.send_now
        if send_now is not None:
            send_now()
