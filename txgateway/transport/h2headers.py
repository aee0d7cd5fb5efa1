"""HPACK for our HTTP/2 responses without the dynamic table: each header's bytes are fixed.

hpack's `Encoder` searches and updates the dynamic table for every header of every response
(with a Huffman pass per literal, in Python): a third of the instructions of one HTTP/2
request went there. Like nginx, we never index what we send: a header name's representation
(literal without indexing, the name from the static table or Huffman-coded once) depends on
nothing but the name, so it is computed once and kept; the value follows as a plain literal.
What is lost is compression of repeated headers across responses (a few hundred bytes of a
response head, sent once per response either way).

`ResponseEncoder` takes the place of `H2Connection.encoder`: h2 calls `encode(headers)` and
sets `header_table_size` when the client's SETTINGS_HEADER_TABLE_SIZE changes; a size below
what the client's decoder holds is signalled at the start of the next block (RFC 7541 4.2).
It also does what h2's outbound normalisation did for us: names are lower-cased, values
trimmed, connection-specific headers left out (h2's config turns that pass off).
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

from txgateway.core.hopbyhop import HOP_BY_HOP

__all__ = ["ResponseEncoder"]

_DEFAULT_TABLE_SIZE = 4096      # the decoder's table size until the client says otherwise
_MAX_NAMES = 1024               # names kept; an upstream inventing names cannot grow it further
_SENSITIVE = frozenset({b"authorization", b"cookie", b"set-cookie", b"proxy-authorization"})
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_static_names: dict[bytes, int] = {}
_static_statuses: dict[bytes, bytes] = {}
for _index, (_static, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _static_names.setdefault(_static, _index)
    if _static == b":status":
        _static_statuses[_value] = bytes((0x80 | _index,))     # indexed header field
_names: dict[bytes, bytes] = {}     # name as given -> its representation up to the value; b"": left out


def _string(data: bytes) -> bytes:
    """A string literal without Huffman coding."""
    size = len(data)
    return (bytes((size,)) if size < 127 else bytes(encode_integer(size, 7))) + data


def _name(name: bytes) -> bytes:
    """The representation of a header with this name, up to its value (b"": not sent)."""
    low = name.lower()
    if low in HOP_BY_HOP:
        return b""
    flag = 0x10 if low in _SENSITIVE else 0x00       # never indexed, else without indexing
    index = _static_names.get(low)
    if index is not None:
        head = encode_integer(index, 4)
        head[0] |= flag
        return bytes(head)
    coded = _huffman.encode(low)
    if len(coded) < len(low):
        size = encode_integer(len(coded), 7)
        size[0] |= 0x80
        return bytes((flag,)) + bytes(size) + coded
    return bytes((flag,)) + _string(low)


def _size_update(size: int) -> bytes:
    update = encode_integer(size, 5)
    update[0] |= 0x20
    return bytes(update)


class ResponseEncoder:
    """h2's header encoder for one connection, never using the dynamic table."""

    __slots__ = ("_announced", "_pending")

    def __init__(self) -> None:
        self._announced = _DEFAULT_TABLE_SIZE     # the client decoder's table size
        self._pending = -1                        # a smaller size to signal, -1: none

    @property
    def header_table_size(self) -> int:
        return self._announced if self._pending < 0 else self._pending

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        if value < self.header_table_size:
            self._pending = value

    def encode(self, headers: Iterable[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
        out: list[bytes] = []
        if self._pending >= 0:
            out.append(_size_update(self._pending))
            self._announced, self._pending = self._pending, -1
        names = _names
        for name, value in headers:
            if name == b":status":
                indexed = _static_statuses.get(value)
                if indexed is not None:
                    out.append(indexed)
                    continue
            head = names.get(name)
            if head is None:
                if len(names) >= _MAX_NAMES:
                    names.clear()
                head = names[name] = _name(name)
            if head:
                value = value.strip(b" \t")
                out.append(head)
                out.append(_string(value))
        return b"".join(out)
