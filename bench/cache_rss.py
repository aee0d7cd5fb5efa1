#!/usr/bin/env python3
"""RSS of the daemon with a full response cache: `cache: {max_memory: 256MiB}`, filled with
64 KiB answers under unique query strings until it evicts (then 25 % more, so eviction runs),
the stored bytes read from /metrics, the RSS from /proc.

    .venv/bin/python bench/cache_rss.py [--max-memory 256MiB] [--body-kib 64]
"""

from __future__ import annotations

import argparse
import http.client
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from macro import metric, rss_mib  # bench/ is the script's own folder on sys.path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def upstream(body: bytes) -> ThreadingHTTPServer:
    class Answer(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Cache-Control", "max-age=3600")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-memory", default="256MiB")
    parser.add_argument("--body-kib", type=int, default=64)
    args = parser.parse_args()
    body = b"x" * (args.body_kib * 1024)
    up = upstream(body)
    port, admin = free_port(), free_port()
    work = Path(tempfile.mkdtemp(prefix="txgw-cache-rss-"))
    (work / "gateway.yaml").write_text(f"""\
listen: [{{endpoint: "tcp:{port}:interface=127.0.0.1"}}]
admin: {{endpoint: "tcp:{admin}:interface=127.0.0.1"}}
access_log: "off"
cache: {{max_memory: {args.max_memory}, max_object_size: 1MiB}}
upstreams: {{blobs: {{targets: ["http://127.0.0.1:{up.server_address[1]}"]}}}}
routes: [{{prefix: /blobs, upstream: blobs, cache: {{ttl: 1h}}}}]
""")
    twistd = str(Path(sys.executable).parent / "twistd")
    gateway = subprocess.Popen([twistd, "-n", "--pidfile=", "txgateway", "--config", str(work / "gateway.yaml")],
                               cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.2)
        print(f"RSS at start: {rss_mib(gateway.pid):.1f} MiB")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        sent = evicted_at = 0
        while evicted_at == 0 or sent < evicted_at * 1.25:
            conn.request("GET", f"/blobs/{sent}")
            response = conn.getresponse()
            if response.status != 200 or len(response.read()) != len(body):
                raise SystemExit(f"request {sent}: {response.status}")
            sent += 1
            if evicted_at == 0 and sent % 256 == 0 and metric(admin, "txgateway_cache_evictions_total") > 0:
                evicted_at = sent
        stored = metric(admin, "txgateway_cache_stored_bytes")
        evictions = metric(admin, "txgateway_cache_evictions_total")
        print(f"{sent} distinct {args.body_kib} KiB answers, max_memory {args.max_memory}: stored "
              f"{stored / 2**20:.1f} MiB, {evictions:.0f} evicted, daemon RSS {rss_mib(gateway.pid):.1f} MiB")
    finally:
        gateway.terminate()
        gateway.wait(30)
        up.shutdown()


if __name__ == "__main__":
    main()
