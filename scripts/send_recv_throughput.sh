#!/usr/bin/env bash
# `send`/`recv` of a memory image between two processes over loopback, into a
# destination prepared in advance (`recv --memory SIZE --prealloc`: memory committed
# before `recv` listens) and into fresh destination memory, RUNS interleaved pairs.
#
# Usage: scripts/send_recv_throughput.sh [SIZE] [RUNS]   (build first: cargo build --release)
#   SIZE in GiB, e.g. 2G (default); RUNS default 5. The image (alternating 1 MiB of
#   random bytes and 1 MiB of zeros, all written) is made on /dev/shm and deleted on
#   exit. JSONL=FILE keeps the raw reports ({"label", "report"} per line).
#   QEMU=1 also migrates the same image between two QEMU processes in every pair
#   (scripts/qemu_migrate.py: multifd with 2 channels, the destination prepared or
#   fresh in the same way) and prints livemig ÷ QEMU for each destination.
#   SEND_FLAGS="..." adds flags to every `livemig send` (e.g. --tcp-congestion cubic).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-2G}
RUNS=${2:-5}
BIN=${LIVEMIG:-target/release/livemig}
[ -x "$BIN" ] || cargo build --release --quiet
OUT=$(mktemp -d)
IMG=/dev/shm/livemig-send-recv-$$.img
RECV_PID=
trap '[ -z "$RECV_PID" ] || kill "$RECV_PID" 2>/dev/null || true; rm -f "$IMG"; rm -rf "$OUT"' EXIT
python3 - "$IMG" "${SIZE%G}" <<'PY'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
chunk = 1 << 20
zero = bytes(chunk)
with open(path, "wb") as f:
    for i in range((gib << 30) // chunk):
        f.write(os.urandom(chunk) if i % 2 == 0 else zero)
PY

one() { # label, recv flags...
  local label=$1 port=$((20000 + RANDOM % 20000))
  shift
  "$BIN" recv --plaintext --listen 127.0.0.1:$port --json "$@" >"$OUT/recv.out" 2>"$OUT/recv.err" &
  RECV_PID=$!
  for _ in $(seq 1 600); do
    ss -ltnH "sport = :$port" | grep -q . && break
    kill -0 $RECV_PID 2>/dev/null || break
    sleep 0.1
  done
  # shellcheck disable=SC2086 # SEND_FLAGS is a list of flags
  "$BIN" send --plaintext --to 127.0.0.1:$port --image "$IMG" --json ${SEND_FLAGS:-} >"$OUT/send.out" 2>"$OUT/send.err" || true
  wait $RECV_PID || true
  RECV_PID=
  python3 - "$label" "$OUT/send.out" "$OUT/recv.out" >>"$OUT/all.jsonl" <<'PY'
import json, sys
def last(p):
    ls = [l for l in open(p).read().splitlines() if l.strip()]
    try:
        return json.loads(ls[-1])
    except Exception:
        return {"error": "no JSON report"}
s, r = last(sys.argv[2]), last(sys.argv[3])
s["receiver_verified"] = r.get("verified", False) and r.get("digest") == s.get("digest")
s["receiver_setup_ms"] = r.get("setup_ms")
s["memory_prepared"] = r.get("memory_prepared")
print(json.dumps({"label": sys.argv[1], "report": s}))
PY
  echo "$label done" >&2
}

qemu() { # destination: prepared | fresh
  python3 scripts/qemu_migrate.py "$IMG" "${SIZE%G}" "$1" 2 |
    python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print(json.dumps({"label": "qemu " + r["destination"], "report": r}))' >>"$OUT/all.jsonl"
  echo "qemu $1 done" >&2
}

for i in $(seq 1 "$RUNS"); do
  one "prepared" --memory "$SIZE" --prealloc
  [ "${QEMU:-0}" != 1 ] || qemu prepared
  one "fresh"
  [ "${QEMU:-0}" != 1 ] || qemu fresh
done
[ -z "${JSONL:-}" ] || cp "$OUT/all.jsonl" "$JSONL"
python3 - "$OUT/all.jsonl" <<'PY'
import json, statistics, sys
rows = {}
for l in open(sys.argv[1]):
    d = json.loads(l)
    rows.setdefault(d["label"], []).append(d["report"])
print("| destination | n | verified (both sides) | send total ms (runs) | guest GiB/s median (min–max) | receiver setup ms median |")
print("|---|---|---|---|---|---|")
for label, rs in rows.items():
    good = [r for r in rs if "error" not in r]
    ok = len(good) == len(rs) and all(r["verified"] and r.get("receiver_verified", True) for r in good)
    g = [r["guest_gib_per_s"] for r in good]
    print(f"| {label} | {len(rs)} | {ok} | {', '.join(str(round(r['total_ms'])) for r in good)} | "
          f"{statistics.median(g):.2f} ({min(g):.2f}–{max(g):.2f}) | "
          f"{statistics.median(r.get('receiver_setup_ms') or r.get('setup_ms') or 0 for r in good):.1f} |")
for dest in ("prepared", "fresh"):
    if dest in rows and "qemu " + dest in rows:
        ours = statistics.median(r["guest_gib_per_s"] for r in rows[dest])
        theirs = statistics.median(r["guest_gib_per_s"] for r in rows["qemu " + dest])
        print(f"{dest}: livemig ÷ QEMU (medians) = {ours / theirs:.2f}")
PY
