#!/usr/bin/env python3
"""req/s of the route features against the plain route (entry point: bench/run.sh routes).
Uses bench.py, and macro.py's JSON_BODY and TRANSFORM (the bodies whose instructions macro.py
counts).

routes  wrk, rows interleaved run by run, on GET through one route in six set-ups, each
        beside the plain row it is compared with:
          plain         /api/users/1 on the plain route (bench.py's config)
          cache-hit     the same route with `cache: {ttl: 1h}`, one URL: every request a hit
          plain-unique  the plain route, each request a query of its own (unique.lua)
          cache-miss    the cached route, each request a query of its own: every one a miss
                        that stores its response (and evicts, once the store is at max_memory)
          json          the plain route answering macro.py's 2 KiB JSON_BODY (/api/users/json)
          transform     the same with macro.py's TRANSFORM on the route
        and the ratios with the issues' targets: cache-miss / plain-unique >= 0.90 and
        cache-hit / plain >= 1.5 (issue 14), transform / json >= 0.75 (issue 15).

Each set-up is a gateway process of its own (ports GATEWAY_PORT to +3, admin listeners +10 to
+13; all on GATEWAY_CPU): the misses' store does not grow under the hits, and the plain rows
run with no cache in their process. The access log of each run is counted by status, cache
verdict and response size, so the report shows that the misses were misses, the hits hits,
and that the transform changed the answer.
"""

from __future__ import annotations

import email.utils
import json
import os
import sys
import time
import urllib.request

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from macro import JSON_BODY, TRANSFORM

import bench
from bench import GATEWAY_PORT, RUN_DIR, Gateway, Upstream, fmt, log

UNIQUE_LUA = os.path.join(bench.HERE, "unique.lua")
JSON_PATH = "/users/json"
CACHE = "    cache: {ttl: 1h}\n"
# The store's bound for the cached rows (the cache: section's max_memory); empty: the default.
MAX_MEMORY = bench._env("CACHE_MAX_MEMORY", "")
# other% (CPU time on the gateways' core not theirs) above which a run was disturbed.
NOISY_OTHER_PCT = 10.0
# (ratio name, row, row it is divided by, target): the issues' req/s targets.
RATIOS = (("cache-miss / plain-unique", "cache-miss", "plain-unique", 0.90),
          ("cache-hit / plain", "cache-hit", "plain", 1.5),
          ("transform / json", "transform", "json", 0.75))


def json_location() -> str:
    """The upstream's location answering JSON_BODY byte for byte (nginx's `return` text: quotes
    and backslashes escaped; a `$` would be a variable)."""
    text = JSON_BODY.decode()
    if "$" in text:
        raise SystemExit("macro.JSON_BODY has a '$': nginx's return would read it as a variable")
    text = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"        location = {JSON_PATH} {{ return 200 '{text}'; }}\n"


def route_yaml(index: int, route_keys: str = "", top_keys: str = "") -> str:
    """bench.py's gateway config with `route_keys` (YAML at the route's indentation, as macro.py
    appends them) on its /api/users route, `top_keys` after it, and an admin listener (the
    store's size and evictions)."""
    anchor = "  - prefix: /api/files\n"
    if anchor not in bench.GATEWAY_YAML:
        raise SystemExit(f"bench.GATEWAY_YAML has no {anchor.strip()!r} route to insert the route keys before")
    return (bench.GATEWAY_YAML.replace(anchor, braces(route_keys) + anchor) + braces(top_keys)
            + f'admin: {{{{endpoint: "tcp:{admin_port(index)}:interface=127.0.0.1"}}}}\n')


def braces(text: str) -> str:
    """`text` as is through Gateway.start's str.format."""
    return text.replace("{", "{{").replace("}", "}}")


def cached_yaml(index: int) -> str:
    return route_yaml(index, CACHE, f"cache: {{max_memory: {MAX_MEMORY}}}\n" if MAX_MEMORY else "")


