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
    .venv/bin/python bench/macro.py --cache-miss --full --max-memory 8MiB --cache-sim
                                                       # the same on a full store: each counted miss also evicts
    .venv/bin/python bench/macro.py --json             # plain route, a 2 KiB JSON answer (--transform's baseline)
    .venv/bin/python bench/macro.py --transform        # the same with transform: allow + rename + add
    .venv/bin/python bench/macro.py --trace 0.01       # tracing: on, sample_ratio 0.01, a local OTLP sink
    .venv/bin/python bench/macro.py --tls              # HTTP/1.1 over TLS (ALPN h2 + http/1.1 listener)
    .venv/bin/python bench/macro.py --h2 --streams 10  # HTTP/2 over the same listener, 10 streams a connection
    .venv/bin/python bench/macro.py --h2 --conns 1 --streams 100
    .venv/bin/python bench/macro.py --h2 --keep /tmp/h2.cg   # then: callgrind_annotate /tmp/h2.cg
    .venv/bin/python bench/macro.py --tls --handshake  # a new connection (full handshake) per request
    .venv/bin/python bench/macro.py --tls --resume     # a new connection per request, the session resumed
    .venv/bin/python bench/macro.py --tls --key rsa    # an RSA 2048 certificate (default: ECDSA P-256)
    .venv/bin/python bench/macro.py --tls --rss        # no callgrind: the daemon's RSS after the run
    .venv/bin/python bench/macro.py --tls --handshake --tls12 --rss -n 20000   # TLS 1.2 without tickets
    .venv/bin/python bench/macro.py -n 3000 --conns 16
    .venv/bin/python bench/macro.py --keep /tmp/cg.out     # then: callgrind_annotate --inclusive=yes /tmp/cg.out
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
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



_serial = itertools.count(1)       # drive(unique=True)'s `?n=`: never repeated in one run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen, seconds: float, hint: str) -> None:
    """Until the gateway `process` accepts connections on `port` (SystemExit if it dies or is late)."""
    deadline = time.time() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            if time.time() > deadline or process.poll() is not None:
                raise SystemExit(f"the gateway did not start: {hint}") from None
            time.sleep(0.3)


