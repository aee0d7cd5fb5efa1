"""HPACK decoding of request header blocks (RFC 7541), compiled with mypyc.

hpack's `Decoder` is interpreted Python walking the Huffman code bit by bit; it was a quarter
of what h2 spent on a request's HEADERS frame. Here Huffman strings are decoded four bits at
a time through a state table built once at import from the RFC's code table (taken from the
`hpack` package: its data, not its code), and the dynamic table is a plain list.

The decoded header list is bounded by `max_list_size` (names and values plus 32 bytes each,
RFC 9113 6.5.2's accounting), so a small block that refers to a large table entry over and
over cannot make us build a large list.
"""

from __future__ import annotations

from typing import Final

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

__all__ = ["Decoder", "HPACKError", "HeaderListTooLarge"]

_STATIC: Final[list[tuple[bytes, bytes]]] = [(name, value) for name, value in HeaderTable.STATIC_TABLE]
_STATIC_COUNT: Final = len(_STATIC)
_ENTRY_OVERHEAD: Final = 32


class HPACKError(Exception):
    """A header block that cannot be decoded: a connection error COMPRESSION_ERROR."""


class HeaderListTooLarge(HPACKError):
    """A header block that decodes to more than `max_list_size`: ENHANCE_YOUR_CALM."""


def _huffman_table() -> list[int]:
    """The 4-bit decoding automaton: for each (node, nibble) one int, packed as
    next node << 10 | accepting << 9 | emits << 8 | symbol; a walk into EOS is -1.

    Nodes are the internal nodes of the code tree (0 the root). Codes are at least 5 bits
    long, so a nibble emits at most one symbol. A node is accepting when the string may end
    there: it lies on the all-ones path from the root, at most 7 bits deep (RFC 7541 5.2)."""
    children: list[list[int]] = [[-1, -1]]       # internal nodes; a leaf is -2 - symbol
    depth = [0]
    for symbol in range(257):
        code, length = REQUEST_CODES[symbol], REQUEST_CODES_LENGTH[symbol]
        node = 0
        for shift in range(length - 1, -1, -1):
            bit = (code >> shift) & 1
            if shift == 0:
                children[node][bit] = -2 - symbol
            else:
                if children[node][bit] < 0:
                    children[node][bit] = len(children)
                    children.append([-1, -1])
                    depth.append(depth[node] + 1)
                node = children[node][bit]
    accepting = {0}
    node = 0
    for _ in range(7):
        node = children[node][1]
        if node < 0:
            break
        accepting.add(node)
    table: list[int] = []
    for start in range(len(children)):
        for nibble in range(16):
            node = start
            emitted = -1
            failed = False
            for shift in (3, 2, 1, 0):
                nxt = children[node][(nibble >> shift) & 1]
                if nxt < 0:
                    symbol = -2 - nxt
                    if symbol == 256:
                        failed = True
                        break
                    emitted = symbol
                    node = 0
                else:
                    node = nxt
            if failed:
                table.append(-1)
            else:
                table.append(node << 10 | (node in accepting) << 9 | (emitted >= 0) << 8 | max(emitted, 0))
    return table


_HUFFMAN: Final = _huffman_table()


def huffman_decode(data: bytes) -> bytes:
    """A Huffman-coded string literal."""
    table = _HUFFMAN
    out = bytearray()
    state = 0
    entry = 1 << 9         # the empty string is accepted
    for byte in data:
        entry = table[state << 4 | byte >> 4]
        if entry < 0:
            raise HPACKError("EOS in a Huffman-coded string")
        if entry & 0x100:
            out.append(entry & 0xFF)
        entry = table[(entry >> 10) << 4 | (byte & 0xF)]
        if entry < 0:
            raise HPACKError("EOS in a Huffman-coded string")
        if entry & 0x100:
            out.append(entry & 0xFF)
        state = entry >> 10
    if not entry & 0x200:
        raise HPACKError("invalid Huffman padding")
    return bytes(out)


class Decoder:
    """One connection's request header decoder: its dynamic table lives across blocks."""

    __slots__ = ("dynamic", "size", "max_size", "settings_size", "max_list_size")

    def __init__(self, max_list_size: int, settings_size: int = 4096) -> None:
        self.dynamic: list[tuple[bytes, bytes]] = []    # newest last
        self.size = 0
        self.max_size = settings_size       # the size the encoder chose (<= settings_size)
        self.settings_size = settings_size  # our SETTINGS_HEADER_TABLE_SIZE
        self.max_list_size = max_list_size

    def decode(self, data: bytes) -> list[tuple[bytes, bytes]]:
        """A complete header block as (name, value) pairs, names as sent."""
        headers: list[tuple[bytes, bytes]] = []
        listed = 0
        i = 0
        n = len(data)
        first = True
        while i < n:
            byte = data[i]
            if byte & 0x80:                                   # indexed field
                index, i = _integer(data, i, 7)
                name, value = self._entry(index)
            elif byte & 0xE0 == 0x20:                         # dynamic table size update
                if not first:
                    raise HPACKError("table size update after a field")
                size, i = _integer(data, i, 5)
                if size > self.settings_size:
                    raise HPACKError(f"table size update to {size}, over {self.settings_size}")
                self.max_size = size
                self._evict(0)
                continue
            else:
                indexing = bool(byte & 0x40)
                index, i = _integer(data, i, 6 if indexing else 4)
                if index:
                    name = self._entry(index)[0]
                else:
                    name, i = _string(data, i)
                value, i = _string(data, i)
                if indexing:
                    self._add(name, value)
            first = False
            listed += len(name) + len(value) + _ENTRY_OVERHEAD
            if listed > self.max_list_size:
                raise HeaderListTooLarge("header list larger than max_header_bytes")
            headers.append((name, value))
        return headers

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if index == 0:
            raise HPACKError("index 0")
        if index <= _STATIC_COUNT:
            return _STATIC[index - 1]
        position = len(self.dynamic) - (index - _STATIC_COUNT)
        if position < 0:
            raise HPACKError(f"index {index} beyond the table")
        return self.dynamic[position]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self.max_size:
            self.dynamic.clear()            # RFC 7541 4.4: an entry larger than the table empties it
            self.size = 0
            return
        self._evict(size)
        self.dynamic.append((name, value))
        self.size += size

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until `room` more bytes fit."""
        dynamic = self.dynamic
        drop = 0
        while self.size + room > self.max_size:
            name, value = dynamic[drop]
            self.size -= len(name) + len(value) + _ENTRY_OVERHEAD
            drop += 1
        if drop:
            del dynamic[:drop]


def _integer(data: bytes, i: int, prefix: int) -> tuple[int, int]:
    """The integer whose `prefix`-bit prefix starts at data[i] (RFC 7541 5.1), and where it ends."""
    mask = (1 << prefix) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    n = len(data)
    while True:
        if i >= n:
            raise HPACKError("truncated integer")
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 28:
            raise HPACKError("integer too large")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    """The string literal at data[i] (RFC 7541 5.2), and where it ends."""
    if i >= len(data):
        raise HPACKError("truncated block")
    coded = data[i] & 0x80
    size, i = _integer(data, i, 7)
    end = i + size
    if end > len(data):
        raise HPACKError("truncated string")
    raw = data[i:end]
    return (huffman_decode(raw) if coded else raw), end