def admin_port(index: int) -> int:
    return GATEWAY_PORT + 10 + index


def store_status(index: int) -> dict:
    """The cache's store (bytes, max_memory, evictions) from the admin listener's /status."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port(index)}/status", timeout=5) as r:
            return json.load(r).get("cache") or {}
    except (OSError, ValueError) as e:
        return {"error": repr(e)}


def expected_keys() -> tuple[set[str], dict]:
    """The top-level keys TRANSFORM leaves (allow's first names, renamed; then add's) and add's values."""
    spec = yaml.safe_load(TRANSFORM)["transform"]
    rename = {k: v for k, v in spec.get("rename", {}).items() if "." not in k}
    keys = {rename.get(p.split(".")[0], p.split(".")[0]) for p in spec["allow"]}
    return keys | set(spec.get("add", {})), spec.get("add", {})


def checks(up: Upstream, plain: Gateway, miss: Gateway, hit: Gateway, transform: Gateway) -> dict[str, str]:
    """Before any load: each row's requests do what the row's name says."""
    out: dict[str, str] = {}
    status, headers, body = bench.get(up.port, JSON_PATH)
    out["upstream answers macro.JSON_BODY"] = (
        "yes" if status == 200 and body == JSON_BODY and headers.get("content-type") == "application/json"
        else f"NO: {status} {headers.get('content-type')} {body[:80]!r}")
    status, _, body = bench.get(plain.port, "/api" + JSON_PATH)
    out["json: the gateway passes it unchanged"] = "yes" if status == 200 and body == JSON_BODY else f"NO: {status}"
    status, _, body = bench.get(transform.port, "/api" + JSON_PATH)
    keys, added = expected_keys()
    try:
        answer = json.loads(body)
        ok = status == 200 and set(answer) == keys and all(answer[k] == v for k, v in added.items())
        out["transform: the answer transformed"] = (
            f"yes ({len(JSON_BODY)} -> {len(body)} bytes, keys {sorted(answer)})" if ok
            else f"NO: {status} keys {sorted(answer)}, expected {sorted(keys)}")
    except (ValueError, TypeError) as e:
        out["transform: the answer transformed"] = f"NO: {status} {e!r} {body[:80]!r}"
    path = f"/api/users/1?n=check-{bench.STAMP}"
    first = bench.get(miss.port, path)[1]
    second = bench.get(miss.port, path)[1]
    out["cache-miss: a new query is a MISS, then a HIT"] = (
        "yes" if (first.get("x-cache"), second.get("x-cache")) == ("MISS", "HIT")
        else f"NO: X-Cache {first.get('x-cache')}, then {second.get('x-cache')}")
    date = bench.get(up.port, "/users/1")[1].get("date")
    age = abs(time.time() - email.utils.parsedate_to_datetime(date).timestamp()) if date else None
    out["upstream Date is current"] = f"yes ({date})" if age is not None and age < 60 else f"NO: {date!r}"
    out["cache-hit: /api/users/1 is a HIT"] = (
        "yes" if bench.get(hit.port, "/api/users/1")[1].get("x-cache") == "HIT"
        else "NO (the start-up check's request should have stored it)")
    for k, v in out.items():
        log(f"  check: {k}: {v}")
    return out


def verdicts(levels: dict) -> list[str]:
    """What the access logs of the measured runs show against what each row is meant to be."""
    out = []
    for c, level in levels.items():
        for name, s in level.items():
            tallies = s.get("access_log_tallies", {})
            cache = tallies.get("cache", {})
            bad = {k: v for k, v in s.get("access_log_statuses", {}).items() if not k.startswith("2") and k != "499"}
            if bad:
                out.append(f"c={c} {name}: statuses other than 2xx (and 499 at wrk's end): {bad}")
            expected = {"cache-miss": "MISS", "cache-hit": "HIT"}.get(name)
            if expected and set(cache) - {expected}:
                out.append(f"c={c} {name}: cache verdicts {cache}, expected {expected} only")
            if not expected and cache:
                out.append(f"c={c} {name}: a cache verdict on an uncached route: {cache}")
        plain_sizes = set(level.get("json", {}).get("access_log_tallies", {}).get("bytes_out", {}))
        sizes = set(level.get("transform", {}).get("access_log_tallies", {}).get("bytes_out", {}))
        same = sizes & (plain_sizes - {"0"})
        if same:
            out.append(f"c={c} transform: answers of the untransformed size ({', '.join(sorted(same))} bytes)")
    return out


