"""In-process cost of one proxied request: the whole pipeline, no sockets, no kernel.

Drives the real HTTP1Connection -> Pipeline -> Proxy -> UpstreamConnection path with
in-memory transports, so the figure is the gateway's own CPU per request (Python), free
of loopback syscalls and of the machine's noise. Use it to compare changes:

    .venv/bin/python bench/micro.py                 # plain proxy route
    .venv/bin/python bench/micro.py --jwt           # + HS256 JWT (auth: required)
    .venv/bin/python bench/micro.py --jwt --limit   # + a per-user token bucket
    .venv/bin/python bench/micro.py --profile       # cProfile, top functions
    bench/micro.sh                                  # instructions per request (callgrind):
                                                    # repeatable on a noisy machine
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock

from txgateway.config.schema import parse_config
from txgateway.service.gateway import Gateway
from txgateway.service.tap import tune_gc
from txgateway.upstream.pool import UpstreamConnection

SECRET = "micro-benchmark-secret-0123456789abcdef"
CONFIG = """
listen: [{endpoint: "tcp:0"}]
access_log: %(log)s
trusted_proxies: [127.0.0.1/32]
%(auth)s
%(limits)s
upstreams:
  users: {targets: ["http://127.0.0.1:9"]}
routes:
  - prefix: /api/users
    upstream: users
    rewrite_prefix: /users
    request_headers: {set: {X-Api-Version: "2"}}
    response_headers: {remove: [X-Upstream-Debug]}
    %(route_auth)s
    %(route_limit)s
"""
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 29 Nov 2026 12:30:29 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: 11\r\nConnection: keep-alive\r\n\r\n{\"ok\":true}")


class MemoryTransport:
    """Just enough of a TCP transport for the gateway's protocols."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.disconnecting = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 40000)

    def setTcpNoDelay(self, flag: bool) -> None: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def registerProducer(self, producer: object, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...


class NullWriter:
    """Access-log observer that renders each line (the real cost) and drops it."""

    def __call__(self, event: dict) -> None:
        event["access"].json_line()

    def start(self) -> None: ...
    def stop(self) -> None: ...


def build(jwt: bool, log: bool, limit: bool = False) -> tuple[object, UpstreamConnection, bytes]:
    auth = "auth:\n  jwt: {algorithms: [HS256], secret_env: MICRO_SECRET}" if jwt else ""
    limits = "rate_limits:\n  tiers: {bench: {rate: 1000000000/minute}}" if limit else ""
    config = parse_config(CONFIG % {"auth": auth, "route_auth": "auth: required" if jwt else "",
                                    "limits": limits, "route_limit": "rate_limit: {key: user}" if limit else "",
                                    "log": '"off"'}, "micro", {"MICRO_SECRET": SECRET})
    clock = Clock()
    clock.advance(time.time())
    gateway = Gateway(config, reactor=None, clock=clock)
    if log:
        from txgateway.ops.accesslog import AccessLog
        gateway.pipeline.access_log = AccessLog(NullWriter())
    client = gateway.factory.buildProtocol(None)
    client.makeConnection(MemoryTransport())
    pool = gateway.proxy.groups["users"].pools[0]
    upstream = UpstreamConnection(pool, None)
    upstream.transport = MemoryTransport()
    upstream.open = True
    upstream.write = upstream.transport.write
    pool.total = 1
    pool.idle.append(upstream)
    request = b"GET /api/users/1 HTTP/1.1\r\nHost: 127.0.0.1:9200\r\nUser-Agent: wrk\r\nAccept: */*\r\n"
    if jwt:
        import jwt as pyjwt
        token = pyjwt.encode({"sub": "alice", "role": "admin", "tier": "pro", "exp": int(time.time()) + 3600},
                             SECRET, algorithm="HS256")
        request += b"Authorization: Bearer " + token.encode() + b"\r\n"
    return client, upstream, request + b"\r\n"


def run(n: int, jwt: bool, log: bool, limit: bool = False) -> float:
    client, upstream, request = build(jwt, log, limit)
    tune_gc()  # as the daemon does (tap._tune_for_throughput)
    feed_client, feed_upstream = client.dataReceived, upstream.dataReceived
    out = client.transport.written
    for _ in range(200):  # warm up (and prove it works)
        feed_client(request)
        feed_upstream(RESPONSE)
    assert out and out[-1].endswith(b'{"ok":true}'), out[-1:]
    start = time.perf_counter()
    for _ in range(n):
        feed_client(request)
        feed_upstream(RESPONSE)
        out.clear()
        upstream.transport.written.clear()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=50000)
    parser.add_argument("--jwt", action="store_true")
    parser.add_argument("--limit", action="store_true", help="a per-user token bucket on the route")
    parser.add_argument("--no-log", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--once", action="store_true", help="one run, no timing summary (for callgrind)")
    args = parser.parse_args()
    if args.profile:
        import cProfile
        import pstats
        cProfile.runctx("run(args.n, args.jwt, not args.no_log, args.limit)", globals(), {"args": args, "run": run}, "/tmp/micro.prof")
        pstats.Stats("/tmp/micro.prof").sort_stats("tottime").print_stats(30)
        return
    if args.once:
        run(args.n, args.jwt, not args.no_log, args.limit)
        return
    best = min(run(args.n, args.jwt, not args.no_log, args.limit) for _ in range(3))
    print(f"{best:.1f} us per request (best of 3 x {args.n}), jwt={args.jwt}, limit={args.limit}, "
          f"access_log={not args.no_log}")


if __name__ == "__main__":
    main()
