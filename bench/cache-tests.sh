#!/usr/bin/env bash
# The public HTTP cache conformance suite (npm package http-cache-tests, by the RFC 9111
# editor) against a txgateway it starts: route / to the suite's origin, cache: on that route.
# Prints the pass counts by kind (required, optimal, check) beside the peers' results that
# ship inside the package (nginx, Varnish, Squid, Apache, Traffic Server, Fastly...).
#
#   make cache-tests            # or: bash bench/cache-tests.sh
#
# Environment: WORK (install dir, default $TMPDIR/http-cache-tests), ORIGIN_PORT (8000, the
# suite's origin), GW_PORT (8089), RUN (this run's files, default WORK), OUT (per-test results JSON), ID (run only that test, with
# the suite's dump of each request and response). Needs node and npm.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-${TMPDIR:-/tmp}/http-cache-tests}"
ORIGIN_PORT="${ORIGIN_PORT:-8000}"
GW_PORT="${GW_PORT:-8089}"
RUN="${RUN:-$WORK}"                 # this run's files: gateway config and logs, results
OUT="${OUT:-$RUN/result.json}"
TWISTD="${TWISTD:-$ROOT/.venv/bin/twistd}"
PKG="$WORK/node_modules/http-cache-tests"
command -v node >/dev/null && command -v npm >/dev/null || { echo "cache-tests: node and npm are needed" >&2; exit 2; }
if [[ ! -d "$PKG" ]]; then
  mkdir -p "$WORK"
  (cd "$WORK" && npm install --silent --no-audit --no-fund http-cache-tests@0.4.5 >/dev/null)
fi
wait_port() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
(cd "$PKG" && npm_package_config_port="$ORIGIN_PORT" npm_package_config_protocol=http \
  npm_package_config_pidfile="$RUN/origin.pid" exec node server/server.mjs >"$RUN/origin.log" 2>&1) &
PIDS+=($!)
cat >"$RUN/gateway.yaml" <<YAML
listen: [{endpoint: "tcp:$GW_PORT:interface=127.0.0.1"}]
access_log: "off"
cache: {max_memory: 64MiB, credentials: true, store_set_cookie: true}
upstreams:
  # the suite's origin fails some requests on purpose: its only target is never ejected for that
  origin: {targets: ["http://127.0.0.1:$ORIGIN_PORT"], preserve_host: true, passive_health: {consecutive_failures: 1000000}}
routes:
  - prefix: /
    upstream: origin
    cache: {}
YAML
rm -f "$RUN/gateway.log"
"$TWISTD" -n --pidfile= --logfile="$RUN/gateway.log" txgateway -c "$RUN/gateway.yaml" &
PIDS+=($!)
wait_port "$ORIGIN_PORT" && wait_port "$GW_PORT" || { echo "cache-tests: origin or gateway did not start" >&2; exit 1; }
if [[ -n "${ID:-}" ]]; then
  (cd "$PKG" && npm run --silent cli --base="http://127.0.0.1:$GW_PORT" --id="$ID")
  exit 0
fi
(cd "$PKG" && npm run --silent cli --base="http://127.0.0.1:$GW_PORT" >"$OUT")
cd "$PKG"
node --input-type=module - "$OUT" <<'JS'
import tests from './tests/index.mjs'
import fs from 'fs'
const kinds = {}
for (const s of tests) for (const t of s.tests) kinds[t.id] = t.kind || 'optimal'
const count = (r) => { const c = {}; for (const [id, v] of Object.entries(r)) { if (!(id in kinds)) continue; const k = kinds[id]; c[k] ??= [0, 0]; c[k][1]++; if (v === true) c[k][0]++ } return c }
const row = (name, c) => console.log(name.padEnd(14), ['required', 'optimal', 'check'].map(k => `${k} ${(c[k] || [0, 0])[0]}/${(c[k] || [0, 0])[1]}`).join('  '))
row('txgateway', count(JSON.parse(fs.readFileSync(process.argv[2]))))
for (const f of fs.readdirSync('results').filter(f => f.endsWith('.json')).sort()) row(f.replace('.json', ''), count(JSON.parse(fs.readFileSync('results/' + f))))
JS
echo "per-test results: $OUT"
