#!/usr/bin/env bash
# Migrate a memory image between two "hosts" on this machine and inject a network
# fault between them.
#
# The hosts are two network namespaces joined by a veth pair, with the addresses
# 10.200.0.1 (source) and 10.200.0.2 (destination) of a private /30 that exists only
# inside them: no traffic leaves the namespaces. `livemig recv` runs in one,
# `livemig send` in the other. Faults are nftables rules inside the namespaces or a
# link state change:
#   reset      every TCP segment between the hosts is answered with a reset
#   blackhole  every packet between the hosts is dropped
#   linkdown   the source's end of the link goes down (and up after --outage)
#
# Everything made (namespaces, the veth pair, nft tables, temporary files,
# processes) is removed on every exit path, Ctrl-C included.
#
# Exit status: 0 when the outcome is consistent (the migration completed and the
# received image equals the source image, or it failed on both sides and the source
# image is unchanged), 1 otherwise, 2 on bad usage or missing prerequisites.
#
# Needs root, iproute2 (ip, tc, ss) and nftables (nft).
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/two_host.sh [options] [-- extra send arguments]
  --size-mib N        image size in MiB (default 256)
  --rate RATE         shape both directions with tc tbf (e.g. 1gbit, 200mbit)
  --fault KIND        none | reset | blackhole | linkdown (default none)
  --fault-after SECS  inject the fault this long after the streams are up (default 1)
  --outage SECS       lift the fault after SECS: delete the nft rules, or bring the
                      link back up (default: never)
  --peer-timeout DUR  given to send and recv (default 5s)
  --livemig PATH      the binary (default: the newer of target/{release,debug}/livemig)
Environment: SEND_JSON=FILE keeps send's standard output (its report, with -- --json).
EOF
}

SIZE_MIB=256 RATE="" FAULT=none FAULT_AFTER=1 OUTAGE="" PEER_TIMEOUT=5s LIVEMIG=""
SEND_EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size-mib) SIZE_MIB=$2; shift 2 ;;
    --rate) RATE=$2; shift 2 ;;
    --fault) FAULT=$2; shift 2 ;;
    --fault-after) FAULT_AFTER=$2; shift 2 ;;
    --outage) OUTAGE=$2; shift 2 ;;
    --peer-timeout) PEER_TIMEOUT=$2; shift 2 ;;
    --livemig) LIVEMIG=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; SEND_EXTRA=("$@"); break ;;
    *) echo "two_host: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
case "$FAULT" in none|reset|blackhole|linkdown) ;; *)
  echo "two_host: unknown fault '$FAULT'" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
if [[ -z "$LIVEMIG" ]]; then
  # The newer of the release and debug builds.
  for c in target/release/livemig target/debug/livemig; do
    [[ -x "$c" && ( -z "$LIVEMIG" || "$c" -nt "$LIVEMIG" ) ]] && LIVEMIG=$PWD/$c
  done
fi
[[ -x "$LIVEMIG" ]] || { echo "two_host: no livemig binary (cargo build --release)" >&2; exit 2; }
"$LIVEMIG" send --help | grep -q -- --peer-timeout ||
  { echo "two_host: $LIVEMIG predates --peer-timeout; rebuild it" >&2; exit 2; }
[[ $(id -u) -eq 0 ]] || { echo "two_host: network namespaces need root" >&2; exit 2; }
for tool in ip tc ss nft; do
  command -v "$tool" >/dev/null || {
    echo "two_host: '$tool' is missing (apt-get install iproute2 nftables)" >&2; exit 2; }
done

SRC_NS="livemig2h-$$-src" DST_NS="livemig2h-$$-dst"
SRC_IP=10.200.0.1 DST_IP=10.200.0.2 PORT=7000 VETH=lm0
WORK=$(mktemp -d /tmp/livemig-two-host.XXXXXX)

