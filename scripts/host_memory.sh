#!/usr/bin/env bash
# Keep this VM's memory backed by its host while benchmarks run, or give it back.
#
# On a VM whose balloon reports free pages to the host (virtio-balloon free page
# reporting: /sys/module/page_reporting), memory a process frees goes back to the
# host within moments, and the next first touch of it costs a host-level fault.
# Measured on the project's machine: touching 2 GiB of such memory runs at
# 0.5-0.7 GB/s, the same 2 GiB touched again at once at 23-24 GB/s. Every
# migration into fresh destination memory, and every `bench` source, pays it, so
# whole-migration figures then vary up to threefold with how recently the memory
# was last used. A host that dedicates memory to its VMs (or a bare-metal host)
# has no such cost. `keep` stops the reporting (an order above the largest buddy
# order) and touches the memory once, so that benchmarks measure the engine and
# not the host's reclaim; `release` restores the order `keep` saved.
#
# Usage (root): scripts/host_memory.sh keep [GIB]   GIB to touch (default: 20)
#               scripts/host_memory.sh release
#               scripts/host_memory.sh status
set -euo pipefail
P=/sys/module/page_reporting/parameters
SAVED=/run/livemig-page-reporting-order
cmd=${1:-status}
if [ ! -w "$P/page_reporting_order" ]; then
  echo "no writable $P/page_reporting_order: this machine does not report free pages (or this is not root); nothing to do" >&2
  exit 0
fi
case "$cmd" in
  keep)
    [ -f "$SAVED" ] || cat "$P/page_reporting_order" >"$SAVED"
    echo 11 >"$P/page_reporting_order" # above MAX_PAGE_ORDER (10): nothing is reported
    gib=${2:-20}
    python3 - "$gib" <<'PY'
import mmap, sys, time
n = int(sys.argv[1]) << 30
t = time.monotonic()
m = mmap.mmap(-1, n)
for i in range(0, n, 4096):
    m[i] = 1
m.close()
s = time.monotonic() - t
print(f"touched {n >> 30} GiB in {s:.1f} s ({n / s / 1e9:.2f} GB/s)", file=sys.stderr)
PY
    ;;
  release)
    if [ -f "$SAVED" ]; then
      cat "$SAVED" >"$P/page_reporting_order"
      rm -f "$SAVED"
    fi
    ;;
  status) ;;
  *)
    echo "usage: $0 keep [GIB] | release | status" >&2
    exit 2
    ;;
esac
echo "page_reporting_order $(cat "$P/page_reporting_order"), reported so far $(($(cat "$P/reported_kib") >> 20)) GiB" >&2
