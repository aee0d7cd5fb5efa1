"""HTTP/2 header blocks: what makes a request's malformed, and HPACK for our responses.

`request_block_problem` does, in one pass over the decoded headers, the checks of RFC 9113
8.2-8.3 that h2's inbound validation did with a chain of seven generators per header: the
request is forwarded over HTTP/1.1, where a CR or LF in a value would be request smuggling.

HPACK for our responses does without the dynamic table, so each header's bytes are fixed.

hpack's `Encoder` searches and updates the dynamic table for every header of every response
(with a Huffman pass per literal, in Python): a third of the instructions of one HTTP/2
request went there. Like nginx, we never index what we send: a header name's representation
(literal without indexing, the name from the static table or Huffman-coded once) depends on
nothing but the name, so it is computed once and kept; the value follows as a plain literal.
What is lost is compression of repeated headers across responses (a few hundred bytes of a
response head, sent once per response either way).

The frame layer (h2frames.py) calls `encode(headers)` and sets `header_table_size` when the
client's SETTINGS_HEADER_TABLE_SIZE changes; a size below what the client's decoder holds is
signalled at the start of the next block (RFC 7541 4.2). `encode` also normalises: names are
lower-cased, values trimmed, connection-specific headers left out.
"""

from __future__ import annotations

from typing import Final

from hpack.hpack import encode_integer
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

from txgateway.core.hopbyhop import HOP_BY_HOP

__all__ = ["ResponseEncoder", "request_block_problem"]

# Bytes of a regular field name: visible ASCII but upper case letters and ":" (RFC 9113 8.2.1).
_NAME_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if not 0x41 <= c <= 0x5A and c != 0x3A)
_REQUEST_PSEUDO: Final = frozenset({b":method", b":scheme", b":authority", b":path", b":protocol"})
_CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding",
                                  b"upgrade"})

_DEFAULT_TABLE_SIZE = 4096      # the decoder's table size until the client says otherwise
_MAX_NAMES = 1024               # names kept; an upstream inventing names cannot grow it further
_SENSITIVE: Final = frozenset({b"authorization", b"cookie", b"set-cookie", b"proxy-authorization"})
_huffman = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
_static_names: Final[dict[bytes, int]] = {}
_static_statuses: Final[dict[bytes, bytes]] = {}
for _index, (_static, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    _static_names.setdefault(_static, _index)
    if _static == b":status":
        _static_statuses[_value] = bytes((0x80 | _index,))     # indexed header field
_LENGTHS: Final = [bytes((size,)) for size in range(127)]    # a short literal's length, without Huffman
_SPACE: Final = b" \t"
_names: Final[dict[bytes, bytes]] = {}     # name as given -> its representation up to the value; b"": left out


def request_block_problem(headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header block is malformed (RFC 9113 8.2, 8.3), else None."""
    seen: list[bytes] = []          # pseudo-header fields, in order
    regular = False
    method = authority = host = None
    for name, value in headers:
        if name[:1] == b":":
            if regular:
                return f"pseudo-header field {name!r} after a regular field"
            if name not in _REQUEST_PSEUDO or name in seen:
                return f"unknown or repeated pseudo-header field {name!r}"
            seen.append(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
        else:
            regular = True
            if not name or name.translate(None, _NAME_BYTES):
                return f"invalid header name {name!r}"
            if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
                return f"connection-specific header field {name!r}"
            if name == b"host":
                if host is not None:
                    return "more than one host header"
                host = value
        if value and _bad_value(value):
            return f"invalid value of {name!r}"
    if method is None:
        return "no :method"
    if method == b"CONNECT" and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "CONNECT with :scheme or :path"
    elif b":scheme" not in seen or b":path" not in seen:
        return "no :scheme or no :path"
    elif b":protocol" in seen and method != b"CONNECT":
        return ":protocol without CONNECT"
    if authority is None and host is None:
        return "neither :authority nor host"
    if authority is not None and host is not None and authority != host:
        return ":authority and host differ"
    return None


def _bad_value(value: bytes) -> bool:
    """NUL, CR or LF in a (non-empty) value, or whitespace around it. A loop over the bytes
    compiled: a regular expression's search cost 3k instructions a header, `in` 4k."""
    first = value[0]
    last = value[-1]
    if first == 0x20 or first == 0x09 or last == 0x20 or last == 0x09:
        return True
    for i in range(len(value)):
        byte = value[i]
        if byte <= 0x0D and (byte == 0x0A or byte == 0x0D or byte == 0x00):
            return True
    return False


def _length(size: int) -> bytes:
    """The length prefix of a string literal without Huffman coding."""
    return _LENGTHS[size] if size < 127 else bytes(encode_integer(size, 7))


def _string(data: bytes) -> bytes:
    """A string literal without Huffman coding."""
    return _length(len(data)) + data


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
    """The response header encoder of one connection, never using the dynamic table."""

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

    def encode(self, headers: list[tuple[bytes, bytes]], huffman: bool = True) -> bytes:
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
                if value and (value[0] in _SPACE or value[-1] in _SPACE):
                    value = value.strip(b" \t")
                out.append(head)
                out.append(_length(len(value)))
                out.append(value)
        return b"".join(out)
