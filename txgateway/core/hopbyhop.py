"""Which headers belong to one connection rather than to the message, in one place.

Hop-by-hop headers (RFC 9110 7.6.1, and every `Proxy-*`) describe a single connection and are
never forwarded; the framing headers are rewritten by each side for its own connection. A
transport takes these out of a request before any filter sees it (with `Host` and `Expect`,
which it turns into context fields), and the upstream side takes them out of a response.
"""

from __future__ import annotations

from typing import Final

__all__ = ["HOP_BY_HOP", "REQUEST_CONSUMED", "RESPONSE_CONSUMED", "consumed_by_transport"]

HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                               b"proxy-connection", b"proxy-authenticate", b"proxy-authorization"})
# Taken out of a request by the transport: filters never see them.
REQUEST_CONSUMED: Final = HOP_BY_HOP | {b"content-length", b"host", b"expect"}
# Taken out of an upstream's response before the response hooks.
RESPONSE_CONSUMED: Final = HOP_BY_HOP | {b"content-length"}


def consumed_by_transport(name: bytes) -> bool:
    """Whether a request header (lower case) never reaches the filters."""
    return name in REQUEST_CONSUMED or name.startswith(b"proxy-")
