"""Syscalls per request of the real daemon (no valgrind): `strace -c -f` around macro.py's driver.

What callgrind (bench/macro.py) does not see: the kernel's side. Compare connection counts,
e.g. whether anything per request grows from 32 to 256 connections:

    .venv/bin/python bench/syscalls.py 32
    .venv/bin/python bench/syscalls.py 256 20000
    .venv/bin/python bench/syscalls.py --cache 32     # the route cached: every counted request a hit

It drives the daemon as fast as one Python client can: on the shared machine it is short
(seconds), and its figures are counts, not speed.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from email.utils import formatdate
from pathlib import Path

import macro

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    cache = "--cache" in sys.argv
    args = [a for a in sys.argv[1:] if a != "--cache"]
    conns = int(args[0]) if len(args) > 0 else 32
    total = int(args[1]) if len(args) > 1 else 10000
    response = macro.RESPONSE
    if cache:       # a current Date, as macro.py --cache: the route's ttl then keeps it fresh
        response = response.replace(b"Sun, 29 Nov 2026 12:30:29 GMT", formatdate(usegmt=True).encode())
    upstream = subprocess.Popen([sys.executable, "-c", macro.UPSTREAM % response], stdout=subprocess.PIPE,
                                text=True)
    work = Path(tempfile.mkdtemp(prefix="txgw-syscalls-"))
    gateway = None
    try:
        upstream_port = int(upstream.stdout.readline())
        port = macro.free_port()
        config = (ROOT / "bench" / "anchors-gateway.yaml").read_text()
        config = re.sub(r"tcp:\d+:interface", f"tcp:{port}:interface", config)
        config = config.replace("http://127.0.0.1:9001", f"http://127.0.0.1:{upstream_port}")
        config = re.sub(r"access_log: \S+", f"access_log: {work / 'access.log'}", config)
        if cache:
            config = config.rstrip("\n") + "\n    cache: {ttl: 1h}\n"
        (work / "gateway.yaml").write_text(config)
        gateway = subprocess.Popen([str(Path(sys.executable).parent / "twistd"), "-n", "--pidfile=", "txgateway",
                                    "--config", str(work / "gateway.yaml")],
                                   cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        macro.wait_listening(port, gateway, 60, "run it by hand to see why")
        request = b"GET /api/users/1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: macro\r\nAccept: */*\r\n\r\n"
        socks = macro.connect(port, conns)
        macro.drive(socks, max(2000, 2 * conns), request)          # warm-up: every connection used
        strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(gateway.pid), "-o", str(work / "strace.txt")],
                                  stderr=subprocess.DEVNULL)
        time.sleep(1.0)                                              # attached
        macro.drive(socks, total, request)
        strace.send_signal(signal.SIGINT)
        strace.wait()
        for s in socks:
            s.close()
        print(f"syscalls per request ({conns} connections, {total} requests{', cached: hits' if cache else ''}):")
        for line in (work / "strace.txt").read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
            if m:
                print(f"  {m.group(2):16s} {int(m.group(1)) / total:6.2f}")
    finally:
        if gateway is not None:
            gateway.terminate()
            gateway.wait(30)
        upstream.kill()
        subprocess.run(["rm", "-rf", str(work)])


if __name__ == "__main__":
    main()
