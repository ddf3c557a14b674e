#!/usr/bin/env bash
# Re-measure the transport-mode figures quoted in docs/BENCHMARKS.md ("Second session: transport modes").
# Usage: scripts/transport_figures.sh [OUT.jsonl]   (needs a release build: cargo build --release)
# Each line of OUT is {"label": ..., "report": <bench --json output>}; summarise with
# scripts/summarise_figures.py OUT.jsonl. Runs of one comparison are interleaved so
# that drifting machine load hits both sides alike. Takes about 5 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=target/release/livemig
OUT=${1:-docs/results/transport_figures.jsonl}
: > "$OUT"
run() {
  local label=$1; shift
  local line
  line=$("$BIN" bench --json "$@" 2>/dev/null | tail -n 1)
  printf '{"label":"%s","report":%s}\n' "$label" "$line" >> "$OUT"
  echo "$label: $(echo "$line" | python3 -c 'import json,sys; d=json.load(sys.stdin); print(round(d["guest_gib_per_s"],2), "GiB/s", round(d["total_ms"]), "ms", "verified" if d["verified"] and d.get("memory_equal", True) else "NOT VERIFIED")')"
}
G="--memory 2G --dirty-rate 0"
for i in 1 2 3; do run "default" ; done
for i in 1 2 3 4 5; do
  run "multichannel baseline" $G --baseline
  run "multichannel prealloc baseline" $G --baseline --prealloc
done
for i in 1 2 3; do
  run "standard" $G --mode standard
  run "multichannel" $G
  run "auto" $G --mode auto
  run "multichannel splice" $G --splice
done
for i in 1 2; do
  run "standard 10gbit" $G --mode standard --bandwidth 10gbit
  run "multichannel 10gbit" $G --bandwidth 10gbit
  run "auto 10gbit" $G --mode auto --bandwidth 10gbit
done
for i in 1 2; do
  run "compress zstd:1 1gbit" $G --mode compress --codec zstd:1 --bandwidth 1gbit
  run "auto 1gbit" $G --mode auto --bandwidth 1gbit
done
run "compress lz4 1gbit" $G --mode compress --codec lz4 --bandwidth 1gbit
run "compress zstd:3 1gbit" $G --mode compress --codec zstd:3 --bandwidth 1gbit
