#!/bin/sh
# A rootless container's network, served by the user who owns it, as pasta
# or slirp4netns would serve it: no root anywhere. The "container" is a
# process in new user and network namespaces made by `unshare -rn`, as
# rootless podman, rootlesskit and bubblewrap make them; `netstackd --netns
# PID` gives it a network through a SOCKS5 proxy, with fake-IP DNS and a TCP
# port published from the host into it.
#
#   examples/rootless-container.sh [URL]   (as any user; needs unprivileged
#                                           user namespaces, a 0666
#                                           /dev/net/tun, util-linux)
#
# Environment: NETSTACKD (default netstackd), PROXY (SOCKS5 HOST:PORT, default
# 127.0.0.1:1080), PORT (host port published to port 80 inside, default
# 8080), NAME (a name to look up at netstackd's DNS, default example.com).
# URL defaults to https://example.com/. The script prints the page, the
# address NAME got, and the reply of a server inside through the published
# port; it ends the container and netstackd on exit.
set -eu

NETSTACKD=${NETSTACKD:-netstackd}
PROXY=${PROXY:-127.0.0.1:1080}
PORT=${PORT:-8080}
NAME=${NAME:-example.com}
URL=${1:-https://example.com/}

ctr=
pid=
server=
reply=
cleanup() {
	for p in $server $pid $ctr; do
		kill "$p" 2>/dev/null || true
		wait "$p" 2>/dev/null || true
	done
	[ -z "$reply" ] || rm -f "$reply"
}
trap cleanup EXIT
trap 'exit 1' INT TERM

# The container: unshare execs sleep in place, so $! is its PID once the
# namespaces exist (then its command name is sleep).
unshare --user --map-root-user --net sleep infinity &
ctr=$!
tries=0
until [ "$(cat "/proc/$ctr/comm")" = sleep ]; do
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "container did not start" >&2; exit 1; }
	sleep 0.05
done
# Run a command in the container, as a container runtime's exec would.
in_ctr() { nsenter --preserve-credentials --user --net --target "$ctr" "$@"; }

# Ready when its default route is in the container: netstackd adds it last.
"$NETSTACKD" --netns "$ctr" --socks "$PROXY" --publish "127.0.0.1:$PORT:80" &
pid=$!
tries=0
until in_ctr ip route show default | grep -q netstack0; do
	kill -0 "$pid" # netstackd died: set -e ends the script
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "netstackd not ready" >&2; exit 1; }
	sleep 0.05
done

# Outbound, through the proxy.
in_ctr curl -sS --max-time 20 "$URL"
# Names: netstackd answers at 198.18.0.2 (fake-IP: an address that stands
# for the name, which the proxy then receives).
in_ctr dig +short +time=5 +tries=1 @198.18.0.2 "$NAME" A

# Inbound: a server on port 80 inside, reached at the published host port.
reply=$(mktemp)
printf 'HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello from inside the container\n' >"$reply"
# Not through in_ctr: $! must be socat's PID (nsenter execs it), not a subshell's.
nsenter --preserve-credentials --user --net --target "$ctr" socat TCP-LISTEN:80,reuseaddr,fork SYSTEM:"cat $reply" &
server=$!
tries=0
until in_ctr ss -Htln 'sport = :80' | grep -q .; do
	tries=$((tries + 1))
	[ "$tries" -lt 200 ] || { echo "server inside not listening" >&2; exit 1; }
	sleep 0.05
done
curl -sS --max-time 20 "http://127.0.0.1:$PORT/"
