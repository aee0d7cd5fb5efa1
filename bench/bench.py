#!/usr/bin/env python3
"""txgateway's own benchmark (standard library only). Entry point: bench/run.sh.

  bench.py [proxy] [stream]        (default: proxy)

proxy   wrk -> upstream nginx directly, and wrk -> txgateway -> the same nginx, on
        GET /users/1 (small JSON), at each connection level of CONNS; RUNS measured runs
        per level (direct and gateway interleaved), medians reported, plus the ratio
        gateway/direct and the gateway's RSS.
stream  one STREAM_SIZE (1 GiB) response streamed through the gateway to a client that
        reads at STREAM_RATES MiB/s (0 = as fast as it can): the gateway's peak RSS sampled
        during the transfer, and the throughput.

Pinning: the gateway on GATEWAY_CPU (1), wrk, the upstream nginx, the stream client and
this script on CLIENT_CPU (0). Everything started here is stopped by PID at the end.
Results: bench/out/<stamp>/ (summary.txt, summary.json, results.jsonl, raw wrk output,
logs); bench/out/latest points at the last run.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value if value else default


def _size(text: str) -> int:
    m = re.fullmatch(r"(?i)\s*(\d+)\s*([kmg]?)i?b?\s*", text)
    if not m:
        raise SystemExit(f"bad size {text!r} (examples: 1G, 256M, 4096)")
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2).lower()]


DURATION = int(_env("DURATION", "10"))
WARMUP = int(_env("WARMUP", "2"))
RUNS = int(_env("RUNS", "3"))
CONNS = [int(c) for c in _env("CONNS", "32 256").replace(",", " ").split()]
WRK_THREADS = _env("WRK_THREADS", "1")
CLIENT_CPU = _env("CLIENT_CPU", "0")
GATEWAY_CPU = _env("GATEWAY_CPU", "1")
UPSTREAM_PORT = int(_env("UPSTREAM_PORT", "19001"))
GATEWAY_PORT = int(_env("GATEWAY_PORT", "19080"))
QUIET_WAIT = float(_env("QUIET_WAIT", "20"))        # s to wait for idle cores before a run; 0 = off
QUIET_BUSY = float(_env("QUIET_BUSY", "20"))        # "idle" = every core below this % busy
STREAM_SIZE = _size(_env("STREAM_SIZE", "1G"))
STREAM_RATES = [float(r) for r in _env("STREAM_RATES", "100 0").replace(",", " ").split()]
STREAM_CHUNK = 64 * 1024
RSS_TARGET_MIB = float(_env("RSS_TARGET_MIB", "100"))
TWISTD = _env("TWISTD", os.path.join(ROOT, ".venv", "bin", "twistd"))
NGINX = _env("NGINX", "nginx")
OUT = _env("BENCH_OUT", os.path.join(HERE, "out"))
STAMP = time.strftime("%Y%m%d-%H%M%S")
RUN_DIR = os.path.join(OUT, STAMP)
LUA = os.path.join(HERE, "report.lua")
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Sent by wrk and the checks: the gateway trusts 127.0.0.1 (trusted_proxies), so it must
# take the client address from this header (checked in the access log).
FORWARDED_FOR = "203.0.113.7"

STARTED: list[subprocess.Popen] = []   # stopped by PID in stop_all()
RESULTS: list[dict] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# /proc helpers
# --------------------------------------------------------------------------------------------

def proc_ticks(pid: int) -> int:
    """utime + stime of one process (the gateway is one process: twistd, no workers)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return int(rest[11]) + int(rest[12])
    except (OSError, IndexError):
        return 0


def proc_status_kib(pid: int, field: str) -> int:
    """VmRSS / VmHWM (peak RSS since start) of pid, in KiB; 0 if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_stat() -> dict[str, tuple[int, int, int]]:
    """cpuN -> (busy ticks, total ticks, steal ticks)."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                parts = line.split()
                v = [int(x) for x in parts[1:]] + [0] * 8
                user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
                busy = user + nice + system + irq + softirq + steal
                out[parts[0]] = (busy, busy + idle + iowait, steal)
    return out


def core_busy(before: dict, after: dict) -> dict[str, dict[str, float]]:
    res = {}
    for cpu in sorted(after):
        b0, t0, s0 = before[cpu]
        b1, t1, s1 = after[cpu]
        dt = max(t1 - t0, 1)
        res[cpu] = {"busy": round(100.0 * (b1 - b0) / dt, 1), "steal": round(100.0 * (s1 - s0) / dt, 1)}
    return res


def wait_quiet() -> None:
    """Wait (up to QUIET_WAIT s) until no core is busier than QUIET_BUSY %: the machine is shared."""
    if QUIET_WAIT <= 0:
        return
    deadline = time.monotonic() + QUIET_WAIT
    while True:
        s0 = cpu_stat()
        time.sleep(0.5)
        busy = core_busy(s0, cpu_stat())
        worst = max(v["busy"] for v in busy.values())
        if worst <= QUIET_BUSY:
            return
        if time.monotonic() > deadline:
            cores = ", ".join(f"{k} {v['busy']:.0f}%" for k, v in busy.items())
            log(f"  machine not quiet after {QUIET_WAIT:.0f}s ({cores}); measuring anyway")
            return


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------

