#!/bin/sh
# Host-wide: every connection of this host goes through a SOCKS5 proxy, for
# as long as the script runs (see netstackd.service to keep it so). netstackd
# takes the default routes in a routing table of its own and marks its own
# sockets so they leave by the original route; the proxy server is kept off
# the TUN by itself.
#
#   examples/host-wide.sh [URL]      (as root)
#
# Environment: NETSTACKD (default netstackd), PROXY (SOCKS5 HOST:PORT, not on
# this host, default 192.0.2.10:1080), EXCLUDE (CIDRs kept off the TUN,
# space-separated, e.g. "192.168.0.0/16"). URL defaults to
# https://example.com/. Rules and routes are removed when netstackd exits.
set -eu

NETSTACKD=${NETSTACKD:-netstackd}
PROXY=${PROXY:-192.0.2.10:1080}
EXCLUDE=${EXCLUDE:-}
URL=${1:-https://example.com/}

set -- --socks "$PROXY" --route 0.0.0.0/0 --route ::/0
for cidr in $EXCLUDE; do
	set -- "$@" --exclude "$cidr"
done

"$NETSTACKD" "$@" &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" || true' EXIT
trap 'exit 1' INT TERM

# Ready when its rule for the unmarked traffic is in place: it comes last.
tries=0
until ip rule show | grep -q 'not from all fwmark 0x6e73 lookup 28275'; do
	kill -0 "$pid"  # netstackd died: set -e ends the script
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "netstackd not ready" >&2; exit 1; }
	sleep 0.05
done

curl -sS --max-time 20 "$URL"