def scenario_routes(up: Upstream) -> dict:
    plain = Gateway("plain", up, route_yaml(0), GATEWAY_PORT)
    miss = Gateway("cache-miss", up, cached_yaml(1), GATEWAY_PORT + 1)
    hit = Gateway("cache-hit", up, cached_yaml(2), GATEWAY_PORT + 2)
    transform = Gateway("transform", up, route_yaml(3, TRANSFORM), GATEWAY_PORT + 3)
    gateways = (plain, miss, hit, transform)
    json_url = "http://127.0.0.1:{}/api" + JSON_PATH
    rows = [("plain", plain, None), ("cache-hit", hit, None), ("plain-unique", plain, None),
            ("cache-miss", miss, None), ("json", plain, json_url.format(plain.port)),
            ("transform", transform, json_url.format(transform.port))]
    result: dict = {}
    try:
        for gw in gateways:
            gw.start()
        result["checks"] = checks(up, plain, miss, hit, transform)
        stores: list[dict] = []

        def note_store(name: str, run: dict) -> None:
            if name == "cache-miss":
                stores.append({"conns": run["conns"], "run": run["run"], **store_status(1)})

        levels = bench.compare_rows(rows, up, scripts={"plain-unique": UNIQUE_LUA, "cache-miss": UNIQUE_LUA},
                                    base="plain", after_run=note_store)
        for level in levels.values():
            level["ratios"] = {label: round(level[a]["rps"] / level[b]["rps"], 3)
                               if level[a].get("rps") and level[b].get("rps") else None
                               for label, a, b, _ in RATIOS}
        result["levels"] = levels
        result["miss_store"] = stores
        result["alive_at_end"] = {gw.name: gw.alive() for gw in gateways}
        result["verdicts"] = verdicts(levels)
    finally:
        result["shutdown"] = {gw.name: gw.stop() for gw in gateways}
        result["problems"] = {gw.name: gw.new_problems() for gw in gateways}
    return result


def tally_text(s: dict) -> str:
    parts = [", ".join(f"{k}: {v:,}" for k, v in sorted(s.get("access_log_statuses", {}).items()))]
    for field, counts in s.get("access_log_tallies", {}).items():
        top = sorted(counts.items(), key=lambda kv: -kv[1])
        parts.append(f"{field} " + ", ".join(f"{k}: {v:,}" for k, v in top[:3])
                     + (f" (+{len(top) - 3} more values)" if len(top) > 3 else ""))
    return "; ".join(parts)


