"""WebSocket carried as a byte tunnel, once both sides proved a real RFC 6455 handshake.

Only a WebSocket handshake is an upgrade (any other `Upgrade` is an ordinary request): it must
be a GET over HTTP/1.1 with `Sec-WebSocket-Version: 13` and a key of 16 base64-encoded bytes
(else 400), and the upstream's 101 must carry the `Sec-WebSocket-Accept` that key implies
(else 502): an upstream that answers 101 without speaking WebSocket gets no tunnel. The
client must wait for the 101 (RFC 6455 section 4.1): bytes it sends before are never relayed
(400), so a request smuggled behind a handshake cannot reach the upstream raw.

The upgrade request goes through the whole pipeline like any request, so the route's auth
and rate limit apply at the handshake, and X-Forwarded-* and identity headers reach the
upstream's handshake. When the upstream answers 101, the client connection and that upstream
connection are joined: bytes pass unchanged both ways (frames, pings, close codes and
messages of any size), each transport pausing the other (backpressure). Either side closing
closes the other, so a client never hangs on a vanished upstream, and a tunnel with no bytes
either way for `limits.idle_timeout` is closed (as nginx's proxy_read_timeout does): a client
that stops reading cannot hold both sockets forever. The access log gets one line (status
101) when the tunnel ends, with the bytes each way.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from typing import TYPE_CHECKING, Any

from txgateway.core.pipeline import RequestContext
from txgateway.core.timeouts import Deadlines

if TYPE_CHECKING:
    from txgateway.core.pipeline import Pipeline

__all__ = ["Tunnel", "handshake_problem"]

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"     # RFC 6455 section 1.3


def handshake_problem(ctx: RequestContext) -> str | None:
    """Why the client's WebSocket handshake is not one (None: it is). A good one leaves the
    `Sec-WebSocket-Accept` the upstream must answer with in the `websocket_accept` state."""
    if ctx.method != b"GET" or ctx.version != b"1.1":
        return "a WebSocket handshake must be a GET over HTTP/1.1"
    if ctx.header(b"sec-websocket-version") != b"13":
        return "a WebSocket handshake must carry Sec-WebSocket-Version: 13"
    key = ctx.header(b"sec-websocket-key") or b""
    try:
        nonce = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        nonce = b""
    if len(nonce) != 16:
        return "a WebSocket handshake must carry a Sec-WebSocket-Key of 16 base64-encoded bytes"
    ctx.set_state("websocket_accept", base64.b64encode(hashlib.sha1(key + _GUID).digest()))
    return None


class Tunnel:
    __slots__ = ("ctx", "pipeline", "client", "upstream", "open", "deadlines", "idle", "deadline")

    def __init__(self, ctx: RequestContext, pipeline: Pipeline, client: Any, upstream: Any,
                 deadlines: Deadlines, idle_timeout: float) -> None:
        self.ctx = ctx
        self.pipeline = pipeline
        self.client = client              # the client's transport
        self.upstream = upstream          # the upstream connection's transport
        self.open = True
        self.deadlines = deadlines
        self.idle = idle_timeout
        self.deadline = deadlines.now + idle_timeout
        deadlines.add(self)
        # Each side's transport pauses the other when its send buffer fills.
        client.registerProducer(upstream, True)
        upstream.registerProducer(client, True)

    def from_client(self, data: bytes) -> None:
        if self.open:
            self.ctx.bytes_in += len(data)
            self.deadline = self.deadlines.now + self.idle
            self.upstream.write(data)

    def from_upstream(self, data: bytes) -> None:
        if self.open:
            self.ctx.bytes_out += len(data)
            self.deadline = self.deadlines.now + self.idle
            self.client.write(data)

    def expired(self) -> None:
        """Nothing either way for idle_timeout: close both sides."""
        self.ctx.note("upstream_error", "websocket idle timeout")
        self.client.abortConnection()
        self._close(self.upstream)

    def client_lost(self) -> None:
        self._close(self.upstream)

    def upstream_lost(self) -> None:
        self._close(self.client)

    def _close(self, other: Any) -> None:
        if not self.open:
            return
        self.open = False
        self.deadlines.discard(self)
        for transport in (self.client, self.upstream):
            try:
                transport.unregisterProducer()
            except Exception:     # already gone
                pass
        other.loseConnection()
        self.pipeline.finished(self.ctx)
