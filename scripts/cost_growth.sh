#!/usr/bin/env bash
# Cost growth with guest size: what a migration costs at 1, 2, 4, 8 GiB (`bench`, one
# process holding both sides, with and without a dirtying guest) and at the same
# sizes plus 12 GiB as `send`/`recv` of an image between two processes (so that the
# sender's and the receiver's memory can be told apart).
#
# Usage: scripts/cost_growth.sh [RUNS]        (build first: cargo build --release)
#   RUNS (default 3) interleaved runs of every case; the tables show medians.
#   BENCH_SIZES, RATES, HOT, SEND_SIZES and IMAGE_DIR may be overridden from the
#   environment. Images are sparse files (alternating 1 MiB random and 1 MiB hole:
#   half the guest is data) under IMAGE_DIR (default /tmp); each is deleted on exit.
#   Raw reports go to $JSONL when set (one {"label", "report"} object per line).
#
# `send`/`recv` receivers are prepared in advance (`recv --memory SIZE --prealloc`),
# so the whole guest is resident and `receiver_anon_rss_beyond_guest_bytes` is the
# receiver's own memory. The sender maps the image file: all of its anonymous
# memory is its own.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
BENCH_SIZES=${BENCH_SIZES:-"1G 2G 4G 8G"}
RATES=${RATES:-"0 100"}
HOT=${HOT:-64M}
SEND_SIZES=${SEND_SIZES:-"1G 2G 4G 8G 12G"}
IMAGE_DIR=${IMAGE_DIR:-/tmp}
BIN=${LIVEMIG:-target/release/livemig}
[ -x "$BIN" ] || cargo build --release --quiet
OUT=$(mktemp -d)
IMAGES=()
RECV_PID=
cleanup() {
  [ -n "$RECV_PID" ] && kill "$RECV_PID" 2>/dev/null || true
  for f in "${IMAGES[@]}"; do rm -f "$f"; done
  rm -rf "$OUT"
}
trap cleanup EXIT

gib() { # 12G -> 12
  echo "${1%G}"
}

make_image() { # size -> path (sparse: 1 MiB random, 1 MiB hole, ...)
  local path="$IMAGE_DIR/livemig-cost-$1-$$.img"
  IMAGES+=("$path")
  python3 - "$path" "$(gib "$1")" <<'PY'
import os, sys
path, gib = sys.argv[1], int(sys.argv[2])
chunk = 1 << 20
with open(path, "wb") as f:
    f.truncate(gib << 30)
    for i in range(0, (gib << 30) // chunk, 2):
        f.seek(i * chunk)
        f.write(os.urandom(chunk))
PY
  echo "$path"
}

record() { # label, file with the report as its last line
  python3 - "$1" "$2" >>"$OUT/all.jsonl" <<'PY'
import json, sys
label, path = sys.argv[1], sys.argv[2]
lines = [l for l in open(path).read().splitlines() if l.strip()]
try:
    report = json.loads(lines[-1])
except Exception:
    report = {"error": "no JSON report", "tail": lines[-3:]}
print(json.dumps({"label": label, "report": report}))
PY
}

listening() { # port
  ss -ltnH "sport = :$1" | grep -q .
}

send_recv() { # size, image, run
  local size=$1 img=$2 run=$3 port=$((20000 + RANDOM % 20000))
  "$BIN" recv --plaintext --listen 127.0.0.1:$port --memory "$size" --prealloc --json \
    >"$OUT/recv.out" 2>"$OUT/recv.err" &
  RECV_PID=$!
  # Committing the prepared memory comes before listening; wait for the socket.
  for _ in $(seq 1 600); do
    listening $port && break
    kill -0 $RECV_PID 2>/dev/null || break
    sleep 0.1
  done
  "$BIN" send --plaintext --to 127.0.0.1:$port --image "$img" --json \
    >"$OUT/send.out" 2>"$OUT/send.err" || true
  wait $RECV_PID || true
  RECV_PID=
  record "send $size" "$OUT/send.out"
  record "recv $size" "$OUT/recv.out"
  echo "send/recv $size run $run done" >&2
}

for run in $(seq 1 "$RUNS"); do
  for size in $BENCH_SIZES; do
    for rate in $RATES; do
      "$BIN" bench --memory "$size" --dirty-rate "$rate" --hot-set "$HOT" --json \
        >"$OUT/bench.out" 2>"$OUT/bench.err" || true
      record "bench $size $rate" "$OUT/bench.out"
      echo "bench $size rate $rate run $run done" >&2
    done
  done
done

declare -A IMG
for size in $SEND_SIZES; do
  # The largest image is made (and deleted) on its own, to bound disk and memory use.
  [ "$size" = 12G ] && continue
  IMG[$size]=$(make_image "$size")
done
for run in $(seq 1 "$RUNS"); do
  for size in $SEND_SIZES; do
    [ "$size" = 12G ] && continue
    send_recv "$size" "${IMG[$size]}" "$run"
  done
done
for size in $SEND_SIZES; do
  [ "$size" = 12G ] || { rm -f "${IMG[$size]}"; continue; }
done
if [[ " $SEND_SIZES " == *" 12G "* ]]; then
  img=$(make_image 12G)
  for run in $(seq 1 "$RUNS"); do
    send_recv 12G "$img" "$run"
  done
  rm -f "$img"
fi

[ -n "${JSONL:-}" ] && cp "$OUT/all.jsonl" "$JSONL"
python3 - "$OUT/all.jsonl" "$HOT" <<'PY'
import json, statistics, sys
from collections import OrderedDict

rows = OrderedDict()
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["label"], []).append(r["report"])