def report(summary: dict) -> str:
    r = summary["routes"]
    out = [f"txgateway routes bench {bench.STAMP} ({summary['env']['cpu']}; {summary['env']['loadavg']}; "
           f"commit {summary['env']['commit']})",
           f"pinning: the gateways on CPU {bench.GATEWAY_CPU}; wrk and the upstream nginx on CPU {bench.CLIENT_CPU}",
           "",
           f"== routes (wrk -t{bench.WRK_THREADS}, {bench.RUNS} x {bench.DURATION}s per row and level, rows "
           f"interleaved, median; warm-up {bench.WARMUP}s)"]
    failed = {k: v for k, v in r.get("checks", {}).items() if not v.startswith("yes")}
    out.append("checks: " + ("all passed" if not failed else "FAILED: " + "; ".join(f"{k}: {v}" for k, v in failed.items())))
    out.append(f"{'conns':>5} {'row':12} {'req/s':>9} {'min-max':>17} {'p50 ms':>7} {'p99 ms':>7} {'errors':>6} "
               f"{'non2xx':>6} {'gw CPU%':>7} {'other%':>6} {'RSS MiB':>7}  access log of the measured runs")
    for c, level in r.get("levels", {}).items():
        for name, s in level.items():
            if name == "ratios":
                continue
            if not s.get("runs"):
                out.append(f"{c:>5} {name:12} (no successful run)")
                continue
            out.append(f"{c:>5} {name:12} {fmt(s['rps']):>9} {fmt(s['rps_min']) + '-' + fmt(s['rps_max']):>17} "
                       f"{s['p50_ms']:>7.2f} {s['p99_ms']:>7.2f} {s['errors']:>6} {s['non2xx']:>6} "
                       f"{fmt(s.get('gw_cpu_pct')):>7} {fmt(s.get('gw_core_other_pct')):>6} "
                       f"{fmt(s.get('rss_mib'), '.1f'):>7}  {tally_text(s)}")
        for label, _, _, target in RATIOS:
            ratio = level["ratios"][label]
            verdict = "-" if ratio is None else "met" if ratio >= target else "NOT met"
            out.append(f"{c:>5} {'ratio':12} {label:<26} {fmt(ratio, '.3f'):>6}  (target >= {target:g}: {verdict})")
    stores = r.get("miss_store", [])
    if stores:
        out.append("cache-miss store after each measured run (the admin listener's /status): "
                   + ", ".join(f"c={s['conns']} run {s['run']}: " + (
                       f"{s['bytes'] / 2**20:.1f} of {s['max_memory'] / 2**20:.0f} MiB, {s['evictions']:,} evicted"
                       if "evictions" in s else f"not read ({s.get('error')})") for s in stores))
        evicted = [s for s in stores if s.get("evictions")]
        out.append("  eviction ran: the store reached max_memory, and from then on each miss also evicted "
                   f"(first counted in c={evicted[0]['conns']} run {evicted[0]['run']}; runs before it measured "
                   "misses that only stored)" if evicted
                   else "  no eviction in this run: the store never reached max_memory (a full-length run fills it)")
    busy = max((s.get("gw_core_other_pct") or 0.0 for level in r.get("levels", {}).values()
                for name, s in level.items() if name != "ratios"), default=0.0)
    if busy > NOISY_OTHER_PCT:
        out.append(f"!! CPU {bench.GATEWAY_CPU} was up to {busy:.0f} % busy with other processes during a run "
                   "(other%): these ratios are noise; rerun on a quiet machine")
    out.append("shutdown on SIGTERM: " + "; ".join(f"{k} {v}" for k, v in r.get("shutdown", {}).items()))
    for name, alive in r.get("alive_at_end", {}).items():
        if not alive:
            out.append(f"!! the {name} gateway DIED during the run: see {RUN_DIR}/gateway-{name}.log")
    out.extend("!! " + v for v in r.get("verdicts", []))
    for name, lines in r.get("problems", {}).items():
        if lines:
            out.append(f"!! {len(lines)} warning/error lines in {RUN_DIR}/gateway-{name}.log, first ones:")
            out.extend("   " + line[:240] for line in lines[:5])
    out.append(f"details: {RUN_DIR}/ (routes-summary.json, wrk-*.txt, gateway-*.log, access-*.log)")
    return "\n".join(out)


def failed(summary: dict) -> bool:
    r = summary["routes"]
    return (any(not v.startswith("yes") for v in r.get("checks", {}).values())
            or not all(r.get("alive_at_end", {}).values()) or bool(r.get("verdicts"))
            or any(s.get("errors") or s.get("failed_runs") or not s.get("runs")
                   for level in r.get("levels", {}).values() for name, s in level.items() if name != "ratios"))


def main(argv: list[str]) -> int:
    up = Upstream(locations=json_location())
    return bench.run_scenarios("routes", argv, {"routes": lambda: scenario_routes(up)}, [up], report, failed)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