def start(cmd: list[str], cpu: str, logfile: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start cmd pinned to cpu (taskset execs it, so the PID is the command's own)."""
    out = open(logfile, "ab")
    p = subprocess.Popen(["taskset", "-c", cpu, *cmd], stdout=out, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True, cwd=RUN_DIR,
                         env={**os.environ, **env} if env else None)
    out.close()
    STARTED.append(p)
    return p


def stop(p: subprocess.Popen, grace: float = 15.0) -> int | None:
    """SIGTERM, wait, then SIGKILL: only this PID (nginx's master takes its worker with it)."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"pid {p.pid} ignored SIGTERM for {grace:.0f}s: SIGKILL")
            p.kill()
            p.wait(5)
    if p in STARTED:
        STARTED.remove(p)
    return p.returncode


def stop_all() -> None:
    for p in list(reversed(STARTED)):
        stop(p)


def port_busy(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def get(port: int, path: str, headers: dict[str, str] | None = None,
        conn: http.client.HTTPConnection | None = None) -> tuple[int, dict[str, str], bytes]:
    c = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        body = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, body
    finally:
        if conn is None:
            c.close()


def wait_http(port: int, path: str, proc: subprocess.Popen, logfile: str, what: str,
              headers: dict[str, str] | None = None) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode} during start-up; log {logfile}:\n"
                             + tail(logfile))
        try:
            if get(port, path, headers)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{what} did not answer 200 on :{port}{path} within 30s; log {logfile}:\n" + tail(logfile))


def tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------------------------
# Upstream (nginx) and gateway
# --------------------------------------------------------------------------------------------

NGINX_CONF = """\
# Upstream for txgateway's bench (generated by bench/bench.py). One worker, pinned with
# the load generator on CPU {cpu}. As the peer harness's own upstream, plus a
# header the gateway's response rule removes, a header echo and a file area for streaming.
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    # The gateway keeps pooled connections: never close them on a request count.
    keepalive_requests 10000000;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        default_type application/json;
        location = /users/1 {{
            add_header X-Upstream-Debug "1" always;
            return 200 '{{"ok":true}}';
        }}
{locations}        location = /users/echo-headers {{
            return 200 '{{"x_api_version":"$http_x_api_version","x_forwarded_for":"$http_x_forwarded_for"}}';
        }}
        location /files/ {{
            alias {files}/;
            default_type application/octet-stream;
        }}
        # accepts / requests counters: upstream requests per TCP connection (pool reuse)
        location = /__status {{ stub_status; }}
        location / {{ return 404 '{{"error":"not found"}}'; }}
    }}
}}
"""

GATEWAY_YAML = """\
# txgateway config for bench/run.sh (generated by bench/bench.py; edit the template there).
# A plain proxy route with every core feature of this version on: trusted_proxies, a
# request_headers `set` rule, a response_headers `remove` rule, the access log to a file.
listen:
  - endpoint: "tcp:{gw_port}:interface=127.0.0.1:backlog=4096"
trusted_proxies: [127.0.0.1/32]
access_log: {access_log}
drain_timeout: 2s
upstreams:
  bench:
    targets: ["http://127.0.0.1:{up_port}"]
    timeout: 30s
routes:
  - prefix: /api/users
    upstream: bench
    rewrite_prefix: /users
    request_headers: {{set: {{X-Api-Version: "2"}}}}
    response_headers: {{remove: [X-Upstream-Debug]}}
  - prefix: /api/files
    upstream: bench
    rewrite_prefix: /files
    request_headers: {{set: {{X-Api-Version: "2"}}}}
    response_headers: {{remove: [X-Upstream-Debug]}}
