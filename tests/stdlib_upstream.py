"""A stdlib HTTP upstream for the tests that run real gateway processes: a ThreadingHTTPServer
(HTTP/1.1 keep-alive) on 127.0.0.1 in a daemon thread, so it needs no reactor."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOST = "127.0.0.1"


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive (the gateway's upstream pool reuses connections), no request log."""

    protocol_version = "HTTP/1.1"

    def answer(self, body: bytes, content_type: str = "text/plain") -> None:
        """200 with `body` (Content-Length framing)."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class StdlibUpstream:
    """`server_class((HOST, 0), handler)` serving in a daemon thread until `close()` (or the
    end of a `with` block). Its daemon_threads are set: connections the gateways keep open
    never block the shutdown."""

    def __init__(self, handler: type[BaseHTTPRequestHandler],
                 server_class: type[ThreadingHTTPServer] = ThreadingHTTPServer) -> None:
        self.server = server_class((HOST, 0), handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server.server_address[1]}"

    def close(self, timeout: float = 5.0) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout)

    def __enter__(self) -> StdlibUpstream:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
