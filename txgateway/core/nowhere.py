"""A client side that is not there: the `Downstream` of requests the gateway makes for itself
(the response cache's background refresh) and the base of the test kit's recording one."""

from __future__ import annotations

from typing import Any

from txgateway.core.pipeline import RequestContext, ResponseHead

__all__ = ["Nowhere"]


class Nowhere:
    """Takes a response and drops it; `ended(ctx)` runs once it finished or was cut."""

    tls: str | None = None
    hsts: bytes | None = None

    def ended(self, ctx: RequestContext) -> None:
        pass

    def send_head(self, ctx: RequestContext, head: ResponseHead) -> None:
        pass

    def send_body(self, ctx: RequestContext, data: bytes) -> None:
        pass

    def flush(self, ctx: RequestContext) -> None:
        pass

    def finish(self, ctx: RequestContext) -> None:
        self.ended(ctx)

    def abort(self, ctx: RequestContext) -> None:
        self.ended(ctx)

    def read_body(self, ctx: RequestContext, sink: Any) -> None:
        sink.body_end()

    def pause_body(self, ctx: RequestContext) -> None:
        pass

    def resume_body(self, ctx: RequestContext) -> None:
        pass

    def register_producer(self, ctx: RequestContext, producer: Any) -> None:
        pass

    def unregister_producer(self, ctx: RequestContext) -> None:
        pass

    def start_tunnel(self, ctx: RequestContext, upstream: Any) -> Any:
        raise NotImplementedError("no client to join an upstream to")
