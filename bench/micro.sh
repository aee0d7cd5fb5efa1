#!/usr/bin/env bash
# Instructions per proxied request, counted by callgrind: the same number on a quiet or a
# busy machine, so it can compare two versions of the code. Usage: bench/micro.sh [--jwt]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
PY=.venv/bin/python
out=$(mktemp -d)
extra=("$@")
count() {  # $1 = number of requests; the difference of two runs cancels start-up costs
  valgrind --tool=callgrind --callgrind-out-file="$out/cg.$1" "$PY" bench/micro.py --once -n "$1" "${extra[@]}" \
    >/dev/null 2>"$out/log.$1" || { cat "$out/log.$1" >&2; exit 1; }
  grep -E '^(summary|totals):' "$out/cg.$1" | head -1 | awk '{print $2}'
}
a=$(count 1000); b=$(count 3000)
echo "$(( (b - a) / 2000 )) instructions per request (${extra[*]:-plain proxy})"
rm -rf "$out"
