"""CPU instructions per proxied request of the real daemon (user space), counted by callgrind.

`bench/micro.py` drives the pipeline in memory; this runs the real `twistd -n txgateway`
under callgrind, with real sockets, a real upstream and 16 keep-alive clients, so the count
includes the reactor, the socket module and the write batching too (not the kernel). Like
micro.sh it gives the same number on a busy or a quiet machine, where req/s from wrk move by
tens of percent between runs: use it to compare two versions of the code.

    .venv/bin/python bench/macro.py                    # plain proxy route (bench/anchors-gateway.yaml)
    .venv/bin/python bench/macro.py --jwt              # + JWT + per-user limit (anchors-gateway-jwt.yaml)
    .venv/bin/python bench/macro.py --compose          # three upstream calls merged (anchors-compose.yaml)
    .venv/bin/python bench/macro.py --cache            # the route cached: every counted request a hit
    .venv/bin/python bench/macro.py --cache-miss       # the route cached, each request a new key: every one a miss
    .venv/bin/python bench/macro.py --unique           # plain route, each request a new query (compare --cache-miss)
    .venv/bin/python bench/macro.py --json             # plain route, a 2 KiB JSON answer (--transform's baseline)
    .venv/bin/python bench/macro.py --transform        # the same with transform: allow + rename + add
    .venv/bin/python bench/macro.py --trace 0.01       # tracing: on, sample_ratio 0.01, a local OTLP sink
    .venv/bin/python bench/macro.py -n 3000 --conns 16
    .venv/bin/python bench/macro.py --cache-miss --profile miss.cg; callgrind_annotate miss.cg | head -60
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 12:30:29 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}")
# --json / --transform: a typical API answer of about 2 KiB (a user with a list of orders).
JSON_BODY = json.dumps({
    "id": 1, "name": "Ada Lovelace", "email": "ada@example.com", "password_hash": "x" * 60,
    "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH", "country": "GB"},
    "orders": [{"id": 1000 + i, "total": 19.5 * i, "currency": "GBP", "status": "shipped",
                "internal_note": "warehouse 7, shelf %d" % i} for i in range(18)],
}, separators=(",", ":")).encode()
TRANSFORM = """    transform:
      allow: [id, name, email, address, orders.*.id, orders.*.total, orders.*.status]
      rename: {name: full_name, address.zip: postcode}
      add: {api_version: 2}
