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
    .venv/bin/python bench/macro.py --trace 0.01       # tracing: on, sample_ratio 0.01, a local OTLP sink
    .venv/bin/python bench/macro.py --tls              # the route over a TLS listener (HTTPS/1.1 keep-alive)
    .venv/bin/python bench/macro.py --tls --handshake  # a new connection (full handshake) per request
    .venv/bin/python bench/macro.py --tls --resume     # a new connection per request, the session resumed
    .venv/bin/python bench/macro.py --tls --key rsa    # an RSA 2048 certificate (default: ECDSA P-256)
    .venv/bin/python bench/macro.py --tls --rss        # no callgrind: the daemon's RSS after the run
    .venv/bin/python bench/macro.py -n 3000 --conns 16
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 12:30:29 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}")
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_cert(work: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: ECDSA P-256 or RSA 2048."""
    cert, key = work / "localhost.pem", work / "localhost.key"
    new_key = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "req", "-x509", *new_key, "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def client_context(tls: bool) -> ssl.SSLContext | None:
    if not tls:
        return None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def open_connection(port: int, context: ssl.SSLContext | None, session: ssl.SSLSession | None = None) -> socket.socket:
    """A connection to the gateway, its TLS handshake done (blocking) when `context` is given."""
    s = socket.create_connection(("127.0.0.1", port))
    if context is not None:
        s = context.wrap_socket(s, server_hostname="localhost", session=session)
    return s


def read_answer(buf: bytes) -> tuple[bool, bytes]:
    """(whether `buf` holds one whole 200 answer, what follows it)."""
    if b"\r\n\r\n" not in buf:
        return False, buf
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    if len(rest) < length:
        return False, buf
    if not head.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"unexpected answer: {head[:80]!r}")
    return True, rest[length:]


def drive_new_connections(port: int, total: int, request: bytes, context: ssl.SSLContext, resume: bool) -> None:
    """`total` requests, one at a time, each on a new TLS connection: a full handshake each, or
    (`resume`) an abbreviated one on the session of the connection before."""
    session = None
    for _ in range(total):
        s = open_connection(port, context, session if resume else None)
        s.sendall(request)
        buf = b""
        done = False
        while not done:
            data = s.recv(65536)
            if not data:
                raise SystemExit("the gateway closed a connection")
            done, buf = read_answer(buf + data)
        assert isinstance(s, ssl.SSLSocket)
        if resume and session is not None and not s.session_reused:
            raise SystemExit("the TLS session was not resumed")
        session = s.session
        s.close()


def open_connections(port: int, conns: int, context: ssl.SSLContext | None) -> list[socket.socket]:
    """The keep-alive connections, opened once: the warm-up and the counted run share them (so
    no TLS handshake is counted with the requests)."""
    sockets = [open_connection(port, context) for _ in range(conns)]
    for s in sockets:
        s.setblocking(False)
    return sockets


def drive(sockets: list[socket.socket], total: int, request: bytes) -> None:
    """`total` requests over keep-alive connections, one outstanding per connection."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytes] = {}
    for s in sockets:
        sel.register(s, selectors.EVENT_READ)
        pending[s] = b""
    sent = done = 0
    for s in pending:
        if sent < total:
            s.sendall(request)
            sent += 1
    while done < total:
        for key, _ in sel.select(60):
            s = key.fileobj
            try:
                data = s.recv(65536)
            except ssl.SSLWantReadError:     # a TLS record not whole yet (or a ticket alone)
                continue
            if not data:
                raise SystemExit("the gateway closed a connection")
            while isinstance(s, ssl.SSLSocket) and s.pending():   # decrypted already: no read event comes
                data += s.recv(65536)
            buf = pending[s] + data
            while True:
                whole, buf = read_answer(buf)
                if not whole:
                    break
                done += 1
                if sent < total:
                    s.sendall(request)
                    sent += 1
            pending[s] = buf
    sel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000, help="requests counted (after a warm-up)")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--jwt", action="store_true", help="JWT + per-user rate limit (anchors-gateway-jwt.yaml)")
    parser.add_argument("--compose", action="store_true", help="a composed route of 3 calls (anchors-compose.yaml)")
    parser.add_argument("--cache", action="store_true", help="the route with cache: {ttl: 1h} (hits after the first)")
    parser.add_argument("--trace", type=float, metavar="RATIO",
                        help="tracing: on at this sample_ratio, exporting to a local OTLP/HTTP sink (the export "
                             "thread's instructions are counted too)")
    parser.add_argument("--tls", action="store_true", help="the listener with tls: (HTTPS/1.1, Python's ssl clients)")
    parser.add_argument("--key", choices=("ec", "rsa"), default="ec", help="with --tls: ECDSA P-256 or RSA 2048")
    parser.add_argument("--handshake", action="store_true", help="with --tls: a new connection (full handshake) per request")
    parser.add_argument("--resume", action="store_true", help="with --tls: a new connection per request, session resumed")
    parser.add_argument("--rss", action="store_true", help="run the daemon without callgrind; print its RSS after the run")
    parser.add_argument("--keep", metavar="FILE", help="keep the callgrind output there (for callgrind_annotate)")
    args = parser.parse_args()
    if (args.handshake or args.resume) and not args.tls:
        parser.error("--handshake and --resume need --tls")
    response = RESPONSE
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
        if args.tls:
            cert, key = make_cert(work, args.key)
            listen = f'  - endpoint: "tcp:{port}:interface=127.0.0.1:backlog=4096"'
            config = re.sub(r'  - endpoint: "tcp:\d+:interface=127\.0\.0\.1:backlog=4096"',
                            f'{listen}\n    tls: {{certificates: [{{cert: "{cert}", key: "{key}"}}]}}', config, count=1)
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
        valgrind = [] if args.rss else ["valgrind", "--tool=callgrind", f"--callgrind-out-file={work}/cg.%p"]
        gateway = subprocess.Popen(
            [*valgrind, twistd, "-n", "--pidfile=", "txgateway", "--config", str(work / "gateway.yaml")],
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
        context = client_context(args.tls)

        sockets = [] if args.handshake or args.resume else open_connections(port, args.conns, context)

        def run(total: int) -> None:
            if args.handshake or args.resume:
                drive_new_connections(port, total, request, context, args.resume)  # type: ignore[arg-type]
            else:
                drive(sockets, total, request)

        run(100 if args.handshake or args.resume else 500)          # warm-up
        if args.rss:
            run(args.n)
            rss = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{gateway.pid}/status").read_text(), re.M)
            print(f"daemon RSS after {args.n} requests: {int(rss.group(1)) / 1024:.1f} MiB")
            return
        subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run(args.n)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(work.glob(f"cg.{gateway.pid}.*"))
        totals = re.search(r"^(?:summary|totals): (\d+)", dumps[-1].read_text(), re.M)
        if args.keep:
            subprocess.run(["cp", str(dumps[-1]), args.keep], check=True)
        print(f"{int(totals.group(1)) // args.n} instructions per request (real daemon, user space, "
              f"{args.conns} connections, {'composed, 3 calls' if args.compose else 'JWT + limit' if args.jwt else 'plain proxy'}"
              f"{', cached' if args.cache else ''}"
              f"{f', TLS {args.key}' if args.tls else ''}"
              f"{', a full handshake each' if args.handshake else ', a resumed handshake each' if args.resume else ''}"
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
