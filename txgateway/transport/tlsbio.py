"""The memory-BIO calls of a TLS connection's data path, straight to OpenSSL.

pyOpenSSL's `recv`/`send`/`bio_read`/`bio_write` wrap each OpenSSL call in Python: a fresh
32 KiB buffer per read, a buffer context, and `_raise_ssl_error` (three callback checks and
`SSL_get_error`) even on success; it answers "nothing there" with a `WantReadError` built
and raised through that path, which Twisted's TLS protocol meets twice per read. Here the
same OpenSSL calls go through pyOpenSSL's own cffi binding with buffers reused per process
(the reactor thread is the only caller), and a failed call still raises exactly what
pyOpenSSL raises (`_raise_ssl_error`), so the callers' error handling is Twisted's.
pyOpenSSL keeps the SSL object and the BIOs private (`_ssl`, `_into_ssl`, `_from_ssl`): this
is the one place that reads them, and `tests/test_fastpaths.py` fails loudly if they change.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = ["encrypt", "feed", "outgoing", "read", "readable"]

_SIZE = 1 << 16
_buffer: Any = _ffi.new("char[]", _SIZE)     # what a read or a BIO drain copies out of, at once
_NULL: Any = _ffi.NULL


def feed(connection: Any, data: bytes) -> None:
    """Ciphertext received, into the connection's receive BIO (a memory BIO takes it all)."""
    if _lib.BIO_write(connection._into_ssl, data, len(data)) != len(data):
        connection.bio_write(data)        # never expected: pyOpenSSL's path raises what went wrong


def read(connection: Any) -> bytes:
    """Plaintext from the next record(s); pyOpenSSL's exception when there is none."""
    ssl = connection._ssl
    size = _lib.SSL_read(ssl, _buffer, _SIZE)
    if size <= 0:
        connection._raise_ssl_error(ssl, size)
        return b""
    return _ffi.buffer(_buffer, size)[:]


def encrypt(connection: Any, data: bytes) -> bytes:
    """`data` (at most what one record holds) encrypted, with whatever else OpenSSL had to send;
    pyOpenSSL's exception if OpenSSL refuses."""
    ssl = connection._ssl
    size = _lib.SSL_write(ssl, data, len(data))
    if size <= 0:
        connection._raise_ssl_error(ssl, size)
    return outgoing(connection)


def outgoing(connection: Any) -> bytes:
    """The ciphertext waiting in the connection's send BIO (b"" when there is none)."""
    bio = connection._from_ssl
    size = _lib.BIO_get_mem_data(bio, _NULL)
    if not size:
        return b""
    if size > _SIZE:
        return connection.bio_read(size)
    _lib.BIO_read(bio, _buffer, size)
    return _ffi.buffer(_buffer, size)[:]


def readable(connection: Any) -> bool:
    """Whether a `read` may return more: decrypted bytes kept back, or ciphertext not read yet."""
    return bool(_lib.SSL_pending(connection._ssl) or _lib.BIO_get_mem_data(connection._into_ssl, _NULL))