def make_cert(work: Path, kind: str) -> tuple[Path, Path]:
    """A self-signed certificate for localhost: ECDSA P-256 or RSA 2048."""
    cert, key = work / "localhost.pem", work / "localhost.key"
    new_key = ["-newkey", "rsa:2048"] if kind == "rsa" else ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    subprocess.run(["openssl", "req", "-x509", *new_key, "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


def drive_new_connections(port: int, total: int, request: bytes, resume: bool, tls12: bool) -> None:
    """`total` requests, one at a time, each on a new TLS connection: a full handshake each, or
    (`resume`) an abbreviated one on the session of the connection before. `tls12`: TLS 1.2
    without session tickets, so each session is one the server's cache would keep (Python's
    client does not resume them here: with `--resume` this stops; `openssl s_client
    -no_ticket` does, tests/integration/test_tls_defaults.py)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        context.options |= ssl.OP_NO_TICKET
    session = None
    for _ in range(total):
        s = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost",
                                session=session if resume else None)
        s.sendall(request)
        buf = b""
        while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"(?i)content-length: *(\d+)", buf).group(1)):
            data = s.recv(65536)
            if not data:
                raise SystemExit("the gateway closed a connection")
            buf += data
        if not buf.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {buf[:80]!r}")
        if resume and session is not None and not s.session_reused:
            raise SystemExit("the TLS session was not resumed")
        session = s.session
        s.close()


def metric(admin: int, name: str) -> float:
    """A counter of the gateway's /metrics (summed over its labels)."""
    conn = http.client.HTTPConnection("127.0.0.1", admin, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def rss_mib(pid: int) -> float:
    rss = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(rss.group(1)) / 1024


def rss_parts(pid: int) -> str:
    """Where the RSS is, from /proc/PID/smaps: malloc's heap, anonymous mappings (Python's
    arenas, large mallocs, thread stacks), mapped files (code)."""
    parts = {"heap": 0, "anon": 0, "files": 0}
    kind = "anon"
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            name = fields[5] if len(fields) > 5 else ""
            kind = "heap" if name == "[heap]" else "files" if name.startswith("/") else "anon"
        elif fields[0] == "Rss:":
            parts[kind] += int(fields[1])
    return ", ".join(f"{k} {v / 1024:.1f}" for k, v in parts.items())


def connect_one(port: int, alpn: str | None) -> socket.socket:
    """A connection to the gateway: plain, or TLS offering `alpn` (handshake done, non-blocking)."""
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if alpn is not None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols([alpn])
        s = context.wrap_socket(s, server_hostname="localhost")
        if s.selected_alpn_protocol() != alpn:
            raise SystemExit(f"the gateway did not choose ALPN {alpn}")
    s.setblocking(False)
    return s


def receive(s: socket.socket) -> bytes:
    """What arrived (all TLS records already read: select would not see what ssl buffered)."""
    try:
        data = s.recv(65536)
    except ssl.SSLWantReadError:
        return b""
    if not data:
        raise SystemExit("the gateway closed a connection")
    while isinstance(s, ssl.SSLSocket) and s.pending():
        data += s.recv(65536)
    return data


def connect(port: int, conns: int, alpn: str | None = None) -> list[socket.socket]:
    """`conns` keep-alive connections, kept from the warm-up into the counted run: the count is
    then of requests alone, not of accepting connections (256 of them over 3000 requests
    would add ~5k a request)."""
    return [connect_one(port, alpn) for _ in range(conns)]


def drive(socks: list[socket.socket], total: int, request: bytes, unique: bool = False) -> None:
    """`total` requests over `socks`, one outstanding per connection; `unique`: each with a query
    of its own (`?n=...`), so a cached route never has it stored."""
    template = request.replace(b" HTTP/1.1", b"?n=%d HTTP/1.1", 1) if unique else request

    def send(s: socket.socket) -> None:
        s.sendall(template % next(_serial) if unique else template)

    sel = selectors.DefaultSelector()
    pending = {}
    for s in socks:
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
            buf = pending[s] + receive(s)
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
    sel.close()


def drive_h2(port: int, total: int, conns: int, streams: int, path: bytes) -> None:
    """`total` requests over `conns` HTTP/2 connections (TLS, ALPN h2), `streams` outstanding on
    each: a new stream opens as soon as one ends, like h2load -m."""
    from h2.config import H2Configuration
    from h2.connection import H2Connection
    from h2.events import DataReceived, ResponseReceived, StreamEnded, StreamReset

    headers = [(b":method", b"GET"), (b":path", path), (b":scheme", b"https"), (b":authority", b"127.0.0.1"),
               (b"user-agent", b"macro"), (b"accept", b"*/*")]
    sel = selectors.DefaultSelector()
    clients = {}
    for _ in range(conns):
        s = connect_one(port, "h2")
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sel.register(s, selectors.EVENT_READ)
        clients[s] = conn
    sent = done = 0

    def open_stream(conn: H2Connection) -> None:
        nonlocal sent
        conn.send_headers(conn.get_next_available_stream_id(), headers, end_stream=True)
        sent += 1

    for s, conn in clients.items():
        for _ in range(streams):
            if sent < total:
                open_stream(conn)
        s.sendall(conn.data_to_send())
    while done < total:
        for key, _ in sel.select(60):
            s = key.fileobj
            conn = clients[s]
            for event in conn.receive_data(receive(s)):
                if isinstance(event, ResponseReceived):
                    if dict(event.headers)[b":status"] != b"200":
                        raise SystemExit(f"unexpected answer: {event.headers!r}")
                elif isinstance(event, DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, StreamEnded):
                    done += 1
                    if sent < total:
                        open_stream(conn)
                elif isinstance(event, StreamReset):
                    raise SystemExit(f"the gateway reset a stream: {event!r}")
            out = conn.data_to_send()
            if out:
                s.sendall(out)
    for s in clients:
        s.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=3000, help="requests counted (after a warm-up)")
    parser.add_argument("--conns", type=int, default=16)
    parser.add_argument("--cache-sim", action="store_true",
                        help="also simulate the caches: data-cache misses per request (memory touched per request; "
                             "what grows with --conns when instructions do not)")
    parser.add_argument("--keep", metavar="FILE", help="copy the callgrind dump here (for callgrind_annotate)")
    parser.add_argument("--jwt", action="store_true", help="JWT + per-user rate limit (anchors-gateway-jwt.yaml)")
    parser.add_argument("--compose", action="store_true", help="a composed route of 3 calls (anchors-compose.yaml)")
    parser.add_argument("--cache", action="store_true", help="the route with cache: {ttl: 1h} (hits after the first)")
    parser.add_argument("--cache-miss", action="store_true",
                        help="the route cached, every request a new query: each one a miss that stores its response")
    parser.add_argument("--max-memory", metavar="SIZE",
                        help="with --cache/--cache-miss: the cache section's max_memory (e.g. 16MiB; default the gateway's)")
    parser.add_argument("--full", action="store_true",
                        help="with --cache-miss: fill the store to max_memory first (not counted, callgrind's "
                             "instrumentation off), so every counted miss also evicts the oldest entry")
    parser.add_argument("--unique", action="store_true", help="every request a new query (implied by --cache-miss)")
    parser.add_argument("--json", action="store_true", help="the plain route answering a 2 KiB JSON object")
    parser.add_argument("--transform", action="store_true",
                        help="--json with transform: allow + rename + add on the route")
    parser.add_argument("--trace", type=float, metavar="RATIO",
                        help="tracing: on at this sample_ratio, exporting to a local OTLP/HTTP sink (the export "
                             "thread's instructions are counted too)")
    parser.add_argument("--tls", action="store_true",
                        help="HTTP/1.1 over TLS (ECDSA P-256, a listener with ALPN h2 + http/1.1)")
    parser.add_argument("--h2", action="store_true", help="HTTP/2 over TLS, the same listener as --tls")
    parser.add_argument("--streams", type=int, default=10, help="--h2: concurrent streams per connection")
    parser.add_argument("--key", choices=("ec", "rsa"), default="ec", help="with --tls/--h2: ECDSA P-256 or RSA 2048")
    parser.add_argument("--handshake", action="store_true", help="with --tls: a new connection (full handshake) per request")
    parser.add_argument("--resume", action="store_true", help="with --tls: a new connection per request, session resumed")
    parser.add_argument("--tls12", action="store_true",
                        help="with --handshake: TLS 1.2 without tickets (sessions only the server's cache could resume)")
    parser.add_argument("--rss", action="store_true", help="run the daemon without callgrind; print its RSS after the run")
    args = parser.parse_args()
    args.unique = args.unique or args.cache_miss
    args.cache = args.cache or args.cache_miss
    tls = args.tls or args.h2
    if args.full and not args.cache_miss:
        parser.error("--full needs --cache-miss")
    if (args.handshake or args.resume) and not args.tls:
        parser.error("--handshake and --resume need --tls")
    new_connections = args.handshake or args.resume
    response = RESPONSE
    if args.json or args.transform:
        response = RESPONSE.replace(b"Content-Length: 11", b"Content-Length: %d" % len(JSON_BODY)) \
            .replace(b'{"ok":true}', JSON_BODY)
    if args.cache:     # a current Date: the ttl heuristic then keeps the response fresh (an old one is stale)
        from email.utils import formatdate
        response = RESPONSE.replace(b"Sun, 29 Nov 2026 12:30:29 GMT", formatdate(usegmt=True).encode())
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM % response], stdout=subprocess.PIPE, text=True)
    collector = subprocess.Popen([sys.executable, str(ROOT / "bench" / "otlp-sink.py"), "0"], stdout=subprocess.PIPE, text=True) \
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
        # Under callgrind the daemon runs ~50x slower: the default 1 s to connect is 20 ms of its
        # time, too short for --conns 256 opening 256 upstream connections in one turn (504s).
        config = config.replace("    timeout: 30s\n", "    timeout: 30s\n    connect_timeout: 60s\n")
        config = re.sub(r"access_log: \S+", f"access_log: {work / 'access.log'}", config)
        if tls:
            cert, key = make_cert(work, args.key)
            config = re.sub(r'(  - endpoint: "tcp:\d+:interface=[^"]*")',
                            rf'\1\n    tls: {{certificates: [{{cert: {cert}, key: {key}}}], alpn: [h2, http/1.1]}}',
                            config)
        if args.cache:
            config = config.rstrip("\n") + "\n    cache: {ttl: 1h}\n"
            if args.max_memory:
                config += f"cache: {{max_memory: {args.max_memory}}}\n"
        admin = free_port() if args.full else None
        if admin is not None:       # /metrics: the store's evictions
            config += f'admin: {{endpoint: "tcp:{admin}:interface=127.0.0.1"}}\n'
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
            # --cache-sim: L1 as valgrind finds it, the last level as this VM's per-core L2 (1 MiB,
            # lscpu): what a bigger working set per request misses first.
            [*([] if args.rss else ["valgrind", "--tool=callgrind",
                                    *(["--instr-atstart=no"] if args.full and not args.rss else []),
                                    *(["--cache-sim=yes", "--LL=1048576,16,64"] if args.cache_sim else []),
                                    f"--callgrind-out-file={work}/cg.%p"]),
             twistd, "-n", "--pidfile=", "txgateway", "--config", str(work / "gateway.yaml")],
            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=open(work / "valgrind.log", "w"))
        # callgrind on a busy machine (--cache-sim more so) starts slowly
        wait_listening(port, gateway, 300, f"see {work}/valgrind.log")
        socks = [] if args.h2 or new_connections else connect(port, args.conns, "http/1.1" if tls else None)

        def run(total: int) -> None:
            if args.h2:
                drive_h2(port, total, args.conns, args.streams, path)
            elif new_connections:
                drive_new_connections(port, total, request, args.resume, args.tls12)
            else:
                drive(socks, total, request, args.unique)
        if admin is not None:
            # Uninstrumented (~10x faster under valgrind), until the store evicts: then it is full.
            while metric(admin, "txgateway_cache_evictions_total") == 0:
                run(2000)
            if not args.rss:
                subprocess.run(["callgrind_control", "-i", "on", str(gateway.pid)], check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run(100 if new_connections else max(500, 2 * args.conns))   # warm-up: every connection used
        evicted = metric(admin, "txgateway_cache_evictions_total") if admin is not None else 0.0
        if args.rss:
            warm = rss_mib(gateway.pid)
            run(args.n)
            print(f"daemon RSS after {args.n} requests: {rss_mib(gateway.pid):.1f} MiB, {warm:.1f} after the warm-up "
                  f"({rss_parts(gateway.pid)})")
            return
        subprocess.run(["callgrind_control", "-z", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run(args.n)
        subprocess.run(["callgrind_control", "-d", str(gateway.pid)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dumps = sorted(work.glob(f"cg.{gateway.pid}.*"))
        dump = dumps[-1].read_text()
        totals = re.search(r"^(?:summary|totals): (\d+)", dump, re.M)
        if args.keep:
            subprocess.run(["cp", str(dumps[-1]), args.keep], check=True)
        print(f"{int(totals.group(1)) // args.n} instructions per request (real daemon, user space, "
              f"{args.conns} connections, {'composed, 3 calls' if args.compose else 'JWT + limit' if args.jwt else 'plain proxy'}"
              f"{', cached, every request a miss' if args.cache_miss else ', cached' if args.cache else ''}"
              f"{', unique queries' if args.unique and not args.cache_miss else ''}"
              f"{f', HTTP/2 over TLS, {args.streams} streams each' if args.h2 else ', HTTP/1.1 over TLS' if args.tls else ''}"
              f"{f' ({args.key})' if tls else ''}"
              f"{', a full handshake each' if args.handshake else ', a resumed handshake each' if args.resume else ''}"
              f"{', 2 KiB JSON' if args.json or args.transform else ''}{', transformed' if args.transform else ''}"
              f"{f', traced at sample_ratio {args.trace}' if args.trace is not None else ''})")
        for s in socks:
            s.close()
        if admin is not None:
            evictions = metric(admin, "txgateway_cache_evictions_total") - evicted
            print(f"  on a full store: {evictions / args.n:.2f} evictions per request, "
                  f"{metric(admin, 'txgateway_cache_stored_bytes') / 2**20:.1f} MiB stored")
        if args.cache_sim:
            names = re.search(r"^events: (.+)$", dump, re.M).group(1).split()
            counts = dict(zip(names, map(int, re.search(r"^summary: (.+)$", dump, re.M).group(1).split()), strict=True))
            caches = "; ".join(re.findall(r"^desc: ((?:D1|LL) cache: .+)$", dump, re.M))
            print(f"  per request: {(counts['D1mr'] + counts['D1mw']) / args.n:.0f} L1 data misses, "
                  f"{(counts['DLmr'] + counts['DLmw']) / args.n:.0f} L2 data misses (simulated {caches})")
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