"""
UPSTREAM = """
import socket, selectors
sel = selectors.DefaultSelector()
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(512); srv.setblocking(False)
print(srv.getsockname()[1], flush=True)
sel.register(srv, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is srv:
            conn, _ = srv.accept(); conn.setblocking(False); sel.register(conn, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj); key.fileobj.close(); continue
        key.fileobj.sendall(%r * data.count(b"\\r\\n\\r\\n"))
"""

# An OTLP/HTTP collector that takes every batch and answers 200 (what it costs is not counted).
COLLECTOR = """
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Sink(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
server = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


_serial = itertools.count(1)       # drive(unique=True)'s `?n=`: never repeated in one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(port: int, total: int, conns: int, request: bytes, unique: bool = False) -> None:
    """`total` requests over `conns` keep-alive connections, one outstanding per connection;
    `unique`: each with a query of its own (`?n=...`), so a cached route never has it stored."""
    template = request.replace(b" HTTP/1.1", b"?n=%d HTTP/1.1", 1) if unique else request

    def send(s: socket.socket) -> None:
        s.sendall(template % next(_serial) if unique else template)

    sel = selectors.DefaultSelector()
    pending = {}
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        pending[s] = b""
    sent = done = 0
    for s in pending:
        if sent < total:
            send(s)
            sent += 1
    while done < total:
        for key, _ in sel.select(60):
            s = key.fileobj
            data = s.recv(65536)
            if not data:
                raise SystemExit("the gateway closed a connection")
            buf = pending[s] + data
            while b"\r\n\r\n" in buf:
                head, _, rest = buf.partition(b"\r\n\r\n")
                framed = re.search(rb"(?i)content-length: *(\d+)", head)
                if framed is not None:
                    length = int(framed.group(1))
                else:               # chunked (a transformed answer): up to the last chunk
                    end = rest.find(b"0\r\n\r\n")
                    while end > 0 and rest[end - 2:end] != b"\r\n":
                        end = rest.find(b"0\r\n\r\n", end + 1)
                    length = end + 5 if end >= 0 else len(rest) + 1
                if len(rest) < length:
                    break
                if not head.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"unexpected answer: {head[:80]!r}")
                buf = rest[length:]
                done += 1
                if sent < total:
                    send(s)
                    sent += 1
            pending[s] = buf
    for s in pending:
        s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000, help="requests counted (after a warm-up)")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--jwt", action="store_true", help="JWT + per-user rate limit (anchors-gateway-jwt.yaml)")
    parser.add_argument("--compose", action="store_true", help="a composed route of 3 calls (anchors-compose.yaml)")
    parser.add_argument("--cache", action="store_true", help="the route with cache: {ttl: 1h} (hits after the first)")
    parser.add_argument("--cache-miss", action="store_true",
                        help="the route cached, every request a new query: each one a miss that stores its response")
    parser.add_argument("--unique", action="store_true", help="every request a new query (implied by --cache-miss)")
    parser.add_argument("--json", action="store_true", help="the plain route answering a 2 KiB JSON object")
    parser.add_argument("--transform", action="store_true",
                        help="--json with transform: allow + rename + add on the route")
    parser.add_argument("--profile", metavar="FILE", help="keep the counted part's callgrind dump here "
                        "(read it with callgrind_annotate)")
    parser.add_argument("--trace", type=float, metavar="RATIO",
                        help="tracing: on at this sample_ratio, exporting to a local OTLP/HTTP sink (the export "
                             "thread's instructions are counted too)")
    args = parser.parse_args()
    args.unique = args.unique or args.cache_miss
    args.cache = args.cache or args.cache_miss
    response = RESPONSE
    if args.json or args.transform:
        response = RESPONSE.replace(b"Content-Length: 11", b"Content-Length: %d" % len(JSON_BODY)) \
            .replace(b'{"ok":true}', JSON_BODY)
    if args.cache:     # a current Date: the ttl heuristic then keeps the response fresh (an old one is stale)
        from email.utils import formatdate
        response = RESPONSE.replace(b"Sun, 29 Nov 2026 12:30:29 GMT", formatdate(usegmt=True).encode())
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM % response], stdout=subprocess.PIPE, text=True)
    collector = subprocess.Popen([sys.executable, "-c", COLLECTOR], stdout=subprocess.PIPE, text=True) \
        if args.trace is not None else None
    work = Path(tempfile.mkdtemp(prefix="txgw-macro-"))
    gateway = None
    try:
        upstream_port = int(upstream.stdout.readline())
        port = free_port()
        name = "anchors-compose.yaml" if args.compose else "anchors-gateway-jwt.yaml" if args.jwt else "anchors-gateway.yaml"
        source = ROOT / "bench" / name
        config = source.read_text()
        config = re.sub(r'tcp:\d+:interface', f"tcp:{port}:interface", config)
        config = config.replace("http://127.0.0.1:9001", f"http://127.0.0.1:{upstream_port}")
        config = re.sub(r"access_log: \S+", f"access_log: {work / 'access.log'}", config)
        if args.cache:
            config = config.rstrip("\n") + "\n    cache: {ttl: 1h}\n"
        if args.transform:
            config = config.rstrip("\n") + "\n" + TRANSFORM
        if collector is not None:
            sink = f"http://127.0.0.1:{int(collector.stdout.readline())}/v1/traces"
            config += f'tracing: {{otlp_endpoint: "{sink}", sample_ratio: {args.trace}}}\n'
        (work / "gateway.yaml").write_text(config)
        path = b"/api/composite/1" if args.compose else b"/api/users/1"
        request = b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: macro\r\nAccept: */*\r\n"
        env = dict(os.environ)
        if args.jwt:
            import jwt
            env["JWT_SECRET"] = secret = "macro-bench-secret-0123456789abcdef0123"
            token = jwt.encode({"sub": "bench-user", "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
            request += b"Authorization: Bearer " + token.encode() + b"\r\n"
        request += b"\r\n"
        twistd = str(Path(sys.executable).parent / "twistd")
        gateway = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.%p", twistd, "-n", "--pidfile=",
             "txgateway", "--config", str(work / "gateway.yaml")],
            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "valgrind.log", "w"))
        deadline = time.time() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                if time.time() > deadline or gateway.poll() is not None:
                    raise SystemExit(f"the gateway did not start: see {work}/valgrind.log")
                time.sleep(0.5)
        drive(port, 500, args.conns, request, args.unique)          # warm-up
        subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        drive(port, args.n, args.conns, request, args.unique)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(work.glob(f"cg.{gateway.pid}.*"))
        if args.profile:
            subprocess.run(["cp", str(dumps[-1]), args.profile], check=True)
        totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
        print(f"{int(totals.group(1)) // args.n} instructions per request (real daemon, user space, "
              f"{args.conns} connections, {'composed, 3 calls' if args.compose else 'JWT + limit' if args.jwt else 'plain proxy'}"
              f"{', cached, every request a miss' if args.cache_miss else ', cached' if args.cache else ''}"
              f"{', unique queries' if args.unique and not args.cache_miss else ''}"
              f"{', 2 KiB JSON' if args.json or args.transform else ''}{', transformed' if args.transform else ''}"
              f"{f', traced at sample_ratio {args.trace}' if args.trace is not None else ''})")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(60)
        upstream.kill()
        if collector is not None:
            collector.kill()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
