#!/bin/sh
# Per-app proxying: one program, and its children, with every packet (TCP,
# UDP and DNS) going through a SOCKS5 proxy. No root needed where
# unprivileged user namespaces are allowed and /dev/net/tun is 0666.
#
#   examples/per-app.sh [URL]
#
# Environment: NETSTACKD (the binary, default netstackd from PATH), PROXY
# (the SOCKS5 server's HOST:PORT, default 127.0.0.1:1080). URL defaults to
# https://example.com/.
set -eu

NETSTACKD=${NETSTACKD:-netstackd}
PROXY=${PROXY:-127.0.0.1:1080}
URL=${1:-https://example.com/}

# The program sees only the TUN; names resolve through netstackd (fake-ip), so
# the proxy receives the hostname. netstackd exits with curl's status.
exec "$NETSTACKD" run --socks "$PROXY" -- curl -sS --max-time 20 "$URL"
