#!/bin/bash
# Two gateways measured at the same moment: both daemons pinned to one CPU, each loaded by its own
# wrk at the same time, so the scheduler gives each half of that core and the ratio of their
# req/s is the inverse ratio of their CPU time a request. Whatever the machine does during the
# run (this VM's speed drifts tens of percent) falls on both alike, where rows run one after
# another (bench/run.sh anchors) differ by several percent between runs of one build.
#
#   bench/paired.sh A.yaml B.yaml [CONNS] [ROUNDS]   # prints B/A per round and the median
#   bench/paired.sh bench/anchors-gateway.yaml bench/anchors-trace.yaml 32 5   # what tracing costs
#   TWISTD_A=/old/checkout/.venv/bin/twistd bench/paired.sh bench/anchors-gateway.yaml X.yaml
#                                                     # the same config, two builds (X: a copy on another port)
#   HEADER="Authorization: Bearer $TOKEN" bench/paired.sh ...-jwt.yaml ...   # sent by both wrk
#
# The configs must listen on different ports (each `tcp:PORT` endpoint) and proxy GET
# /api/users/1 to 127.0.0.1:9001 as bench/anchors-*.yaml do; this script starts that upstream
# (nginx answering {"ok":true}) and an OTLP sink on 4318 (bench/otlp-sink.py) on CPU 0 with the
# two wrk, the gateways on CPU 1. Needs nginx and wrk (Debian: nginx, wrk).
set -euo pipefail
[[ $# -ge 2 ]] || { sed -n '2,18p' "$0"; exit 2; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
A="$1"; B="$2"; CONNS="${3:-32}"; ROUNDS="${4:-5}"; DURATION="${DURATION:-10}"
TWISTD_A="${TWISTD_A:-$ROOT/.venv/bin/twistd}"; TWISTD_B="${TWISTD_B:-$ROOT/.venv/bin/twistd}"
for tool in nginx wrk taskset; do command -v $tool >/dev/null || { echo "paired.sh: $tool is needed" >&2; exit 1; }; done
port_of() { grep -o 'tcp:[0-9]*' "$1" | head -1 | cut -d: -f2; }
PA="$(port_of "$A")"; PB="$(port_of "$B")"
[[ -n "$PA" && -n "$PB" && "$PA" != "$PB" ]] || { echo "paired.sh: $A and $B must listen on two different tcp:PORT endpoints" >&2; exit 1; }

WORK="$(mktemp -d /tmp/txgateway-paired-XXXXXX)"
PIDS=()
cleanup() { kill "${PIDS[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
mkdir -p "$WORK/nginx/logs"
cat > "$WORK/nginx.conf" <<EOF
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx; fastcgi_temp_path $WORK/nginx;
  uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  keepalive_requests 1000000;
  server { listen 127.0.0.1:9001 backlog=4096; location /users/1 { default_type application/json; return 200 '{"ok":true}'; } }
}
EOF
taskset -c 0 nginx -p "$WORK/nginx/" -c "$WORK/nginx.conf" -g 'daemon off;' & PIDS+=($!)
taskset -c 0 "$ROOT/.venv/bin/python" "$ROOT/bench/otlp-sink.py" 4318 >/dev/null & PIDS+=($!)
taskset -c 1 "$TWISTD_A" -n --pidfile= txgateway --config "$A" >"$WORK/a.log" 2>&1 & PIDS+=($!)
taskset -c 1 "$TWISTD_B" -n --pidfile= txgateway --config "$B" >"$WORK/b.log" 2>&1 & PIDS+=($!)
for port in "$PA" "$PB"; do
  for _ in $(seq 100); do curl -fs ${HEADER:+-H "$HEADER"} -o /dev/null "http://127.0.0.1:$port/api/users/1" && break; sleep 0.1; done
  curl -fs ${HEADER:+-H "$HEADER"} -o /dev/null "http://127.0.0.1:$port/api/users/1" \
    || { echo "paired.sh: nothing answers 200 on port $port (see $WORK/*.log)" >&2; exit 1; }
done

both() {  # SECONDS -> "reqs_a reqs_b"
  taskset -c 0 wrk -t1 -c"$CONNS" -d"$1"s ${HEADER:+-H "$HEADER"} "http://127.0.0.1:$PA/api/users/1" >"$WORK/wrk-a" & local wa=$!
  taskset -c 0 wrk -t1 -c"$CONNS" -d"$1"s ${HEADER:+-H "$HEADER"} "http://127.0.0.1:$PB/api/users/1" >"$WORK/wrk-b"
  wait $wa
  echo "$(awk '/Requests\/sec/{print $2}' "$WORK/wrk-a") $(awk '/Requests\/sec/{print $2}' "$WORK/wrk-b")"
}
both 3 >/dev/null      # warm-up
ratios=()
for round in $(seq "$ROUNDS"); do
  read -r ra rb <<<"$(both "$DURATION")"
  ratio="$(python3 -c "print(f'{$rb / $ra:.3f}')")"
  ratios+=("$ratio")
  echo "round $round: A $ra req/s, B $rb req/s, B/A $ratio"
done
echo "median B/A over $ROUNDS rounds at $CONNS connections: $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}')"
