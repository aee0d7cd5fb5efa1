"""Client-chosen values in text log lines, with their control characters escaped.

An SSH user name holding a newline could forge a "manhole login: admin" line, and terminal
escape codes would run in the terminal of whoever reads the log. Every value a client chose
(user names, paths, methods, header values, typed lines) goes through `printable` before it
reaches the process log. The access log needs nothing: its JSON encoder escapes them.
"""

from __future__ import annotations

import re

__all__ = ["printable"]

# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and the backslash
# (escaped too, so that an escape in the log always means the client sent that character).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\\\\]")


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char == "\\":
        return "\\\\"
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(value: str | bytes) -> str:
    """`value` (bytes read as UTF-8, bad bytes replaced) as one line of printable text."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return _UNSAFE.sub(_escape, text)
