#!/usr/bin/env bash
# TLS and HTTP/2 through txgateway beside nginx (1 worker), in one run: each gateway pinned to
# CPU 1, the load generators and the upstream (nginx answering {"ok":true}) to CPU 0.
#
#   bench/tls-peers.sh [TWISTD]        # default: .venv/bin/twistd of this checkout
#   ROUNDS=2 DURATION=8 H2_N=100000 bench/tls-peers.sh
#
# Rows, for nginx then txgateway, ROUNDS times:
#   http          wrk -c32 keep-alive, plain HTTP/1.1
#   https         wrk -c32 keep-alive, HTTP/1.1 over TLS (ECDSA P-256 certificate)
#   h2-32x10      h2load: 32 connections x 10 concurrent streams, HTTP/2 over TLS (p99 from its log)
#   h2-1x100      h2load: one connection, 100 concurrent streams
#   hs-ecdsa      wrk -c32 with "Connection: close": a new TCP connection and full TLS handshake
#   hs-rsa        the same on an RSA 2048 certificate                     per request (wrk does not resume)
#   resume        openssl s_time -reuse, one client in sequence: resumed handshakes per second
#   new           openssl s_time -new, the same client: full handshakes per second (to compare with resume)
# and the gateway's RSS after its rounds. Needs nginx, wrk, h2load (nghttp2-client), openssl, taskset:
# installed with apt-get if missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TWISTD="${1:-$ROOT/.venv/bin/twistd}"
ROUNDS="${ROUNDS:-2}"; DURATION="${DURATION:-8}"; H2_N="${H2_N:-100000}"
WORK="${WORK:-${TMPDIR:-/tmp}/txgateway-tls-peers}"
UP=9301; NG=(9340 9341 9342); GW=(9350 9351 9352)
need=()
for tool in nginx:nginx wrk:wrk h2load:nghttp2-client openssl:openssl taskset:util-linux curl:curl; do
  command -v "${tool%%:*}" >/dev/null || need+=("${tool##*:}")