"""


class Upstream:
    """The upstream nginx; `locations` (nginx config text) adds locations of a scenario's own."""

    def __init__(self, port: int = UPSTREAM_PORT, name: str = "nginx", locations: str = "") -> None:
        self.dir = os.path.join(RUN_DIR, name)
        self.files = os.path.join(OUT, "files")
        self.port = port
        self.locations = locations
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        for d in ("tmp/body", "tmp/proxy", "tmp/fastcgi", "tmp/uwsgi", "tmp/scgi"):
            os.makedirs(os.path.join(self.dir, d), exist_ok=True)
        os.makedirs(self.files, exist_ok=True)
        conf = os.path.join(self.dir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(cpu=CLIENT_CPU, dir=self.dir, port=self.port, files=self.files,
                                      locations=self.locations))
        if port_busy(self.port):
            raise SystemExit(f"port {self.port} is already in use (set UPSTREAM_PORT)")
        logfile = os.path.join(self.dir, "stderr.log")
        self.proc = start([NGINX, "-p", self.dir + "/", "-e", os.path.join(self.dir, "error.log"),
                           "-c", conf, "-g", "daemon off;"], CLIENT_CPU, logfile)
        wait_http(self.port, "/users/1", self.proc, logfile, "upstream nginx")
        log(f"upstream nginx pid {self.proc.pid} on 127.0.0.1:{self.port} (CPU {CLIENT_CPU})")

    def status(self) -> tuple[int, int] | None:
        """(accepts, requests) from stub_status, or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/__status", timeout=5) as r:
                accepts, _handled, requests = map(int, r.read().decode().splitlines()[2].split())
            return accepts, requests
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


class Gateway:
    """One twistd txgateway process; `yaml` (default GATEWAY_YAML) is formatted with gw_port,
    up_port and access_log; `headers` go with the start-up check (e.g. a bearer token)."""

    def __init__(self, name: str, upstream: Upstream, yaml: str = GATEWAY_YAML, port: int = GATEWAY_PORT,
                 headers: dict[str, str] | None = None, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.port = port
        self.yaml = yaml
        self.headers = headers
        self.env = env
        self.config = os.path.join(RUN_DIR, f"gateway-{name}.yaml")
        self.access_log = os.path.join(RUN_DIR, f"access-{name}.log")
        self.logfile = os.path.join(RUN_DIR, f"gateway-{name}.log")
        self.upstream = upstream
        self.proc: subprocess.Popen | None = None
        self.log_offset = 0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.config, "w") as f:
            f.write(self.yaml.format(gw_port=self.port, up_port=self.upstream.port,
                                     access_log=json.dumps(self.access_log)))
        if port_busy(self.port):
            raise SystemExit(f"port {self.port} is already in use (set GATEWAY_PORT)")
        self.proc = start([TWISTD, "-n", "--pidfile=", "txgateway", "--config", self.config],
                          GATEWAY_CPU, self.logfile, self.env)
        wait_http(self.port, "/api/users/1", self.proc, self.logfile, "txgateway", self.headers)
        log(f"txgateway pid {self.proc.pid} on 127.0.0.1:{self.port} (CPU {GATEWAY_CPU}), "
            f"config {self.config}, log {self.logfile}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def hwm_mib(self) -> float:
        return proc_status_kib(self.pid, "VmHWM") / 1024

    def new_problems(self) -> list[str]:
        """Log lines since the last call that look like trouble (warnings, errors, tracebacks)."""
        try:
            with open(self.logfile, "rb") as f:
                f.seek(self.log_offset)
                data = f.read()
        except OSError:
            return []
        self.log_offset += len(data)
        return [line for line in data.decode("utf-8", "replace").splitlines()
                if re.search(r"#(warn|error|critical)\]|Traceback|Unhandled|Error|exception", line)]

    def stop(self) -> str:
        """SIGTERM: the gateway drains and twistd exits 0 (logging `Server Shut Down.`)."""
        if self.proc is None:
            return "not running"
        rc = stop(self.proc)
        self.proc = None
        clean = "Server Shut Down." in tail(self.logfile, 5)
        return f"{'clean' if clean else 'NOT clean (no Server Shut Down. in the log)'}, exit {rc}"


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def access_log_lines(path: str) -> list[dict]:
    out = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"unparsable": line[:200]})
    except OSError:
        pass
    return out


def functional_checks(gw: Gateway, up: Upstream) -> dict[str, str]:
    """What the load exercises really happens: proxying, header rules, XFF trust, keep-alive, log."""
    checks = {}
    xff = {"X-Forwarded-For": FORWARDED_FOR}
    status, headers, body = get(up.port, "/users/1")
    checks["upstream sends X-Upstream-Debug"] = "yes" if "x-upstream-debug" in headers else "NO"
    status, headers, body = get(gw.port, "/api/users/1", xff)
    checks["gateway 200 + body"] = "yes" if status == 200 and body == b'{"ok":true}' else f"NO: {status} {body[:80]!r}"
    checks["response rule removed X-Upstream-Debug"] = "yes" if "x-upstream-debug" not in headers else "NO"
    status, headers, body = get(gw.port, "/api/users/echo-headers", xff)
    try:
        echo = json.loads(body)
    except ValueError:
        echo = {}
    checks["request rule set X-Api-Version: 2"] = "yes" if echo.get("x_api_version") == "2" else f"NO: {body[:120]!r}"
    checks["upstream saw X-Forwarded-For"] = echo.get("x_forwarded_for") or "NO"
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=5)
    try:
        get(gw.port, "/api/users/1", xff, conn)
        sock = conn.sock
        get(gw.port, "/api/users/1", xff, conn)
        checks["client keep-alive"] = "yes" if sock is not None and conn.sock is sock else "NO (new connection)"
    except (OSError, http.client.HTTPException) as e:
        checks["client keep-alive"] = f"NO: {e!r}"
    finally:
        conn.close()
    time.sleep(1.2)   # the access log flushes every 0.5 s
    lines = access_log_lines(gw.access_log)
    last = lines[-1] if lines else {}
    checks["access log written"] = f"yes ({len(lines)} lines)" if lines else "NO"
    checks["access log client_ip from trusted XFF"] = (
        "yes" if last.get("client_ip") == FORWARDED_FOR else f"NO: {last.get('client_ip')!r}")
    for k, v in checks.items():
        log(f"  check: {k}: {v}")
    return checks


# --------------------------------------------------------------------------------------------
# wrk
# --------------------------------------------------------------------------------------------

# Access-log fields counted by value after each measured run, besides `status`: the cache's
# verdict (HIT, MISS...) and the response's size (a transformed answer is smaller).
TALLIED_FIELDS = ("cache", "bytes_out")


def wrk_run(name: str, url: str, conns: int, duration: int, kind: str, run: int,
            gw: Gateway | None, up: Upstream, headers: dict[str, str] | None = None, script: str = LUA) -> dict:
    """One wrk run. A `script` other than report.lua gets a label of this run after `--`
    (row-c<conns>-<kind><run>, unique in a bench run: unique.lua puts it in its queries)."""
    cmd = ["taskset", "-c", CLIENT_CPU, "wrk", "-t", WRK_THREADS, "-c", str(conns), "-d", f"{duration}s",
           "--latency", "-s", script, "-H", f"X-Forwarded-For: {FORWARDED_FOR}", url]
    if script != LUA:
        cmd += ["--", f"{name}-c{conns}-{kind}{run}"]
    for key, value in (headers or {}).items():
        cmd[cmd.index(url):cmd.index(url)] = ["-H", f"{key}: {value}"]
    if kind == "measured":
        wait_quiet()
    if gw is not None:
        try:
            os.truncate(gw.access_log, 0)   # the gateway appends (O_APPEND): one run per file
        except OSError:
            pass
    st0 = up.status()
    gw0 = proc_ticks(gw.pid) if gw else 0
    cpu0 = cpu_stat()
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    wall = time.monotonic() - t0
    cpu1 = cpu_stat()
    gw1 = proc_ticks(gw.pid) if gw else 0
    st1 = up.status()
    raw = os.path.join(RUN_DIR, f"wrk-{name}-c{conns}-{kind}{run}.txt")
    with open(raw, "w") as f:
        f.write("$ " + " ".join(f"'{x}'" if " " in x else x for x in cmd) + "\n" + p.stdout + p.stderr)
    m = re.search(r"^WRKJSON (.*)$", p.stdout, re.M)
    row: dict = {"name": name, "conns": conns, "kind": kind, "run": run, "url": url, "raw": raw,
                 "ts": time.strftime("%H:%M:%S")}
    if p.returncode != 0 or not m:
        row["failed"] = f"wrk rc={p.returncode}: {(p.stderr or p.stdout).strip()[:300]}"
        log(f"  {kind} {name} c={conns}: {row['failed']}")
        RESULTS.append(row)
        return row
    w = json.loads(m.group(1))
    secs = w["duration_us"] / 1e6
    cores = core_busy(cpu0, cpu1)
    row.update({
        "rps": round(w["requests"] / secs, 1), "requests": w["requests"],
        "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "errors": {k[4:]: w[k] for k in w if k.startswith("err_")},
        "cores": cores,
    })
    row["error_total"] = sum(row["errors"].values())
    if st0 and st1:
        # minus the status request that produced st1 (its connection and request)
        row["upstream_new_conns"] = st1[0] - st0[0] - 1
        row["upstream_requests"] = st1[1] - st0[1] - 1
    if gw is not None:
        row["gw_cpu_pct"] = round(100.0 * (gw1 - gw0) / CLK_TCK / wall, 1)
        gw_core = f"cpu{GATEWAY_CPU}"
        if gw_core in cores:
            # only the gateway should run on its core: the rest is someone else (noise)
            row["gw_core_other_pct"] = round(max(cores[gw_core]["busy"] - row["gw_cpu_pct"], 0.0), 1)
        row["alive"] = gw.alive()
        row["rss_mib"] = round(gw.rss_mib(), 1) if row["alive"] else None
        row["problems"] = gw.new_problems()
        if kind == "measured":
            time.sleep(0.7)   # let the access log flush
            lines = access_log_lines(gw.access_log)
            statuses: dict[str, int] = {}
            tallies: dict[str, dict[str, int]] = {}
            for entry in lines:
                key = str(entry.get("status"))
                statuses[key] = statuses.get(key, 0) + 1
                for field in TALLIED_FIELDS:
                    if field in entry:
                        counts = tallies.setdefault(field, {})
                        counts[str(entry[field])] = counts.get(str(entry[field]), 0) + 1
            row["access_log_lines"] = len(lines)
            row["access_log_statuses"] = statuses
            row["access_log_tallies"] = tallies
    RESULTS.append(row)
    steal = max(c["steal"] for c in cores.values())
    extra = ""
    if gw is not None:
        extra = (f" gw_cpu={row['gw_cpu_pct']:.0f}% cpu{GATEWAY_CPU}_other={row.get('gw_core_other_pct')}%"
                 f" rss={row['rss_mib']}MiB")
        if not row["alive"]:
            extra += " GATEWAY DIED"
        if row["problems"]:
            extra += f" log_problems={len(row['problems'])}"
    log(f"  {kind:8s} {name:7s} c={conns:<4d} run={run} rps={row['rps']:>9,.0f} p50={row['p50_ms']:.2f}ms "
        f"p99={row['p99_ms']:.2f}ms errors={row['error_total']} steal={steal}% "
        f"up_new_conns={row.get('upstream_new_conns')}{extra}")
    return row


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_level(rows: list[dict]) -> dict:
    ok = [r for r in rows if "rps" in r]
    s: dict = {"runs": len(ok), "failed_runs": len(rows) - len(ok)}
    if not ok:
        return s
    s["rps"] = median([r["rps"] for r in ok])
    s["rps_min"] = min(r["rps"] for r in ok)
    s["rps_max"] = max(r["rps"] for r in ok)
    s["p50_ms"] = median([r["p50_ms"] for r in ok])
    s["p99_ms"] = median([r["p99_ms"] for r in ok])
    s["errors"] = sum(r["error_total"] for r in ok)
    s["non2xx"] = sum(r["errors"]["status"] for r in ok)
    if "access_log_lines" in ok[0]:
        statuses: dict[str, int] = {}
        tallies: dict[str, dict[str, int]] = {}
        for r in ok:
            for k, v in r["access_log_statuses"].items():
                statuses[k] = statuses.get(k, 0) + v
            for field, counts in r["access_log_tallies"].items():
                into = tallies.setdefault(field, {})
                for k, v in counts.items():
                    into[k] = into.get(k, 0) + v
        s["access_log_lines"] = sum(r["access_log_lines"] for r in ok)
        s["access_log_statuses"] = statuses
        s["access_log_tallies"] = tallies
        s["wrk_responses"] = sum(r["requests"] for r in ok)
    if "gw_cpu_pct" in ok[0]:
        s["gw_cpu_pct"] = median([r["gw_cpu_pct"] for r in ok])
        s["gw_core_other_pct"] = max((r.get("gw_core_other_pct") or 0.0) for r in ok)
        s["rss_mib"] = max((r["rss_mib"] or 0.0) for r in ok)
        s["upstream_new_conns"] = sum(r.get("upstream_new_conns", 0) for r in ok)
        s["upstream_requests"] = sum(r.get("upstream_requests", 0) for r in ok)
    return s


def compare_rows(rows: list[tuple[str, Gateway | None, str | None]], up: Upstream,
                 headers: dict[str, dict[str, str]] | None = None, scripts: dict[str, str] | None = None,
                 base: str = "proxy", after_run: Callable[[str, dict], None] | None = None) -> dict:
    """wrk on each row (a url, or else a gateway's /api/users/1; a direct row has no gateway) at
    every CONNS level, rows interleaved run by run, each gateway row warmed up first; `headers`
    and `scripts` (wrk -s, default report.lua) by row name; medians per row and the ratio to
    the row named `base`. `after_run(row name, result)` follows each measured run."""
    headers = headers or {}
    scripts = scripts or {}
    targets = {name: url or f"http://127.0.0.1:{gw.port}/api/users/1"  # type: ignore[union-attr]
               for name, gw, url in rows}
    levels: dict = {}
    for c in CONNS:
        log(f"-- {c} connections: {RUNS} x {DURATION}s per row, rows interleaved")
        results: dict[str, list[dict]] = {name: [] for name, _, _ in rows}
        for name, gw, _ in rows:
            if gw is not None and WARMUP > 0:
                wrk_run(name, targets[name], c, WARMUP, "warmup", 0, gw, up, headers.get(name), scripts.get(name, LUA))
        for i in range(1, RUNS + 1):
            for name, gw, _ in rows:
                results[name].append(wrk_run(name, targets[name], c, DURATION, "measured", i, gw, up,
                                             headers.get(name), scripts.get(name, LUA)))
                if after_run is not None:
                    after_run(name, results[name][-1])
        level = {name: summarize_level(r) for name, r in results.items()}
        plain = level[base].get("rps")
        for name in level:
            rps = level[name].get("rps")
            level[name]["ratio_to_proxy"] = round(rps / plain, 3) if rps and plain else None
        levels[c] = level
    return levels


def run_scenarios(prefix: str, argv: list[str], scenarios: dict, services: list,
                  report: Callable[[dict], str], failed: Callable[[dict], bool] | None = None) -> int:
    """The main() of a bench script: start `services` (objects with start/stop), run the
    scenarios named in argv (all by default; each a function of no argument returning its
    summary part), stop everything, save and print the report. Exit status 1 if `failed`
    says the summary shows a failure."""
    names = argv or list(scenarios)
    unknown = [n for n in names if n not in scenarios]
    if unknown:
        print(f"unknown scenario {unknown[0]!r} ({', '.join(scenarios)})", file=sys.stderr)
        return 2
    os.makedirs(RUN_DIR, exist_ok=True)
    summary: dict = {"stamp": STAMP, "env": environment()}
    try:
        for service in services:
            service.start()
        for name in names:
            log(f"== scenario {name}")
            summary[name] = scenarios[name]()
    finally:
        stop_all()
    save_summary(prefix, summary, report(summary))
    return 1 if failed is not None and failed(summary) else 0


def save_summary(prefix: str, summary: dict, text: str) -> None:
    """<prefix>-summary.json and .txt in the run's folder, and the text on stdout."""
    with open(os.path.join(RUN_DIR, f"{prefix}-summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    with open(os.path.join(RUN_DIR, f"{prefix}-summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)


def rows_table(title: str, levels: dict) -> list[str]:
    out = ["", f"{title}: GET /api/users/1, median of runs; ratio = row req/s / plain proxy req/s",
           f"{'conns':>5} {'row':<12} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>6} {'errors':>6}"]
    for c, level in levels.items():
        for name, s in level.items():
            out.append(f"{c:>5} {name:<12} {fmt(s.get('rps'), ',.0f'):>9} {fmt(s.get('p50_ms'), '.2f'):>7} "
                       f"{fmt(s.get('p99_ms'), '.2f'):>7} {fmt(s.get('ratio_to_proxy'), '.3f'):>6} {s.get('errors', '-'):>6}")
    return out


def scenario_proxy(up: Upstream) -> dict:
    gw = Gateway("proxy", up)
    gw.start()
    result: dict = {"idle_rss_mib": round(gw.rss_mib(), 1)}
    result["checks"] = functional_checks(gw, up)
    direct_url = f"http://127.0.0.1:{up.port}/users/1"
    gw_url = f"http://127.0.0.1:{gw.port}/api/users/1"
    levels = {}
    for c in CONNS:
        log(f"-- {c} connections: warm-up {WARMUP}s, then {RUNS} x {DURATION}s direct and gateway, interleaved")
        if WARMUP > 0:
            wrk_run("gateway", gw_url, c, WARMUP, "warmup", 0, gw, up)
        rows: dict[str, list[dict]] = {"direct": [], "gateway": []}
        for i in range(1, RUNS + 1):
            rows["direct"].append(wrk_run("direct", direct_url, c, DURATION, "measured", i, None, up))
            if not gw.alive():
                break
            rows["gateway"].append(wrk_run("gateway", gw_url, c, DURATION, "measured", i, gw, up))
            if not gw.alive():
                break
        levels[c] = {"direct": summarize_level(rows["direct"]), "gateway": summarize_level(rows["gateway"])}
        d, g = levels[c]["direct"].get("rps"), levels[c]["gateway"].get("rps")
        levels[c]["ratio"] = round(g / d, 4) if d and g else None
        if not gw.alive():
            log(f"txgateway DIED (exit {gw.proc.returncode if gw.proc else '?'}); log tail:\n{tail(gw.logfile)}")
            break
    result["levels"] = levels
    result["alive_at_end"] = gw.alive()
    if gw.alive():
        result["rss_end_mib"] = round(gw.rss_mib(), 1)
        result["hwm_mib"] = round(gw.hwm_mib(), 1)
    result["problems"] = [p for c in CONNS for r in RESULTS
                          if r.get("name") == "gateway" and r.get("conns") == c for p in r.get("problems", [])]
    result["shutdown"] = gw.stop()
    result["problems"] += gw.new_problems()
    result["gateway_log"] = gw.logfile
    result["access_log"] = gw.access_log
    return result


# --------------------------------------------------------------------------------------------
# Stream scenario
# --------------------------------------------------------------------------------------------

class RssSampler(threading.Thread):
    """Samples the gateway's VmRSS every `interval` s while a transfer runs."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib = 0
        self.samples = 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            kib = proc_status_kib(self.pid, "VmRSS")
            self.peak_kib = max(self.peak_kib, kib)
            self.samples += 1
            self._done.wait(self.interval)

    def finish(self) -> float:
        self._done.set()
        self.join()
        return self.peak_kib / 1024


def stream_get(port: int, path: str, rate_mib: float) -> dict:
    """GET path, read the body in 64 KiB recv()s, paced to rate_mib MiB/s (0 = unpaced)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    buf = bytearray(STREAM_CHUNK)
    view = memoryview(buf)
    try:
        t0 = time.monotonic()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Forwarded-For: {FORWARDED_FOR}\r\n"
                  "Connection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            d = s.recv(STREAM_CHUNK)
            if not d:
                return {"error": f"connection closed before the response head ({head[:200]!r})"}
            head += d
        ttfb = time.monotonic() - t0
        head, _, first = head.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        length = int(headers["content-length"]) if "content-length" in headers else None
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        got = len(first)
        tail = first[-16:]
        rate = rate_mib * 2**20
        tb = time.monotonic()
        while length is None or got < length:
            n = s.recv_into(view)
            if n == 0:
                break
            got += n
            if chunked:
                tail = (tail + bytes(view[max(0, n - 16):n]))[-16:]
                if tail.endswith(b"\r\n0\r\n\r\n"):
                    break
            if rate:
                ahead = tb + got / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
        elapsed = time.monotonic() - tb
        return {"status": status, "content_length": length, "chunked": chunked, "bytes": got,
                "complete": (got == length) if length is not None else None,
                "ttfb_ms": round(ttfb * 1000, 2), "seconds": round(elapsed, 3),
                "mib_per_s": round(got / 2**20 / elapsed, 1) if elapsed > 0 else None}
    except (OSError, ValueError, IndexError) as e:
        return {"error": repr(e)}
    finally:
        s.close()


def make_stream_file() -> str:
    files = os.path.join(OUT, "files")
    os.makedirs(files, exist_ok=True)
    name = f"stream-{STREAM_SIZE}.bin"
    path = os.path.join(files, name)
    if not os.path.exists(path) or os.path.getsize(path) != STREAM_SIZE:
        with open(path, "wb") as f:
            f.truncate(STREAM_SIZE)          # sparse: no disk used, reads as zeros
    # Read it once so that every transfer (direct or not) is served from the page cache.
    with open(path, "rb", buffering=0) as f:
        block = bytearray(4 * 2**20)
        while f.readinto(block):
            pass
    return name


def scenario_stream(up: Upstream) -> dict:
    name = make_stream_file()
    result: dict = {"size_bytes": STREAM_SIZE, "transfers": []}
    # Reference: the client straight at nginx, unpaced.
    wait_quiet()
    ref = stream_get(up.port, f"/files/{name}", 0)
    ref.update({"target": "direct", "rate_limit_mib_s": 0})
    result["transfers"].append(ref)
    log(f"  stream direct   unpaced: {fmt_transfer(ref)}")
    gw = Gateway("stream", up)
    gw.start()
    result["idle_rss_mib"] = round(gw.rss_mib(), 1)
    for rate in STREAM_RATES:
        if not gw.alive():
            break
        wait_quiet()
        base = gw.rss_mib()
        ticks0 = proc_ticks(gw.pid)
        sampler = RssSampler(gw.pid)
        sampler.start()
        t0 = time.monotonic()
        r = stream_get(gw.port, f"/api/files/{name}", rate)
        wall = time.monotonic() - t0
        peak = sampler.finish()
        r.update({"target": "gateway", "rate_limit_mib_s": rate, "rss_before_mib": round(base, 1),
                  "rss_peak_mib": round(peak, 1), "rss_samples": sampler.samples,
                  "rss_after_mib": round(gw.rss_mib(), 1) if gw.alive() else None,
                  "gw_cpu_pct": round(100.0 * (proc_ticks(gw.pid) - ticks0) / CLK_TCK / wall, 1),
                  "alive": gw.alive(), "problems": gw.new_problems()})
        result["transfers"].append(r)
        log(f"  stream gateway  {'unpaced' if not rate else f'{rate:g} MiB/s'}: {fmt_transfer(r)}")
    result["alive_at_end"] = gw.alive()
    result["hwm_mib"] = round(gw.hwm_mib(), 1) if gw.alive() else None
    result["shutdown"] = gw.stop()
    result["problems"] = [p for t in result["transfers"] for p in t.get("problems", [])] + gw.new_problems()
    result["gateway_log"] = gw.logfile
    return result


def fmt_transfer(r: dict) -> str:
    if "error" in r:
        return f"ERROR {r['error']}"
    s = (f"status={r['status']} bytes={r['bytes']:,} complete={r['complete']} "
         f"{r['mib_per_s']} MiB/s in {r['seconds']}s ttfb={r['ttfb_ms']}ms")
    if "rss_peak_mib" in r:
        s += (f" rss before/peak/after={r['rss_before_mib']}/{r['rss_peak_mib']}/{r['rss_after_mib']} MiB "
              f"gw_cpu={r['gw_cpu_pct']}%")
    return s


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def report(summary: dict) -> str:
    out = []
    env = summary["env"]
    out.append(f"txgateway bench {summary['stamp']}  ({env['cpu']}; {env['loadavg']})")
    out.append(f"pinning: txgateway on CPU {GATEWAY_CPU}; wrk, upstream nginx, clients on CPU {CLIENT_CPU}. "
               f"{env['versions']}")
    if "proxy" in summary:
        p = summary["proxy"]
        out.append("")
        out.append(f"== proxy: GET /api/users/1 -> nginx /users/1  (wrk -t{WRK_THREADS}, {RUNS} x {DURATION}s "
                   f"per level, median; warm-up {WARMUP}s)")
        failed = [k for k, v in p["checks"].items() if str(v).startswith("NO")]
        out.append("checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(
            f"{k}: {p['checks'][k]}" for k in failed)))
        out.append(f"{'conns':>5} {'target':8} {'req/s':>9} {'min-max':>17} {'p50 ms':>7} {'p99 ms':>7} "
                   f"{'errors':>6} {'non2xx':>6} {'gw CPU%':>7} {'other%':>6} {'RSS MiB':>7} {'up conns':>8}")
        for c, lv in p["levels"].items():
            for t in ("direct", "gateway"):
                s = lv[t]
                if not s.get("runs"):
                    out.append(f"{c:>5} {t:8} (no successful run)")
                    continue
                out.append(
                    f"{c:>5} {t:8} {fmt(s['rps']):>9} {fmt(s['rps_min']) + '-' + fmt(s['rps_max']):>17} "
                    f"{s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['errors']:>6} {s['non2xx']:>6} "
                    f"{fmt(s.get('gw_cpu_pct')):>7} {fmt(s.get('gw_core_other_pct')):>6} "
                    f"{fmt(s.get('rss_mib'), '.1f'):>7} {fmt(s.get('upstream_new_conns')):>8}")
            g = lv["gateway"]
            if "access_log_lines" in g:
                st = ", ".join(f"{k}: {v:,}" for k, v in sorted(g["access_log_statuses"].items()))
                out.append(f"{c:>5} {'log':8} access log {g['access_log_lines']:,} lines ({st}) for "
                           f"{g['wrk_responses']:,} responses wrk counted; upstream saw "
                           f"{g.get('upstream_requests', 0):,} requests on {g.get('upstream_new_conns', 0):,} new conns")
            ratio = lv.get("ratio")
            out.append(f"{c:>5} {'ratio':8} gateway/direct req/s = {fmt(ratio, '.3f')}"
                       + (f"  ({1 / ratio:.1f}x slower)" if ratio else ""))
        out.append(f"gateway RSS: idle {p['idle_rss_mib']} MiB, after load {p.get('rss_end_mib', '-')} MiB, "
                   f"peak (VmHWM) {p.get('hwm_mib', '-')} MiB; shutdown on SIGTERM: {p['shutdown']}")
        if not p["alive_at_end"]:
            out.append("!! txgateway DIED during the run: see " + p["gateway_log"])
        if p["problems"]:
            out.append(f"!! {len(p['problems'])} warning/error lines in {p['gateway_log']}, first ones:")
            out.extend("   " + line[:240] for line in p["problems"][:8])
    if "stream" in summary:
        s = summary["stream"]
        out.append("")
        out.append(f"== stream: {s['size_bytes'] / 2**30:g} GiB response (sparse file on nginx) -> client reading "
                   f"64 KiB recv()s")
        out.append(f"{'target':8} {'client':>12} {'status':>6} {'complete':>8} {'MiB/s':>7} {'seconds':>7} "
                   f"{'RSS before':>10} {'RSS peak':>8} {'gw CPU%':>7}")
        for t in s["transfers"]:
            client = "unpaced" if not t["rate_limit_mib_s"] else f"{t['rate_limit_mib_s']:g} MiB/s"
            if "error" in t:
                out.append(f"{t['target']:8} {client:>12} ERROR {t['error']}")
                continue
            out.append(f"{t['target']:8} {client:>12} {t['status']:>6} {t['complete']!s:>8} "
                       f"{fmt(t['mib_per_s'], '.0f'):>7} {t['seconds']:>7.2f} "
                       f"{fmt(t.get('rss_before_mib'), '.1f'):>10} {fmt(t.get('rss_peak_mib'), '.1f'):>8} "
                       f"{fmt(t.get('gw_cpu_pct'), '.0f'):>7}")
        peaks = [t["rss_peak_mib"] for t in s["transfers"] if "rss_peak_mib" in t]
        if peaks:
            verdict = "OK" if max(peaks) < RSS_TARGET_MIB else "OVER TARGET"
            out.append(f"peak gateway RSS during transfers: {max(peaks)} MiB (target < {RSS_TARGET_MIB:g} MiB: "
                       f"{verdict}); VmHWM {s.get('hwm_mib')} MiB; shutdown on SIGTERM: {s['shutdown']}")
        if not s["alive_at_end"]:
            out.append("!! txgateway DIED during the stream: see " + s["gateway_log"])
        if s["problems"]:
            out.append(f"!! {len(s['problems'])} warning/error lines in {s['gateway_log']}, first ones:")
            out.extend("   " + line[:240] for line in s["problems"][:8])
    out.append("")
    out.append(f"details: {RUN_DIR}/ (summary.json, results.jsonl, wrk-*.txt, gateway-*.log, access-*.log)")
    return "\n".join(out)


