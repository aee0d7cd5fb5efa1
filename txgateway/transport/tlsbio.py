"""What a pyOpenSSL memory-BIO connection holds, asked without raising.

pyOpenSSL answers "nothing there" with an exception (`WantReadError`) built and raised
through its Python error path: Twisted's TLS protocol meets two per read (one per BIO).
OpenSSL can say so directly (`SSL_pending`; `BIO_get_mem_data`, what a memory BIO holds);
pyOpenSSL keeps the BIOs private (`_into_ssl`, `_from_ssl`), so this is the one place that
reads them, and `tests/test_fastpaths.py` fails loudly if pyOpenSSL changes them.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib

__all__ = ["outgoing", "readable"]


def outgoing(connection: Any) -> bytes:
    """The ciphertext waiting in the connection's send BIO (b"" when there is none)."""
    size = _lib.BIO_get_mem_data(connection._from_ssl, _ffi.NULL)
    return connection.bio_read(size) if size else b""


def readable(connection: Any) -> bool:
    """Whether a `recv` may return more: decrypted bytes kept back, or ciphertext not read yet."""
    return bool(connection.pending() or _lib.BIO_get_mem_data(connection._into_ssl, _ffi.NULL))
