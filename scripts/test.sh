#!/usr/bin/env bash
# Runs every test of the module with the race detector, after scripts/deps.sh
# has installed (as root) or named (otherwise) the Debian packages the
# namespace tests drive. Run it as root for those to run; without root they
# skip and say so. The README and .ci/run both run exactly this.
#
# Arguments before `--` go to `go test` after its defaults, so they can add
# flags or override them: `bash scripts/test.sh -run TestTopology -v`, or
# `-timeout 30m`. Arguments after `--` replace the packages (./... by
# default): `bash scripts/test.sh -v -- ./tundev/... ./internal/...`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! bash scripts/deps.sh; then
	# Offline, say: on a developer's machine run what can run; in CI, stop.
	[[ -z ${CI:-} ]] || exit 1
	echo "test.sh: deps.sh failed; the tests that need what is missing will skip" >&2
fi

# The daemons the tests start live in sbin, which a user's PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

flags=()
pkgs=()
while (($# > 0)); do
	if [[ $1 == -- ]]; then
		shift
		pkgs=("$@")
		break
	fi
	flags+=("$1")
	shift
done
((${#pkgs[@]} > 0)) || pkgs=(./...)

exec go test -race -count=1 -timeout 15m ${flags[@]+"${flags[@]}"} "${pkgs[@]}"
