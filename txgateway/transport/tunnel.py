"""WebSocket (and any `Upgrade` the upstream accepts with 101) carried as a byte tunnel.

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

from typing import TYPE_CHECKING, Any

from txgateway.core.pipeline import RequestContext
from txgateway.core.timeouts import Deadlines

if TYPE_CHECKING:
    from txgateway.core.pipeline import Pipeline

__all__ = ["Tunnel"]


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
