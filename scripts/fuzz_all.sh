#!/usr/bin/env bash
# Run every cargo-fuzz target and print executions per target.
#
#   scripts/fuzz_all.sh [SECONDS_PER_TARGET] [TARGET...]
#   FUZZ_RUNS=10000000 scripts/fuzz_all.sh 0 frame_decode   # stop after N executions
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target
# starts from its checked-in seed corpus (fuzz/corpus/<target>); new inputs go to a
# scratch directory ($FUZZ_SCRATCH, else a fresh temporary one) so the repository
# keeps only the seeds. Findings land in fuzz/artifacts/<target>/ (copy one into the
# corpus to make `cargo test` replay it). Memory is capped (-rss_limit_mb,
# -malloc_limit_mb): an allocation above the receiver's bounds is a finding too.
#
# Build: optimised, with debug assertions and overflow checks on (`-O -a`), so an
# arithmetic overflow on hostile lengths is a panic the fuzzer reports, not a silent
# wrap. Sanitizer: none by default (FUZZ_SANITIZER=address to change it). The
# decoders are safe Rust (no `unsafe` in wire/, codec/ or device/envelope.rs), so
# AddressSanitizer can find nothing in them that the bounds checks would not already
# turn into a panic, and it costs several times the time per execution. The
# receiver's one `unsafe` write (a `readv` into guest memory, receiver/apply.rs)
# targets mmap'd memory, which ASan does not track, and is kept sound by the extent
# and round-stamp checks that these targets exercise with debug assertions on.
#
# Run it under `nice -n 19` on a shared machine.
set -euo pipefail

SECS=${1:-60}
shift || true
cd "$(dirname "$0")/../fuzz"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(frame_decode control_msg codec_lz4 codec_zstd codec_delta envelope receiver_stream receiver_setup)
fi
SANITIZER=${FUZZ_SANITIZER:-none}
SCRATCH=${FUZZ_SCRATCH:-$(mktemp -d -t livemig-fuzz.XXXXXX)}
BUILD=(-O -a -s "$SANITIZER")

for t in "${TARGETS[@]}"; do cargo +nightly fuzz build "${BUILD[@]}" "$t"; done

limit=(-max_total_time="$SECS")
if [ -n "${FUZZ_RUNS:-}" ]; then
    limit=(-runs="$FUZZ_RUNS")
    [ "$SECS" -gt 0 ] && limit+=(-max_total_time="$SECS")
fi

printf '%-16s %8s %14s %10s %8s %s\n' target seconds executions exec/s corpus result
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$SCRATCH/$t"
    # The whole-receiver targets may map a guest (≤ 64 MiB) per input. Their
    # inputs are capped at 64 KiB: a compact recorded session (a few pages of
    # content, the rest zero) fits, and mutating, tracing and hashing the 0.8 MB
    # full sessions was most of each execution (the larger seeds are cut).
    malloc_mb=256
    extra=()
    case $t in receiver_*) malloc_mb=512 extra=(-max_len=65536) ;; esac
    log="$SCRATCH/$t.log"
    start=$(date +%s)
    if cargo +nightly fuzz run "${BUILD[@]}" "$t" "$SCRATCH/$t" "corpus/$t" -- \
        "${limit[@]}" -rss_limit_mb=2048 -malloc_limit_mb="$malloc_mb" \
        -timeout=10 -print_final_stats=1 ${extra[@]+"${extra[@]}"} >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    secs=$(($(date +%s) - start))
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    corpus=$(find "$SCRATCH/$t" "corpus/$t" -type f | wc -l)
    printf '%-16s %8s %14s %10s %8s %s\n' "$t" "$secs" "${execs:-?}" "${rate:-?}" "$corpus" "$result"
done
exit $status
