"""JSON bodies the gateway reads itself (composed calls, transformed responses).

A body from an upstream is untrusted input: it may be invalid, huge or nested ten thousand
levels deep. Callers bound its size before it gets here; this module turns every other way
it can be bad into one `BadJSON`, never a RecursionError escaping into the request path.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = ["BadJSON", "dumps", "is_json", "loads"]


class BadJSON(ValueError):
    """A body that is not usable JSON (its reason is for the log, never for the client)."""


def is_json(content_type: bytes | None) -> bool:
    """`application/json` or a `+json` type, parameters ignored."""
    if content_type is None:
        return False
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/") and kind.endswith(b"+json"))


def loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except RecursionError:
        raise BadJSON("JSON nested too deeply") from None
    except ValueError as e:      # UnicodeDecodeError is one too
        raise BadJSON(f"invalid JSON: {e}") from None


def dumps(value: Any) -> bytes:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    except RecursionError:
        raise BadJSON("JSON nested too deeply") from None
