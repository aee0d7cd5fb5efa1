#!/usr/bin/env python3
"""An OTLP/HTTP collector that takes every batch and answers 200, for benchmarks with tracing
on (bench/anchors-trace.yaml, bench/macro.py --trace): `taskset -c 0 python bench/otlp-sink.py
[PORT]` (default 4318; 0: a free port). It prints the port it listens on."""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"     # keep-alive, as the OpenTelemetry Collector does

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 4318), Sink)
    print(server.server_address[1], flush=True)
    server.serve_forever()