def med(vals, nd=1):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.median(vals)
    return f"{m:.{nd}f}" + (f" ({min(vals):.{nd}f}–{max(vals):.{nd}f})" if len(vals) > 1 else "")

def ok(rs):
    return all("error" not in r and r.get("verified") for r in rs)

def sender_setup(r):
    # Start to commit, less the rounds (the final round is in the downtime), the
    # downtime and the sampled audits: setup, mostly (connect, hello, layout, the
    # destination's allocation).
    rounds = sum(x["duration_ms"] for x in r["round_table"][:-1])
    return r["total_ms"] - rounds - r["downtime_ms"] - r.get("audit_ms", 0.0)

def harvest(r):
    hs = [x["harvest_ms"] for x in r["round_table"][:-1]]
    return statistics.median(hs) if hs else None

MIB = float(1 << 20)
print(f"bench (one process, both sides), dirty workload over a {sys.argv[2]} hot set; "
      "median (min–max) of interleaved runs")
print()
print("| guest | MB/s | n | verified | total ms | downtime ms | final pages ms | commit ms | digest ms | "
      "other ms | predicted ms | sender setup ms | receiver setup ms | harvest ms/round | rounds |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
for label, rs in rows.items():
    if not label.startswith("bench"):
        continue
    _, size, rate = label.split()
    good = [r for r in rs if "error" not in r]
    b = [r["downtime_breakdown"] for r in good]
    other = [r["downtime_ms"] - x["final_pages_ms"] - x["commit_ms"] - x["digest_ms"]
             for r, x in zip(good, b)]
    print(f"| {size} | {rate} | {len(rs)} | {ok(rs)} | {med([r['total_ms'] for r in good], 0)} | "
          f"{med([r['downtime_ms'] for r in good])} | {med([x['final_pages_ms'] for x in b])} | "
          f"{med([x['commit_ms'] for x in b])} | {med([x['digest_ms'] for x in b], 4)} | "
          f"{med(other)} | {med([r['predicted_downtime_ms'] for r in good])} | "
          f"{med([sender_setup(r) for r in good])} | "
          f"{med([r['receiver']['setup_ms'] for r in good])} | "
          f"{med([harvest(r) for r in good], 3)} | {med([r['rounds'] for r in good], 0)} |")
print()
print("send/recv of an image (two processes; receiver prepared with --memory SIZE --prealloc)")
print()
print("| guest | n | verified | send total ms | guest GiB/s | downtime ms | sender setup ms | "
      "receiver setup ms | sender anon RSS MiB | receiver RSS beyond guest MiB | "
      "sender ÷ guest % | receiver beyond ÷ guest % |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for label, rs in rows.items():
    if not label.startswith("send"):
        continue
    size = label.split()[1]
    recv = rows.get("recv " + size, [])
    good = [r for r in rs if "error" not in r]
    rgood = [r for r in recv if "error" not in r]
    both = ok(rs) and ok(recv) and all(a["digest"] == b["digest"] for a, b in zip(rs, recv))
    s_rss = [r.get("sender_anon_rss_peak_bytes", 0) / MIB for r in good]
    r_rss = [r.get("receiver_anon_rss_beyond_guest_bytes", 0) / MIB for r in rgood]
    s_pct = [r.get("sender_anon_rss_peak_bytes", 0) * 100 / r["memory_bytes"] for r in good]
    r_pct = [r.get("receiver_anon_rss_beyond_guest_bytes", 0) * 100 / r["memory_bytes"] for r in rgood]
    print(f"| {size} | {len(rs)} | {both} | {med([r['total_ms'] for r in good], 0)} | "
          f"{med([r['guest_gib_per_s'] for r in good], 2)} | {med([r['downtime_ms'] for r in good])} | "
          f"{med([sender_setup(r) for r in good])} | {med([r['setup_ms'] for r in rgood])} | "
          f"{med(s_rss)} | {med(r_rss)} | {med(s_pct, 2)} | {med(r_pct, 2)} |")
PY
