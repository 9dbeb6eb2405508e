#!/bin/sh
# A container's network: an empty network namespace gets its network from
# netstackd (as slirp4netns or pasta would give it), outbound through a
# SOCKS5 proxy, with a TCP port published from the host into it.
#
#   examples/container.sh [URL]      (as root: it creates the namespace)
#
# Environment: NETSTACKD (default netstackd), PROXY (SOCKS5 HOST:PORT, default
# 127.0.0.1:1080; empty for direct), NS (namespace name, default demo),
# PORT (host port published to port 80 inside, default 8080). URL defaults to
# https://example.com/. A container runtime would create the namespace; here
# `ip netns add` does, and the script removes it on exit.
set -eu

NETSTACKD=${NETSTACKD:-netstackd}
PROXY=${PROXY-127.0.0.1:1080}
NS=${NS:-demo}
PORT=${PORT:-8080}
URL=${1:-https://example.com/}

ip netns add "$NS"
pid=
server=
reply=
cleanup() {
	[ -z "$server" ] || kill "$server" 2>/dev/null || true
	[ -z "$reply" ] || rm -f "$reply"
	if [ -n "$pid" ]; then
		kill "$pid" 2>/dev/null || true
		wait "$pid" || true
	fi
	ip netns del "$NS"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# Ready when its default route is in the namespace: netstackd adds it last.
"$NETSTACKD" --netns "/run/netns/$NS" ${PROXY:+--socks "$PROXY"} --publish "127.0.0.1:$PORT:80" &
pid=$!
tries=0
until ip -n "$NS" route show default | grep -q netstack0; do
	kill -0 "$pid"  # netstackd died: set -e ends the script
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "netstackd not ready" >&2; exit 1; }
	sleep 0.05
done

# Outbound: from inside the namespace, through netstackd.
ip netns exec "$NS" curl -sS --max-time 20 "$URL"

# Inbound: a server on port 80 inside, reached at the published host port.
reply=$(mktemp)
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from inside the namespace\n' >"$reply"
ip netns exec "$NS" socat TCP-LISTEN:80,reuseaddr,fork SYSTEM:"cat $reply" &
server=$!
tries=0
until ip netns exec "$NS" ss -Htln 'sport = :80' | grep -q .; do
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "server inside not listening" >&2; exit 1; }
	sleep 0.05
done
curl -sS --max-time 20 "http://127.0.0.1:$PORT/"
