"""core/logtext.printable: what a client-chosen value may put in a text log line."""

from __future__ import annotations

import pytest

from txgateway.core.logtext import printable


@pytest.mark.parametrize(("value", "shown"), [
    ("ops", "ops"),
    (b"x\nmanhole login: admin", "x\\x0amanhole login: admin"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("a\rb\x00c\x7fd\x85e", "a\\x0db\\x00c\\x7fd\\x85e"),
    ("line\u2028sep\u2029para", "line\\u2028sep\\u2029para"),
    ("back\\x0aslash", "back\\\\x0aslash"),               # a literal backslash cannot fake an escape
    (b"\xff\xfebytes", "\ufffd\ufffdbytes"),
    ("/caf\u00e9/\u65e5\u672c", "/caf\u00e9/\u65e5\u672c"),   # printable non-ASCII stays
])
def test_printable(value, shown):
    assert printable(value) == shown
    assert "\n" not in printable(value) and "\x1b" not in printable(value)