done
[[ ${#need[@]} -eq 0 ]] || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
mkdir -p "$WORK"/{up,ng}/{tmp,proxy_tmp}
cd "$WORK"
[[ -f ecdsa.pem ]] || {
  openssl ecparam -name prime256v1 -genkey -noout -out ecdsa.key
  openssl req -x509 -new -key ecdsa.key -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -out ecdsa.pem 2>/dev/null
  openssl req -x509 -newkey rsa:2048 -nodes -keyout rsa.key -days 30 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost,IP:127.0.0.1 -out rsa.pem 2>/dev/null; }
common="events { worker_connections 8192; }
http { access_log off; keepalive_requests 10000000; keepalive_timeout 75s;"
cat > up/nginx.conf <<CONF
worker_processes 1; pid $WORK/up/nginx.pid; error_log $WORK/up/error.log warn;
$common client_body_temp_path $WORK/up/tmp; proxy_temp_path $WORK/up/proxy_tmp;
  server { listen 127.0.0.1:$UP backlog=4096; default_type application/json;
    location = /users/1 { return 200 '{"ok":true}'; } } }
CONF
cat > ng/nginx.conf <<CONF
worker_processes 1; pid $WORK/ng/nginx.pid; error_log $WORK/ng/error.log warn;
$common client_body_temp_path $WORK/ng/tmp; proxy_temp_path $WORK/ng/proxy_tmp;
  ssl_session_cache shared:tls:10m; ssl_protocols TLSv1.2 TLSv1.3;
  upstream api { server 127.0.0.1:$UP; keepalive 512; keepalive_requests 10000000; }
  server { listen 127.0.0.1:${NG[0]} backlog=4096;
    listen 127.0.0.1:${NG[1]} ssl http2 backlog=4096; ssl_certificate $WORK/ecdsa.pem; ssl_certificate_key $WORK/ecdsa.key;
    location /api/users/ { proxy_pass http://api/users/; proxy_http_version 1.1; proxy_set_header Connection ""; } }
  server { listen 127.0.0.1:${NG[2]} ssl backlog=4096; ssl_certificate $WORK/rsa.pem; ssl_certificate_key $WORK/rsa.key;
    location /api/users/ { proxy_pass http://api/users/; proxy_http_version 1.1; proxy_set_header Connection ""; } } }
CONF
# The peer harness's txgw route (bench/anchors-gateway.yaml) behind these listeners.
{ cat <<CONF
listen:
  - endpoint: "tcp:${GW[0]}:interface=127.0.0.1:backlog=4096"
  - endpoint: "tcp:${GW[1]}:interface=127.0.0.1:backlog=4096"
    tls: {certificates: [{cert: $WORK/ecdsa.pem, key: $WORK/ecdsa.key}], alpn: [h2, http/1.1]}
  - endpoint: "tcp:${GW[2]}:interface=127.0.0.1:backlog=4096"
    tls: {certificates: [{cert: $WORK/rsa.pem, key: $WORK/rsa.key}]}
CONF
  sed -n '/^trusted_proxies:/,$p' "$ROOT/bench/anchors-gateway.yaml" \
    | sed -e "s|127.0.0.1:9001|127.0.0.1:$UP|" -e "s|^access_log: .*|access_log: $WORK/access.log|"; } > gateway.yaml
taskset -c 0 nginx -p "$WORK/up/" -c "$WORK/up/nginx.conf" -g 'daemon off;' & UPID=$!
trap 'kill $UPID 2>/dev/null || true' EXIT
sleep 1
path=/api/users/1
row() { printf '%-8s %-10s %10s req/s  %s\n' "$1" "$2" "$3" "$4"; }
wrk_row() {  # WHO ROW URL [HEADER]
  local out; out=$(taskset -c 0 wrk -t1 -c32 -d"${DURATION}s" --latency ${4:+-H "$4"} "$3" 2>&1)
  row "$1" "$2" "$(awk '/Requests\/sec/{print $2}' <<<"$out")" \
      "p99 $(awk '$1=="99%"{print $2}' <<<"$out")  $(grep -o 'Non-2xx.*\|Socket errors.*' <<<"$out" | tr '\n' ' ')"
}
h2_row() {  # WHO ROW URL CONNS STREAMS
  local out; rm -f h2.log
  out=$(taskset -c 0 h2load -n "$H2_N" -c "$4" -m "$5" -t 1 --log-file=h2.log "$3" 2>&1)
  local p99; p99=$(awk -F'\t' '{print $3}' h2.log | sort -n | awk '{v[NR]=$1} END {if (NR) printf "%.2fms", v[int(NR*0.99)]/1000}')
  row "$1" "$2" "$(awk '/^finished in/{print $4}' <<<"$out")" "p99 $p99  ($(grep -m1 -o '[0-9]* succeeded, [0-9]* failed' <<<"$out"))"
}
stime_row() {  # WHO ROW PORT -new|-reuse: connections per real second of one client in sequence
  local out; out=$(taskset -c 0 openssl s_time -connect "127.0.0.1:$3" "$4" -time "$DURATION" 2>&1 </dev/null)
  row "$1" "$2" "$(awk '/connections in .* real seconds/{printf "%.0f", $1/$4; exit}' <<<"$out")" "(one client, in sequence)"
}
measure() {  # WHO HTTP_PORT ECDSA_PORT RSA_PORT
  wrk_row "$1" http "http://127.0.0.1:$2$path"
  wrk_row "$1" https "https://127.0.0.1:$3$path"
  h2_row "$1" h2-32x10 "https://127.0.0.1:$3$path" 32 10
  h2_row "$1" h2-1x100 "https://127.0.0.1:$3$path" 1 100
  wrk_row "$1" hs-ecdsa "https://127.0.0.1:$3$path" "Connection: close"
  wrk_row "$1" hs-rsa "https://127.0.0.1:$4$path" "Connection: close"
  stime_row "$1" new "$3" -new
  stime_row "$1" resume "$3" -reuse
}
for round in $(seq "$ROUNDS"); do
  echo "round $round"
  taskset -c 1 nginx -p "$WORK/ng/" -c "$WORK/ng/nginx.conf" -g 'daemon off;' & NPID=$!
  sleep 1
  measure nginx "${NG[@]}"
  kill $NPID; wait $NPID 2>/dev/null || true
  taskset -c 1 "$TWISTD" -n --pidfile= txgateway --config "$WORK/gateway.yaml" > gateway.log 2>&1 & GPID=$!
  for _ in $(seq 100); do curl -sk -o /dev/null "https://127.0.0.1:${GW[1]}$path" && break; sleep 0.2; done
  measure txgw "${GW[@]}"
  echo "txgw RSS $(awk '/VmRSS/{print $2, $3}' /proc/$GPID/status)"
  kill $GPID; wait $GPID 2>/dev/null || true
done
