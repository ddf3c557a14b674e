#!/bin/bash
# One migration through `recv --serve` vs plain `recv`: `livemig send --image` of the
# same image, ROUNDS interleaved runs each, over loopback. Prints the sender's
# total_ms, guest GiB/s and wire Gbit/s per run, then each side's verified flag.
#
#   scripts/serve_vs_recv.sh IMAGE [ROUNDS]     (build first: cargo build --release)
set -euo pipefail
B=${LIVEMIG:-target/release/livemig}
IMG=${1:?usage: $0 IMAGE [ROUNDS]}
ROUNDS=${2:-3}
OUT=$(mktemp -d)
SP=$((20000 + RANDOM % 20000))
field() {
  python3 -c 'import json,sys; d=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(d["total_ms"], d["guest_gib_per_s"], d["wire_gbit_per_s"])'
}
"$B" recv --serve --plaintext --listen 127.0.0.1:$SP --json > "$OUT/serve.jsonl" 2>/dev/null &
SPID=$!
sleep 1
for i in $(seq 1 "$ROUNDS"); do
  P=$((SP + i))
  "$B" recv --plaintext --listen 127.0.0.1:$P --json > "$OUT/plain_$i.json" 2>/dev/null &
  RP=$!
  sleep 0.5
  echo "plain $i $("$B" send --plaintext --to 127.0.0.1:$P --image "$IMG" --json | field)"
  wait $RP
  echo "serve $i $("$B" send --plaintext --to 127.0.0.1:$SP --image "$IMG" --json | field)"
done
kill -TERM $SPID
wait $SPID
grep '"session_end"' "$OUT/serve.jsonl" | python3 -c 'import json,sys
for l in sys.stdin: d=json.loads(l); print("serve side", d["outcome"], "verified", d["verified"])'
for i in $(seq 1 "$ROUNDS"); do
  python3 -c 'import json,sys; print("plain side verified", json.load(open(sys.argv[1]))["verified"])' "$OUT/plain_$i.json"
done
rm -rf "$OUT"
