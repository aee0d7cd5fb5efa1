#!/usr/bin/env python3
"""TLS benchmark (entry point: bench/run.sh tls). Uses bench.py.

tls  one gateway with a plain listener and a TLS listener (TLS 1.3 or 1.2 as the client
     negotiates, a self-signed RSA 2048 certificate made here with openssl) in front of the
     same upstream: wrk on GET /api/users/1 over plain HTTP and over HTTPS (HTTP/1.1
     keep-alive), ratio https/plain; then new handshakes: wrk with `Connection: close`, so
     every request is a new TCP connection and a full TLS handshake (connections per second),
     against the same without TLS.
"""

from __future__ import annotations

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench
from bench import RUN_DIR, Gateway, Upstream

PLAIN_PORT = int(bench._env("TLS_PLAIN_PORT", "19086"))
TLS_PORT = int(bench._env("TLS_PORT", "19443"))

def tls_yaml(cert: str, key: str) -> str:
    """bench.py's plain proxy config with a TLS listener next to the plain one."""
    plain = '  - endpoint: "tcp:{gw_port}:interface=127.0.0.1:backlog=4096"\n'
    assert plain in bench.GATEWAY_YAML
    tls = (f'  - endpoint: "tcp:{TLS_PORT}:interface=127.0.0.1:backlog=4096"\n'
           f'    tls:\n      certificates: [{{{{cert: "{cert}", key: "{key}"}}}}]\n')
    return bench.GATEWAY_YAML.replace(plain, plain + tls)


def make_cert() -> tuple[str, str]:
    cert, key = os.path.join(RUN_DIR, "localhost.pem"), os.path.join(RUN_DIR, "localhost.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", key, "-out", cert],
                   check=True, capture_output=True)
    return cert, key


def scenario_tls(up: Upstream) -> dict:
    cert, key = make_cert()
    gw = Gateway("tls", up, tls_yaml(cert, key), PLAIN_PORT)
    gw.start()
    close = {"Connection": "close"}
    rows = [("plain", f"http://127.0.0.1:{gw.port}/api/users/1", None),
            ("https", f"https://127.0.0.1:{TLS_PORT}/api/users/1", None),
            ("plain-new-conn", f"http://127.0.0.1:{gw.port}/api/users/1", close),
            ("https-handshake", f"https://127.0.0.1:{TLS_PORT}/api/users/1", close)]
    results: dict = {}
    try:
        for c in bench.CONNS:
            level: dict = {}
            for name, url, headers in rows:
                if bench.WARMUP > 0:
                    bench.wrk_run(name, url, c, bench.WARMUP, "warmup", 0, gw, up, headers)
                runs = [bench.wrk_run(name, url, c, bench.DURATION, "measured", i, gw, up, headers)
                        for i in range(1, bench.RUNS + 1)]
                level[name] = bench.summarize_level(runs)
            for name, base in (("https", "plain"), ("https-handshake", "plain-new-conn")):
                a, b = level[name].get("rps"), level[base].get("rps")
                level[name]["ratio"] = round(a / b, 3) if a and b else None
            results[c] = level
    finally:
        shutdown = gw.stop()
    return {"levels": results, "shutdown": shutdown}


def report(summary: dict) -> str:
    out = [f"txgateway TLS bench {bench.STAMP} ({summary['env']['cpu']}; {summary['env']['commit']})", "",
           "GET /api/users/1 through one gateway; https-handshake: every request a new connection and TLS handshake",
           f"{'conns':>5} {'row':<16} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} {'errors':>6}"]
    for c, level in summary.get("tls", {}).get("levels", {}).items():
        for name, s in level.items():
            out.append(f"{c:>5} {name:<16} {bench.fmt(s.get('rps'), ',.0f'):>9} {bench.fmt(s.get('p50_ms'), '.2f'):>7} "
                       f"{bench.fmt(s.get('p99_ms'), '.2f'):>7} {bench.fmt(s.get('ratio'), '.3f'):>6} {s.get('errors', '-'):>6}")
    out.append("ratio: https / plain (keep-alive), https-handshake / plain-new-conn (a new connection each)")
    out.append(f"details: {RUN_DIR}/")
    return "\n".join(out)


def main(argv: list[str]) -> int:
    up = Upstream()
    return bench.run_scenarios("tls", argv, {"tls": lambda: scenario_tls(up)}, [up], report)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
