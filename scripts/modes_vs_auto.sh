#!/usr/bin/env bash
# `auto` against each fixed transport mode at several link rates, and the in-run
# memory-to-memory limit: `bench --memory 2G --dirty-rate 0` per mode, runs
# interleaved (mode by mode inside each run) so that drifting load hits all alike.
#
# Usage: scripts/modes_vs_auto.sh [OUT.jsonl] [RUNS]   (build first: cargo build --release)
#   RUNS defaults to 3 (uncapped: RUNS + 2, for a median of 5 of wire_vs_mem_limit);
#   BANDWIDTHS (default "uncapped 10gbit 1gbit") and MODES may be overridden.
# Each line of OUT is {"label": ..., "report": <bench --json>}; the script ends with
# a table (median (min–max) per label, best fixed mode and auto ÷ best).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${LIVEMIG:-target/release/livemig}
OUT=${1:-$(mktemp)}
RUNS=${2:-3}
BANDWIDTHS=${BANDWIDTHS:-"uncapped 10gbit 1gbit"}
MODES=${MODES:-"standard compress multichannel auto"}
[ -x "$BIN" ] || cargo build --release --quiet
: >"$OUT"
run() { # label, flags...
  local label=$1 line
  shift
  line=$("$BIN" bench --memory 2G --dirty-rate 0 --json "$@" 2>/dev/null | tail -n 1)
  [ -n "$line" ] || line='{"error":"no JSON report"}'
  printf '{"label":"%s","report":%s}\n' "$label" "$line" >>"$OUT"
  echo "$label done" >&2
}
for bw in $BANDWIDTHS; do
  n=$RUNS
  flags=()
  if [ "$bw" = uncapped ]; then
    n=$((RUNS + 2))
  else
    flags=(--bandwidth "$bw")
  fi
  for i in $(seq 1 "$n"); do
    for mode in $MODES; do
      # --baseline measures the machine's limits right before the migration (its
      # time is not in the migration's total).
      if [ "$bw" = uncapped ] && [ "$mode" = multichannel ]; then
        run "$mode $bw" --mode "$mode" --baseline "${flags[@]}"
      elif [ "$bw" != uncapped ] || [ "$i" -le "$RUNS" ]; then
        run "$mode $bw" --mode "$mode" "${flags[@]}"
      fi
    done
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
from collections import OrderedDict
rows = OrderedDict()
for line in open(sys.argv[1]):
    r = json.loads(line)
    rows.setdefault(r["label"], []).append(r["report"])
def fmt(v, nd):
    v = [x for x in v if x is not None]
    if not v:
        return "-"
    m = statistics.median(v)
    return f"{m:.{nd}f} ({min(v):.{nd}f}–{max(v):.{nd}f})"
print("| mode | link | n | verified | total ms | guest GiB/s | wire_vs_mem_limit |")
print("|---|---|---|---|---|---|---|")
by_bw = OrderedDict()
for label, rs in rows.items():
    mode, bw = label.split()
    good = [r for r in rs if "error" not in r]
    ver = len(good) == len(rs) and all(r["verified"] and r.get("memory_equal", True) for r in good)
    print(f"| {mode} | {bw} | {len(rs)} | {ver} | {fmt([r['total_ms'] for r in good], 0)} | "
          f"{fmt([r['guest_gib_per_s'] for r in good], 2)} | "
          f"{fmt([r.get('wire_vs_mem_limit') for r in good], 2)} |")
    if good:
        by_bw.setdefault(bw, {})[mode] = statistics.median(r["total_ms"] for r in good)
print()
for bw, modes in by_bw.items():
    fixed = {m: t for m, t in modes.items() if m != "auto"}
    if not fixed or "auto" not in modes:
        continue
    best = min(fixed, key=fixed.get)
    print(f"{bw}: best fixed mode {best} {fixed[best]:.0f} ms; auto {modes['auto']:.0f} ms = "
          f"{modes['auto'] / fixed[best]:.2f}× its time (target ≤ 1.10)")
PY
