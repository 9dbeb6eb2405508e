#!/usr/bin/env bash
# rrtrace.sh: where a request/reply round trip's time goes inside netstackd.
# Runs `connrate -rr` through netstackd direct with Go's execution tracer on
# (--exec-trace), then follows every round trip through the trace with
# bench/rrtrace: TUN read, gVisor, relay, upstream write, server, reply, TUN
# write, client. With --connect, short connections one at a time, and each
# handshake from the SYN to the SYN-ACK written. See bench/README.md.
#
#   SRV ──veth── DMN                    CLI
#   connrate     netstackd ──────────▶ TUN netstack0, default routes
#   -serve       (dials out from DMN)   connrate -rr
#
# Only CLI has a default route (into the TUN); DMN blackholes netstackd's
# own and fake-IP ranges. Every command is bounded by timeout(1), and a trap
# on EXIT stops only the processes started here and deletes the namespaces.
set -euo pipefail

usage() {
	cat <<'EOF'
usage: bench/rrtrace.sh [options]
  --time S        seconds of round trips (default 3)
  --connect       follow handshakes of short connections instead
  --binary PATH   trace this netstackd binary instead of one built from here
  --keep DIR      keep the trace and logs in DIR
  -- ARGS...      more arguments for netstackd (e.g. -- --procs 2)
EOF
}

T=3 BIN="" KEEP="" EXTRA=() MODE=(-rr) FOLLOW=()
while (($#)); do
	case $1 in
	--time) T=$2; shift 2 ;;
	--connect) MODE=() FOLLOW=(-connect); shift ;;
	--binary) BIN=$2; shift 2 ;;
	--keep) KEEP=$2; shift 2 ;;
	--) shift; EXTRA=("$@"); break ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; exit 2 ;;
	esac
done
[[ $T =~ ^[0-9]+$ && $T -ge 1 && $T -le 60 ]] || { echo "rrtrace: --time wants 1-60 seconds" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "rrtrace: needs root (network namespaces, a TUN)" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/rrtrace.XXXXXX)
P="rrt$$"
SRV=${P}s DMN=${P}d CLI=${P}c
PIDS=()
cleanup() {
	local pid
	for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
	for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
	for ns in "$SRV" "$DMN" "$CLI"; do ip netns del "$ns" 2>/dev/null || true; done
	if [[ -n $KEEP ]]; then
		mkdir -p "$KEEP" && cp -r "$WORK"/. "$KEEP"/ && echo "rrtrace: kept in $KEEP" >&2
	fi
	rm -rf "$WORK"
}
trap cleanup EXIT

echo "rrtrace: building in $WORK" >&2
(cd "$REPO/bench" && go build -o "$WORK/connrate" ./connrate && go build -o "$WORK/rrtrace" ./rrtrace)
if [[ -z $BIN ]]; then
	(cd "$REPO" && CGO_ENABLED=0 go build -o "$WORK/netstackd" ./cmd/netstackd)
	BIN=$WORK/netstackd
fi

for ns in "$SRV" "$DMN" "$CLI"; do
	ip netns add "$ns"
	ip -n "$ns" link set lo up
done
ip -n "$SRV" link add s-dmn type veth peer name d-srv netns "$DMN"
ip -n "$SRV" addr add 192.0.2.2/24 dev s-dmn
ip -n "$DMN" addr add 192.0.2.1/24 dev d-srv
ip -n "$SRV" link set s-dmn up
ip -n "$DMN" link set d-srv up
ip -n "$DMN" route add blackhole 198.18.0.0/15
ip -n "$DMN" route add blackhole 198.19.0.0/16

timeout $((T + 60)) ip netns exec "$SRV" "$WORK/connrate" -serve :5300 >"$WORK/server.log" 2>&1 &
PIDS+=($!)
timeout $((T + 60)) ip netns exec "$DMN" "$BIN" --netns "/run/netns/$CLI" --dns off \
	--exec-trace "$WORK/netstackd.trace" "${EXTRA[@]}" >"$WORK/netstackd.log" 2>&1 &
NPID=$!
PIDS+=("$NPID")
for ((i = 0; i < 150; i++)); do
	[[ $(ip -n "$CLI" route show default 2>/dev/null) == *"dev netstack0"* ]] && break
	kill -0 "$NPID" 2>/dev/null || { echo "rrtrace: netstackd exited: $(tail -3 "$WORK/netstackd.log")" >&2; exit 1; }
	sleep 0.1
done
for ((i = 0; i < 50; i++)); do
	ip netns exec "$SRV" ss -Hltn 'sport = :5300' | grep -q . && break
	sleep 0.1
done

timeout $((T + 30)) ip netns exec "$CLI" "$WORK/connrate" -c 192.0.2.2:5300 "${MODE[@]}" -d "${T}s" -timeout 2s | tee "$WORK/connrate.out"
# SIGTERM: netstackd stops and writes the end of its trace.
kill -TERM "$NPID"
wait "$NPID" || true
"$WORK/rrtrace" "${FOLLOW[@]}" "$WORK/netstackd.trace"
