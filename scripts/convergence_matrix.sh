#!/usr/bin/env bash
# Convergence matrix: dirty rate × hot set × skew on one guest size, then the
# non-converging cases again with auto-converge off and --on-limit cancel.
# Runs sequentially (each run allocates 2 × MEMORY) and prints one table.
#
# Usage: scripts/convergence_matrix.sh [MEMORY] [extra bench flags...]
#   MEMORY defaults to 2G; RATES, HOTSETS, SKEWS and CANCEL_CASES may be overridden
#   from the environment, e.g. RATES="0 400" scripts/convergence_matrix.sh 1G
set -euo pipefail
cd "$(dirname "$0")/.."
MEMORY=${1:-2G}
shift || true
RATES=${RATES:-"0 100 400 1600"}
HOTSETS=${HOTSETS:-"64M 1G"}
SKEWS=${SKEWS:-"uniform 80-20"}
# rate:hotset:skew cases rerun with --no-auto-converge --on-limit cancel.
CANCEL_CASES=${CANCEL_CASES:-"1600:1G:uniform 1600:1G:80-20"}
BIN=${LIVEMIG:-target/release/livemig}
[ -x "$BIN" ] || cargo build --release --quiet
OUT=$(mktemp -d)
BUSY_PID=
trap 'rm -rf "$OUT"; [ -z "$BUSY_PID" ] || { kill "$BUSY_PID" 2>/dev/null; wait "$BUSY_PID" 2>/dev/null; } || true' EXIT
# BUSY=1: keep one core busy with another process (a shell busy loop) for the
# whole matrix, as a noisy neighbour would. The loop is a subshell of this script
# (not a `bash -c` behind one), so the PID killed on exit is the loop itself.
spin() { while :; do :; done; }
if [ "${BUSY:-0}" = 1 ]; then
  spin &
  BUSY_PID=$!
  echo "busy loop: pid $BUSY_PID" >&2
fi

run() { # name, flags...
  local name=$1
  shift
  local t0=$SECONDS
  "$BIN" bench --memory "$MEMORY" --json "$@" >"$OUT/$name.out" 2>"$OUT/$name.err" || true
  echo "$name: $((SECONDS - t0)) s" >&2
  tail -n 1 "$OUT/$name.out" >"$OUT/$name.json" || true
}

i=0
for rate in $RATES; do
  for hot in $HOTSETS; do
    for skew in $SKEWS; do
      i=$((i + 1))
      run "$(printf %02d $i)-ac" --dirty-rate "$rate" --hot-set "$hot" --skew "$skew" "$@"
    done
  done
done
for c in $CANCEL_CASES; do
  IFS=: read -r rate hot skew <<<"$c"
  i=$((i + 1))
  run "$(printf %02d $i)-noac" --dirty-rate "$rate" --hot-set "$hot" --skew "$skew" \
    --no-auto-converge --on-limit cancel --max-rounds 12 --max-time 60 "$@"
done

# JSONL=FILE keeps the raw reports (one {"label", "report"} object per line).
if [ -n "${JSONL:-}" ]; then
  for f in "$OUT"/*.json; do
    r=$(cat "$f")
    printf '{"label":"%s","report":%s}\n' "$(basename "$f" .json)" "${r:-null}"
  done >"$JSONL"
fi
python3 - "$OUT" "$MEMORY" <<'PY'
import json, os, sys
out, memory = sys.argv[1], sys.argv[2]
rows = []
for name in sorted(os.listdir(out)):
    if not name.endswith(".json"):
        continue
    base = name[:-5]
    try:
        v = json.loads(open(os.path.join(out, name)).read())
    except Exception:
        err = open(os.path.join(out, base + ".err")).read().strip().splitlines()
        rows.append((base, "?", "?", "?", "-", "-", "-", "-", "-", "-", "-", "-", "no JSON: " + (err[-1] if err else "")))
        continue
    ac = "no" if base.endswith("noac") else "yes"
    hot = v.get("hot_set_bytes", 0)
    hot = f"{hot >> 30}G" if hot >= 1 << 30 else f"{hot >> 20}M"
    skew = {"Uniform": "uniform", "Hot8020": "80-20"}.get(v.get("skew", ""), v.get("skew", "?"))
    if "error" in v:
        outcome = "cancelled" if v.get("policy_abort") or v.get("cancelled") else "FAILED"
        outcome += f" (source {'running' if v.get('source_running') else 'PAUSED'})"
        rows.append((base, f"{v.get('dirty_rate_mb_s', 0):g}", hot, skew, ac, "-", "-", "-", "-", "-", "no", "no", outcome))
        continue
    d, p = v["downtime_ms"], v["predicted_downtime_ms"]
    ratio = d / p if p > 0 else float("inf")
    ok = v["converged"] and d <= 50 and ratio <= 1.25
    outcome = "ok" if ok else ("forced/local-min" if not v["converged"] else "MISSED")
    rows.append((base, f"{v['dirty_rate_mb_s']:g}", hot, skew, ac, str(v["rounds"]), f"{d:.1f}", f"{p:.1f}",
                 f"{ratio:.2f}", str(v["throttle_max_percent"]), "yes" if v["converged"] else "no",
                 "yes" if v["verified"] else "NO", outcome))
hdr = ("run", "MB/s", "hot", "skew", "autoconv", "rounds", "downtime ms", "predicted ms", "ratio", "throttle %", "converged", "verified", "outcome")
w = [max(len(str(r[i])) for r in rows + [hdr]) for i in range(len(hdr))]
print(f"memory {memory}, target 50 ms")
for r in [hdr] + rows:
    print("  ".join(str(c).ljust(w[i]) for i, c in enumerate(r)))
# measured ÷ predicted over the converged runs: median, 95th percentile (nearest
# rank) and maximum.
ratios = sorted(float(r[8]) for r in rows if r[10] == "yes" and r[8] not in ("-", "?"))
if ratios:
    import math
    p95 = ratios[max(0, math.ceil(0.95 * len(ratios)) - 1)]
    print(f"measured ÷ predicted, {len(ratios)} converged runs: median {ratios[len(ratios) // 2]:.2f}, "
          f"p95 {p95:.2f}, max {ratios[-1]:.2f} (target p95 ≤ 1.25)")
PY
