"""The admin listener's page for people: one static HTML file that reads /status and
/status/history (ops/history.py) every 2 s and draws the last 15 minutes as inline SVG charts
(no library, no build step, nothing from elsewhere).

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
 h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em} h3{font-size:.95em;margin:.8em 0 .2em}
 table{border-collapse:collapse;background:#fff;min-width:40em} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:left}
 th{background:#f0f0f0} .closed,.up{color:#17702a;font-weight:600} .open,.down,.error{color:#b3261e;font-weight:700}
 .half_open,.ejected,.degraded{color:#9a6700;font-weight:700} #meta{color:#555} #error{color:#b3261e}
 #hint{background:#fff4ce;border:1px solid #e0c060;padding:.5em .8em;margin:.6em 0} #hint:empty{display:none}
 .c1xx{color:#666}.c2xx{color:#17702a}.c3xx{color:#1a5fb4}.c4xx{color:#b06000}.c5xx{color:#b3261e}
 .cls{margin-right:1em;white-space:nowrap} .charts{display:flex;flex-wrap:wrap;gap:.6em}
 .charts svg{background:#fff;border:1px solid #ddd} .when{color:#666}
</style></head><body>
<h1>txgateway</h1><div id="meta">loading /status ...</div><div id="error"></div><div id="hint"></div>
<h2>Requests</h2><table id="requests"></table>
<h2>Last 15 minutes <small class="when">(sampled every 2 s; dashed lines: breaker changes, ejections)</small></h2><div id="charts">waiting for the first samples ...</div>
<h2>Upstreams</h2><table id="upstreams"></table>
<h2>Breaker changes and ejections</h2><table id="events"></table>
<h2>Rate limiter</h2><table id="limiter"></table>
<h2>Routes</h2><table id="routes"></table>
<script>
"use strict";
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const COLORS = {"1xx": "#666", "2xx": "#17702a", "3xx": "#1a5fb4", "4xx": "#b06000", "5xx": "#b3261e",
                p50: "#1a5fb4", p95: "#9a6700", p99: "#b3261e", errors: "#b3261e"};
const MARKS = {open: "#b3261e", half_open: "#9a6700", closed: "#17702a", ejected: "#7b2cbf"};
let last = null;
function esc(v){return String(v ?? "").replace(/[&<>"']/g, c => "&#" + c.charCodeAt(0) + ";");}
function row(cells, tag){return "<tr>" + cells.map(c => "<" + (tag||"td") + ">" + c + "</" + (tag||"td") + ">").join("") + "</tr>";}
function table(id, head, rows){document.getElementById(id).innerHTML = row(head, "th") + rows.join("");}
function cls(text, name){return '<span class="' + esc(name) + '">' + esc(text) + "</span>";}
function clock(t){return new Date(t * 1000).toLocaleTimeString([], {hour12: false});}
function ago(t, now){return clock(t) + ' <span class="when">(' + Math.max(0, Math.round(now - t)) + " s ago)</span>";}
function byClass(counts){
  const parts = Object.entries(counts).sort().map(([k, v]) => '<span class="cls c' + esc(k) + '">' + esc(k) + " <b>" + esc(v) + "</b></span>");
  return parts.join("") || "none yet";
}
async function get(path){
  const r = await fetch(path, {headers: token ? {Authorization: "Bearer " + token} : {}, cache: "no-store"});
  if (r.status === 401) {
    document.getElementById("hint").textContent = token
      ? "The admin token in the address (#token=...) was refused."
      : "This admin listener wants a token: open this page as " + location.origin + location.pathname
        + "#token=YOUR_ADMIN_TOKEN (the part after # never leaves the browser).";
  }
  if (!r.ok) throw new Error(path + " answered " + r.status);
  document.getElementById("hint").textContent = "";
  return r.json();
}
function chart(scope, name, title, unit, lines, events, now, every, span){
  const W = 380, H = 130, L = 46, B = 16;
  let max = 0;
  for (const l of lines) for (const [, v] of l.values) if (v !== null && v > max) max = v;
  max = max > 0 ? max * 1.15 : 1;
  const x = t => (L + (W - L - 6) * (1 - (now - t) / span)).toFixed(1), y = v => (6 + (H - B - 6) * (1 - v / max)).toFixed(1);
  let svg = '<svg viewBox="0 0 ' + W + " " + H + '" width="' + W + '" height="' + H + '" role="img" data-scope="' + esc(scope)
    + '" data-chart="' + name + '"><title>' + esc(title) + "</title>";
  svg += '<line x1="' + L + '" y1="' + (H - B) + '" x2="' + W + '" y2="' + (H - B) + '" stroke="#bbb"/>';
  svg += '<text x="' + (L - 4) + '" y="12" font-size="10" text-anchor="end" fill="#555">' + esc(+max.toPrecision(3)) + "</text>";
  svg += '<text x="' + (L - 4) + '" y="' + (H - B) + '" font-size="10" text-anchor="end" fill="#555">0 ' + esc(unit) + "</text>";
  for (const f of [1, 2 / 3, 1 / 3, 0]) {
    const back = span * f, label = !back ? "now" : (span >= 180 ? "-" + +(back / 60).toFixed(1) + " min" : "-" + Math.round(back) + " s");
    svg += '<text x="' + x(now - back) + '" y="' + (H - 3) + '" font-size="10" text-anchor="' + (f === 1 ? "start" : (f ? "middle" : "end"))
      + '" fill="#777">' + label + "</text>";
  }
  for (const e of events) {
    if (now - e.t > span) continue;
    const color = e.kind === "breaker" ? MARKS[e.to] : MARKS.ejected;
    const what = e.kind === "breaker" ? "breaker " + e.upstream + ": " + e.from + " -> " + e.to : "ejected " + e.target + " for " + e.for_s + " s";
    svg += '<line class="mark" x1="' + x(e.t) + '" y1="4" x2="' + x(e.t) + '" y2="' + (H - B) + '" stroke="' + color
      + '" stroke-dasharray="3,2"><title>' + esc(clock(e.t) + " " + what) + "</title></line>";
  }
  let legend = L + 4;
  for (const l of lines) {
    let path = "", dots = "", prev = null;
    const v = l.values, joined = i => i >= 0 && i < v.length && v[i][1] !== null;
    for (let i = 0; i < v.length; i++) {
      const [t, value] = v[i], pen = prev !== null && t - prev <= every * 1.5 && joined(i - 1);
      prev = t;
      if (value === null) continue;
      path += (pen ? "L" : "M") + x(t) + "," + y(value);
      const next = joined(i + 1) && v[i + 1][0] - t <= every * 1.5;
      if (!pen && !next) dots += '<circle cx="' + x(t) + '" cy="' + y(value) + '" r="2" fill="' + l.color + '"/>';   // a lone point
    }
    svg += '<path d="' + (path || "M0,0") + '" fill="none" stroke-width="1.6" stroke="' + l.color + '" data-series="' + esc(l.name)
      + '" data-values="' + esc(JSON.stringify(l.values)) + '"/>' + dots;
    svg += '<text x="' + legend + '" y="14" font-size="10" fill="' + l.color + '">' + esc(l.name) + "</text>";
    legend += 8 + 6 * l.name.length;
  }
  return svg + "</svg>";
}
function charts(h){
  const samples = h.samples, scopes = samples.length ? Object.keys(samples[samples.length - 1].series) : [];
  if (!scopes.length) return;
  // 15 minutes once the gateway has run that long; until then the time it has run (>= 1 min).
  const span = Math.min(900, Math.max(60, h.now - samples[0].t + h.every_s));
  let html = "";
  for (const scope of scopes) {
    const points = f => samples.filter(s => s.series[scope]).map(s => [s.t, f(s.series[scope])]);
    const classes = [...new Set(samples.flatMap(s => s.series[scope] ? Object.keys(s.series[scope].rps) : []))].sort();
    const marks = h.events.filter(e => scope === "gateway" || scope === "upstream " + e.upstream);
    html += "<h3>" + esc(scope === "gateway" ? "whole gateway" : scope) + '</h3><div class="charts">'
      + chart(scope, "rps", scope + ": requests per second by status class", "req/s",
              classes.map(c => ({name: c, color: COLORS[c] || "#444", values: points(s => s.rps[c] ?? 0)})), marks, h.now, h.every_s, span)
      + chart(scope, "latency", scope + ": latency percentiles", "ms",
              ["p50", "p95", "p99"].map(q => ({name: q, color: COLORS[q], values: points(s => s[q])})), marks, h.now, h.every_s, span)
      + chart(scope, "errors", scope + ": error rate (5xx share)", "%",
              [{name: "5xx %", color: COLORS.errors, values: points(s => s.error_rate === null ? null : +(100 * s.error_rate).toFixed(2))}],
              marks, h.now, h.every_s, span)
      + "</div>";
  }
  document.getElementById("charts").innerHTML = html;
}
function health(t, b, u){
  if (t.down) return cls("down", "down");
  if (t.ejected_for > 0) return cls("ejected, back in " + Math.ceil(t.ejected_for) + " s", "ejected");
  if (b && b.state !== "closed") return cls("up, but breaker " + b.state.replace("_", "-"), b.state);
  return cls("up", "up");
}
async function refresh(){
  try {
    const s = await get("/status");
    const h = await get("/status/history");
    document.getElementById("error").textContent = "";
    document.getElementById("meta").textContent = "version " + s.version + " - up " + Math.round(s.uptime_s) + " s - "
      + (s.draining ? "DRAINING" : (s.ready ? "ready" : "NOT READY")) + " - config " + s.config + " - " + s.time;
    const q = s.requests, rate = last ? ((q.total - last.total) / ((s.uptime_s - last.uptime) || 1)).toFixed(1) : "-";
    last = {total: q.total, uptime: s.uptime_s};
    table("requests", ["total", "req/s", "in flight", "by class", "rate limited"],
      [row([q.total, rate, q.in_flight, byClass(q.by_class), q.rate_limited])]);
    charts(h);
    const errors = {};
    for (const e of h.last_errors) errors[e.upstream + " " + e.target] = e;
    const up = [];
    for (const [name, u] of Object.entries(s.upstreams)) {
      const b = u.breaker, state = b ? cls(b.state, b.state) + (b.state === "open" ? " (retry in " + b.retry_after + " s)" : "") : "no breaker";
      for (const t of u.targets) {
        const e = errors[name + " " + t.url];
        const lastError = t.last_error ? esc(t.last_error) + (e && e.error === t.last_error ? " at " + ago(e.at, h.now) : "") : "";
        up.push(row([esc(name), state, esc(u.balance), esc(t.url), health(t, b, u), t.in_flight, t.requests, lastError]));
      }
    }
    table("upstreams", ["upstream", "breaker", "balance", "target", "health", "in flight", "requests", "last error"], up);
    table("events", ["time", "upstream", "what"], h.events.slice().reverse().slice(0, 20).map(e => row([ago(e.t, h.now), esc(e.upstream),
      e.kind === "breaker" ? "breaker " + cls(e.from, e.from) + " &rarr; " + cls(e.to, e.to)
                           : cls("ejected", "ejected") + " " + esc(e.target) + " for " + esc(e.for_s) + " s"])));
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
