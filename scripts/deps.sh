#!/usr/bin/env bash
# Installs the Debian packages whose programs the tests and the smoke
# benchmark drive (microsocks, danted, tinyproxy, dnsmasq, curl, dig, iperf3,
# pasta, ...). Both scripts/test.sh and .ci/run call it.
#
# It looks for each package's program first and does nothing, in well under
# a second, when all are there; `apt-get update` runs only when something is
# missing. As root it installs what is missing. Otherwise it prints the
# `sudo apt-get install` line to run and exits 0: the tests that need a
# missing program, or root, skip and say which.
#
# The tests start every daemon themselves, inside their own network
# namespaces, so no package's service may start system-wide on install:
# /usr/sbin/policy-rc.d answers 101 ("action forbidden") for the duration,
# and whatever was there before is put back on exit.
set -euo pipefail

# program:package, one per package. ca-certificates has no program: its
# bundle stands for it.
wanted=(
	microsocks:microsocks
	danted:dante-server
	tinyproxy:tinyproxy
	sshd:openssh-server
	ssh:openssh-client
	dnsmasq:dnsmasq-base
	curl:curl
	dig:dnsutils
	iperf3:iperf3
	pasta:passt
	socat:socat
	ip:iproute2
	ping:iputils-ping
	tcpdump:tcpdump
	hping3:hping3
	jq:jq
	sysctl:procps
	nsenter:util-linux
	prlimit:util-linux
	setpriv:util-linux
	useradd:passwd
	/etc/ssl/certs/ca-certificates.crt:ca-certificates
)

# Daemons live in sbin, which a user's PATH may lack.
PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

missing=()
for w in "${wanted[@]}"; do
	prog=${w%%:*} pkg=${w#*:}
	if [[ $prog == /* ]]; then
		[[ -e $prog ]] && continue
	elif command -v "$prog" >/dev/null 2>&1; then
		continue
	fi
	missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
	exit 0
fi

install=(apt-get install -y --no-install-recommends "${missing[@]}")
if ((EUID != 0)); then
	echo "deps.sh: missing packages; the tests that need them will skip. To install them:" >&2
	echo "  sudo ${install[*]}" >&2
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "deps.sh: no apt-get here; install the equivalents of: ${missing[*]}" >&2
	exit 0
fi

policy=/usr/sbin/policy-rc.d
saved=""
restore() {
	if [[ -n $saved ]]; then
		mv -f "$saved" "$policy"
	else
		rm -f "$policy"
	fi
}
if [[ -e $policy ]]; then
	saved=$(mktemp "$policy.deps-sh.XXXXXX")
	cp -p "$policy" "$saved"
fi
trap restore EXIT
# So that the EXIT trap runs on these too.
trap "exit 129" HUP
trap "exit 130" INT
trap "exit 143" TERM
printf '#!/bin/sh\n# scripts/deps.sh: no service starts while it installs.\nexit 101\n' >"$policy"
chmod 755 "$policy"

echo "deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Another apt may be running (an unattended upgrade): wait for it a while.
lock=(-o DPkg::Lock::Timeout=300)
apt-get "${lock[@]}" update </dev/null
apt-get "${lock[@]}" "${install[@]:1}" </dev/null
