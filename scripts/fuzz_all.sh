#!/usr/bin/env bash
# Run every cargo-fuzz target for a given time and print executions per target.
#
#   scripts/fuzz_all.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs a nightly toolchain and cargo-fuzz (`cargo install cargo-fuzz`). Each target
# starts from its checked-in seed corpus (fuzz/corpus/<target>); new inputs go to a
# scratch directory so the repository keeps only the seeds. Findings land in
# fuzz/artifacts/<target>/ (copy one into the corpus to make `cargo test` replay
# it). Memory is capped (-rss_limit_mb, -malloc_limit_mb): an allocation above the
# receiver's bounds is a finding too.
set -euo pipefail

SECS=${1:-60}
shift || true
cd "$(dirname "$0")/../fuzz"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(frame_decode control_msg codec_lz4 codec_zstd codec_delta envelope receiver_stream receiver_setup)
fi
SCRATCH=${FUZZ_SCRATCH:-$(mktemp -d -t livemig-fuzz.XXXXXX)}

for t in "${TARGETS[@]}"; do cargo +nightly fuzz build -O "$t"; done

printf '%-16s %8s %14s %10s %s\n' target seconds executions exec/s result
status=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$SCRATCH/$t"
    timeout_arg="-timeout=10"
    # The whole-receiver targets allocate a guest (≤ 64 MiB) per input.
    malloc_mb=256
    case $t in receiver_*) malloc_mb=512 ;; esac
    log="$SCRATCH/$t.log"
    if cargo +nightly fuzz run -O "$t" "$SCRATCH/$t" "corpus/$t" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -malloc_limit_mb="$malloc_mb" \
        $timeout_arg -print_final_stats=1 >"$log" 2>&1; then
        result=ok
    else
        result="FAILED (see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
    printf '%-16s %8s %14s %10s %s\n' "$t" "$SECS" "${execs:-?}" "${rate:-?}" "$result"
done
exit $status