cleanup() {
  local ns pid
  for ns in "$SRC_NS" "$DST_NS"; do
    if ip netns list | grep -qw "$ns"; then
      for pid in $(ip netns pids "$ns" 2>/dev/null); do
        kill -s CONT "$pid" 2>/dev/null || true
        kill -s KILL "$pid" 2>/dev/null || true
      done
      ip netns exec "$ns" nft delete table inet livemig_fault 2>/dev/null || true
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
  rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { local ns=$1; shift; ip netns exec "$ns" "$@"; }

echo "== two hosts: $SRC_NS ($SRC_IP) <-> $DST_NS ($DST_IP)${RATE:+, shaped to $RATE}"
ip netns add "$SRC_NS"
ip netns add "$DST_NS"
ip link add name "$VETH" netns "$SRC_NS" type veth peer name "$VETH" netns "$DST_NS"
for pair in "$SRC_NS $SRC_IP" "$DST_NS $DST_IP"; do
  set -- $pair
  ip -n "$1" addr add "$2/30" dev "$VETH"
  ip -n "$1" link set "$VETH" up
  ip -n "$1" link set lo up
  if [[ -n "$RATE" ]]; then
    in_ns "$1" tc qdisc add dev "$VETH" root tbf rate "$RATE" burst 256kb latency 100ms
  fi
done

echo "== image: $SIZE_MIB MiB (half random, half zero pages)"
IMAGE=$WORK/image.bin OUT=$WORK/received.bin
head -c $((SIZE_MIB * 1024 * 1024 / 2)) /dev/urandom >"$IMAGE"
truncate -s $((SIZE_MIB * 1024 * 1024)) "$IMAGE"
SUM_BEFORE=$(sha256sum "$IMAGE" | cut -d' ' -f1)

in_ns "$DST_NS" "$LIVEMIG" recv --plaintext --listen "$DST_IP:$PORT" --out "$OUT" \
  --peer-timeout "$PEER_TIMEOUT" >"$WORK/recv.out" 2>"$WORK/recv.err" &
RECV_PID=$!
for _ in $(seq 500); do
  [[ -n $(in_ns "$DST_NS" ss -Htln "( sport = :$PORT )") ]] && break
  sleep 0.02
done

START=$(date +%s.%N)
in_ns "$SRC_NS" "$LIVEMIG" send --plaintext --to "$DST_IP:$PORT" --image "$IMAGE" \
  --peer-timeout "$PEER_TIMEOUT" "${SEND_EXTRA[@]}" >"$WORK/send.out" 2>"$WORK/send.err" &
SEND_PID=$!

inject() {
  case "$FAULT" in
    reset|blackhole)
      local ns peer input output
      for pair in "$SRC_NS $DST_IP" "$DST_NS $SRC_IP"; do
        set -- $pair; ns=$1 peer=$2
        if [[ $FAULT == reset ]]; then
          # Resets themselves pass, so each side's reset reaches the other.
          input="ip saddr $peer tcp flags & rst == 0 reject with tcp reset"
          output=""
        else
          input="ip saddr $peer drop"
          output="ip daddr $peer drop"
        fi
        in_ns "$ns" nft -f - <<EOF
table inet livemig_fault {
  chain input {
    type filter hook input priority 0; policy accept;
    $input
  }
  chain output {
    type filter hook output priority 0; policy accept;
    $output
  }
}
EOF
      done
      if [[ -n "$OUTAGE" ]]; then
        sleep "$OUTAGE"
        for ns in "$SRC_NS" "$DST_NS"; do
          in_ns "$ns" nft delete table inet livemig_fault
        done
        echo "== network back after $OUTAGE s"
      fi ;;
    linkdown)
      ip -n "$SRC_NS" link set "$VETH" down
      if [[ -n "$OUTAGE" ]]; then
        sleep "$OUTAGE"
        ip -n "$SRC_NS" link set "$VETH" up
        echo "== link back up after $OUTAGE s"
      fi ;;
  esac
}

if [[ $FAULT != none ]]; then
  # Wait for the control stream and the page streams, then for --fault-after.
  for _ in $(seq 1000); do
    n=$(in_ns "$DST_NS" ss -Htn state established "( sport = :$PORT )" | wc -l)
    [[ $n -ge 2 ]] && break
    kill -0 "$SEND_PID" 2>/dev/null || break
    sleep 0.02
  done
  sleep "$FAULT_AFTER"
  if kill -0 "$SEND_PID" 2>/dev/null; then
    echo "== injecting $FAULT"
    inject
  else
    echo "== send finished before the fault could be injected"
  fi
fi

set +e
wait "$SEND_PID"; SEND_RC=$?
SEND_S=$(awk -v a="$START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
wait "$RECV_PID"; RECV_RC=$?
set -e
echo "== send: exit $SEND_RC after ${SEND_S} s"
tail -n 3 "$WORK/send.out" "$WORK/send.err" | sed 's/^/   /'
# Keep send's standard output (its JSON report, with `-- --json`) for scripts.
if [[ -n "${SEND_JSON:-}" ]]; then cp "$WORK/send.out" "$SEND_JSON"; fi
echo "== recv: exit $RECV_RC"
tail -n 3 "$WORK/recv.out" "$WORK/recv.err" | sed 's/^/   /'

SUM_AFTER=$(sha256sum "$IMAGE" | cut -d' ' -f1)
if [[ $SEND_RC -eq 0 && $RECV_RC -eq 0 ]] && cmp -s "$IMAGE" "$OUT"; then
  echo "== outcome: completed, the received image equals the source"
  exit 0
elif [[ $SEND_RC -ne 0 && $RECV_RC -ne 0 && $SUM_BEFORE == "$SUM_AFTER" ]]; then
  echo "== outcome: failed on both sides, the source image is unchanged"
  exit 0
fi
echo "== outcome: INCONSISTENT (send $SEND_RC, recv $RECV_RC, source image $( \
  [[ $SUM_BEFORE == "$SUM_AFTER" ]] && echo unchanged || echo CHANGED))"
exit 1