def environment() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    py = os.path.join(os.path.dirname(TWISTD), "python")
    tw = run([py, "-c", "import twisted; print('Twisted', twisted.__version__)"])
    versions = f"{run(['wrk', '--version']).split(' [')[0]}; {run([NGINX, '-v']).replace('nginx version: ', '')}; {tw}"
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "txgateway"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (txgateway/ has uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    return {"cpu": f"{model} x {os.cpu_count()}", "loadavg": f"load {load}", "versions": versions,
            "commit": commit, "knobs": {"DURATION": DURATION, "WARMUP": WARMUP, "RUNS": RUNS, "CONNS": CONNS,
                                        "STREAM_SIZE": STREAM_SIZE, "STREAM_RATES": STREAM_RATES}}


def main(argv: list[str]) -> int:
    scenarios = argv or ["proxy"]
    for s in scenarios:
        if s not in ("proxy", "stream"):
            print(f"unknown scenario {s!r} (proxy, stream)", file=sys.stderr)
            return 2
    os.makedirs(RUN_DIR, exist_ok=True)
    latest = os.path.join(OUT, "latest")
    if os.path.islink(latest) or not os.path.exists(latest):
        if os.path.islink(latest):
            os.unlink(latest)
        os.symlink(STAMP, latest)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    summary: dict = {"stamp": STAMP, "env": environment()}
    log(f"txgateway bench {STAMP}: {' '.join(scenarios)}; output {RUN_DIR}")
    up = Upstream()
    try:
        up.start()
        if "proxy" in scenarios:
            log("== scenario proxy")
            summary["proxy"] = scenario_proxy(up)
        if "stream" in scenarios:
            log(f"== scenario stream ({STREAM_SIZE:,} bytes, client rates {STREAM_RATES} MiB/s, 0 = unpaced)")
            summary["stream"] = scenario_stream(up)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    finally:
        stop_all()
        with open(os.path.join(RUN_DIR, "results.jsonl"), "w") as f:
            for row in RESULTS:
                f.write(json.dumps(row) + "\n")
    with open(os.path.join(RUN_DIR, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    text = report(summary)
    with open(os.path.join(RUN_DIR, "summary.txt"), "w") as f:
        f.write(text + "\n")
    print(text)
    bad = False
    if "proxy" in summary:
        p = summary["proxy"]
        bad |= not p["alive_at_end"] or any(
            lv[t].get("errors") or lv[t].get("failed_runs") for lv in p["levels"].values() for t in lv if t != "ratio")
    if "stream" in summary:
        bad |= not summary["stream"]["alive_at_end"] or any(
            "error" in t or not t.get("complete", True) for t in summary["stream"]["transfers"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
