#!/usr/bin/env bash
# txgateway benchmark (`make bench`). See bench/README.md.
#
#   bench/run.sh                  # scenario "proxy": wrk direct vs through txgateway
#   bench/run.sh stream           # 1 GiB response through txgateway to a slow reader
#   bench/run.sh all              # proxy, then stream
#   bench/run.sh proxy --anchors  # ... then the shared peer harness with txgateway as a row
#   bench/run.sh anchors          # only the shared peer harness with txgateway as a row
#   bench/run.sh limits           # JWT + rate limit with each backend (local, redis, hybrid)
#   bench/run.sh shared           # two instances sharing one limit through Redis (redis, hybrid)
#   bench/run.sh balance          # breaker + least_request over 2 targets vs the plain proxy
#   bench/run.sh failover         # one of 2 targets killed during a 10 s load: what failed
#   bench/run.sh tls              # HTTPS vs HTTP through the gateway; new handshakes per second
#   bench/run.sh workers          # --workers 2 (both CPUs) vs one process (CPU 1): req/s ratio
#   bench/run.sh routes           # cache miss/hit and transform vs the plain route (issues 14, 15)
#
# Knobs (environment): DURATION=10 RUNS=3 WARMUP=2 CONNS="32 256" WRK_THREADS=1
#   CLIENT_CPU=0 GATEWAY_CPU=1 UPSTREAM_PORT=19001 GATEWAY_PORT=19080 QUIET_WAIT=20
#   STREAM_SIZE=1G STREAM_RATES="100 0" (MiB/s the stream client reads at; 0 = unpaced)
#   CACHE_MAX_MEMORY= (routes: the cached rows' max_memory; empty = the gateway's default)
#   ANCHORS_DIR=/tmp/anchors ANCHORS_ONLY=direct,fastify-plain,fastify-seed,twisted-agent,nginx-1w,txgw,txgw-jwt
#   SHARED_BENCH=../shared/bench (the peer harness to copy)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${VENV:-$ROOT/.venv}"
export TWISTD="${TWISTD:-$VENV/bin/twistd}"
CLIENT_CPU="${CLIENT_CPU:-0}"
GATEWAY_CPU="${GATEWAY_CPU:-1}"
export CLIENT_CPU GATEWAY_CPU

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SCENARIOS=()
# Scenarios of the other bench scripts: scenario -> script (bench/<script>.py).
declare -A SCRIPT_OF=([limits]=limits [shared]=limits [balance]=resilience [failover]=resilience
                      [workers]=workers [tls]=tls [routes]=routes)
declare -A BY_SCRIPT=()
ANCHORS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    proxy|stream) SCENARIOS+=("$1") ;;
    limits|shared|balance|failover|workers|tls|routes) BY_SCRIPT[${SCRIPT_OF[$1]}]+=" $1" ;;
    all) SCENARIOS+=(proxy stream) ;;
    anchors) ANCHORS=2 ;;
    --anchors) ANCHORS=1 ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) die "unknown argument: $1 (proxy, stream, all, limits, shared, balance, failover, workers, tls, routes, anchors, --anchors)" ;;
  esac
  shift
done
[[ ${#SCENARIOS[@]} -gt 0 || ${#BY_SCRIPT[@]} -gt 0 || $ANCHORS == 2 ]] || SCENARIOS=(proxy)

# -- what the bench needs ---------------------------------------------------------------
need=()
command -v wrk >/dev/null || need+=(wrk)
command -v nginx >/dev/null || need+=(nginx)
command -v taskset >/dev/null || need+=(util-linux)
command -v ps >/dev/null || need+=(procps)
command -v curl >/dev/null || need+=(curl)
command -v redis-server >/dev/null || need+=(redis-server)
command -v ss >/dev/null || need+=(iproute2)
if [[ ${#need[@]} -gt 0 ]]; then
  log "apt-get install -y ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null 2>&1 || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; }
fi
if [[ ! -x "$TWISTD" ]]; then
  log "no $TWISTD: make install"
  make -s install
fi
[[ "$(nproc --all)" -ge 2 ]] || die "needs at least 2 CPUs (gateway on CPU $GATEWAY_CPU, load on CPU $CLIENT_CPU)"

# This script, bench.py, wrk and the clients share the load generator's CPU.
taskset -cp "$CLIENT_CPU" $$ >/dev/null

rc=0
if [[ ${#SCENARIOS[@]} -gt 0 ]]; then
  "$VENV/bin/python" "$ROOT/bench/bench.py" "${SCENARIOS[@]}" || rc=$?
fi
for script in limits resilience workers tls routes; do
  if [[ -n "${BY_SCRIPT[$script]:-}" ]]; then
    # shellcheck disable=SC2086  # the scenario names are words
    "$VENV/bin/python" "$ROOT/bench/$script.py" ${BY_SCRIPT[$script]} || rc=$?
  fi
done

# -- the shared peer harness, with txgateway added as one row --------------------------
if [[ $ANCHORS != 0 ]]; then
  SHARED_BENCH="${SHARED_BENCH:-$ROOT/../shared/bench}"
  ANCHORS_DIR="${ANCHORS_DIR:-/tmp/anchors}"
  ANCHORS_ONLY="${ANCHORS_ONLY:-direct,fastify-plain,fastify-seed,twisted-agent,nginx-1w,txgw,txgw-jwt}"
  if [[ ! -x "$ANCHORS_DIR/run_anchors.sh" ]]; then
    [[ -d "$SHARED_BENCH" ]] || die "no peer harness at $SHARED_BENCH (set SHARED_BENCH)"
    log "copying $SHARED_BENCH to $ANCHORS_DIR"
    cp -r "$SHARED_BENCH" "$ANCHORS_DIR"
    chmod -R u+w "$ANCHORS_DIR"   # the shared folder may be read-only; the harness writes into its copy
  fi
  # The harness's own knobs (RUNS, DURATION, CONNS, WARMUP...) are read from the environment.
  log "peer harness: $ANCHORS_DIR/run_anchors.sh --only $ANCHORS_ONLY --add txgw, txgw-jwt (bench/anchors-gateway*.yaml)"
  "$ANCHORS_DIR/run_anchors.sh" --only "$ANCHORS_ONLY" \
    --add "txgw|9200|/api/users/1|none|gw|$TWISTD -n --pidfile= txgateway --config $ROOT/bench/anchors-gateway.yaml" \
    --add "txgw-jwt|9201|/api/users/1|jwt|gw|$TWISTD -n --pidfile= txgateway --config $ROOT/bench/anchors-gateway-jwt.yaml" \
    || rc=$?
fi
exit $rc
