"""The admin listener's page for people: one static HTML file that reads /status every 2 s.

It holds no data itself. When the admin listener wants a token, open it as
`http://127.0.0.1:9901/#token=...`: the fragment never leaves the browser, and the page sends
it as a bearer token with each /status request.

`STATUS_PAGE_CSP` lets the page run its own inline style and script (by hash) and fetch
/status, and nothing else: no outside resource, no framing (admin.py sends it).
"""

import base64
import hashlib
import re

__all__ = ["STATUS_PAGE", "STATUS_PAGE_CSP"]

STATUS_PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>txgateway status</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
 h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
 table{border-collapse:collapse;background:#fff;min-width:40em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
 th{background:#f0f0f0} .closed,.up{color:#17702a;font-weight:600} .open,.down,.error{color:#b3261e;font-weight:700}
 .half_open,.ejected{color:#9a6700;font-weight:700} #meta{color:#555} #error{color:#b3261e}
</style></head><body>
<h1>txgateway</h1><div id="meta">loading /status ...</div><div id="error"></div>
<h2>Requests</h2><table id="requests"></table>
<h2>Upstreams</h2><table id="upstreams"></table>
<h2>Rate limiter</h2><table id="limiter"></table>
<h2>Routes</h2><table id="routes"></table>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
let last = null;
function esc(v){return String(v ?? "").replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";");}
function row(cells, tag){return "<tr>" + cells.map(c => "<" + (tag||"td") + ">" + c + "</" + (tag||"td") + ">").join("") + "</tr>";}
function table(id, head, rows){document.getElementById(id).innerHTML = row(head, "th") + rows.join("");}
function cls(text, name){return '<span class="' + esc(name) + '">' + esc(text) + "</span>";}
async function refresh(){
  try {
    const r = await fetch("/status", {headers: token ? {Authorization: "Bearer " + token} : {}, cache: "no-store"});
    if (!r.ok) throw new Error("/status answered " + r.status);
    const s = await r.json();
    document.getElementById("error").textContent = "";
    document.getElementById("meta").textContent = "version " + s.version + " - up " + Math.round(s.uptime_s) + " s - "
      + (s.draining ? "DRAINING" : (s.ready ? "ready" : "NOT READY")) + " - config " + s.config + " - " + s.time;
    const q = s.requests, rate = last ? ((q.total - last.total) / ((s.uptime_s - last.uptime) || 1)).toFixed(1) : "-";
    last = {total: q.total, uptime: s.uptime_s};
    table("requests", ["total", "req/s", "in flight", "by class", "rate limited"],
      [row([q.total, rate, q.in_flight, esc(JSON.stringify(q.by_class)), q.rate_limited])]);
    const up = [];
    for (const [name, u] of Object.entries(s.upstreams)) {
      const b = u.breaker, state = b ? cls(b.state, b.state) + (b.state !== "closed" ? " (retry in " + b.retry_after + " s)" : "") : "no breaker";
      for (const t of u.targets) {
        const health = t.down ? cls("down", "down") : (t.ejected_for > 0 ? cls("ejected " + t.ejected_for + " s", "ejected") : cls("up", "up"));
        up.push(row([esc(name), state, esc(u.balance), esc(t.url), health, t.in_flight, t.requests, esc(t.last_error || "")]));
      }
    }
    table("upstreams", ["upstream", "breaker", "balance", "target", "health", "in flight", "requests", "last error"], up);
    const l = s.limiter, redis = l.redis;
    table("limiter", ["backend", "on_redis_error", "local buckets", "redis"],
      [row([esc(l.backend || "none"), esc(l.on_redis_error || "-"), l.local_buckets,
            redis ? cls(redis.state, redis.state) + " " + esc(redis.where) + " (errors " + redis.errors + ")" : "-"])]);
    table("routes", ["prefix", "upstream", "methods", "host", "auth", "rate limit key"],
      s.routes.map(r => row([esc(r.prefix), esc(r.upstream), esc(r.methods.join(" ") || "any"), esc(r.host || "any"),
                             esc(r.auth), esc(r.rate_limit || "-")])));
  } catch (e) { document.getElementById("error").textContent = String(e); }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""


def _hashes(tag: bytes) -> str:
    return " ".join("'sha256-%s'" % base64.b64encode(hashlib.sha256(body).digest()).decode()
                    for body in re.findall(b"<%s>(.*?)</%s>" % (tag, tag), STATUS_PAGE, re.S))


STATUS_PAGE_CSP = (f"default-src 'none'; script-src {_hashes(b'script')}; style-src {_hashes(b'style')}; "
                   "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'").encode()
