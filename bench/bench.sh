#!/usr/bin/env bash
# bench.sh: end-to-end throughput, loss, connection rate and cost of
# netstackd, beside the kernel's own path and pasta's, in network namespaces
# the script creates and deletes itself. See bench/README.md.
#
#   KCLI ──veth── SRV ──veth── DMN          CLI-<path> (one per path and round)
#   client        iperf3 -s    netstackd ── TUN netstack0, default routes
#   (kernel)      danted       pasta ────── tap d-srv, default route
#                 connrate     (both dial   client: iperf3 -c, connrate
#                              out from DMN)
#
# No namespace has a default route except the CLI ones (into their TUN), so
# every byte stays on veths and loopbacks inside namespaces made here; DMN
# also blackholes netstackd's own and fake-IP ranges. Each command is bounded
# by timeout(1), the whole run by an outer timeout, and a trap on EXIT stops
# only the processes this script started and deletes its namespaces.
set -euo pipefail

usage() {
	cat <<'EOF'
usage: bench/bench.sh [options]
  --rounds N        rounds, interleaved over all paths (default 3)
  --time S          seconds per iperf3 run and per connection-rate run (default 10)
  --udp-rate RATE   offered UDP rate for iperf3 -b (default 1G)
  --idle N          idle connections held through the daemon while its RSS is
                    read (default 10000; 0 skips)
  --idle-settle S   seconds the connections stay idle before the RSS is read
                    (default 15): long enough for every flow to park and for
                    the daemon to give back what opening them freed
  --smoke           1 round of 1 s runs, every metric once, overall limit 130 s;
                    exits 0 only if every required measurement produced a number
  --gobench FILE    also write Go benchmark lines to FILE (benchstat -col /path FILE)
  --only LIST       run only these measurements, comma-separated, of:
                    tcp1 tcpR tcp4 tcp6 udp udpw conns conc rr idle
                    (e.g. --only conns,conc,rr for the short-connection rows)
  --conc N          clients at once in the conc measurement (default 8)
  --no-pasta        leave out the pasta column (Debian package passt: a tap
                    device in the client namespace, flows relayed to sockets
                    in DMN, what netstackd direct does)
  --peer CMD        add a column for another TUN program. CMD is a sh command
                    run as root in the daemon namespace; it must create a TUN in
                    {netns}, route 0.0.0.0/0 (and ::/0) into it, and dial out
                    from its own namespace. It is stopped with SIGTERM.
                    Placeholders: {netns} /run/netns/<client ns>, {netns_name},
                    {socks} 192.0.2.2:1080 (danted), {tun} peer0, {mtu} 1500,
                    {netstackd} the netstackd binary built here. Repeatable:
                    each --peer adds a column
  --peer-name NAME  column label for the --peer before it (default peer, then
                    peer2, peer3...)
  --baseline PATH   add a column running the netstackd binary PATH with exactly
                    the arguments the direct column's netstackd gets, to compare
                    two builds in one run
  --baseline-name NAME  its column label (default baseline)
  The environment variables PEER (a command, as for --peer) and PEER_NAME add
  one more peer column.
  --no-floors       leave out the tunfloor and relayfloor columns (bench/tunfloor:
                    what answering, and relaying, short connections through a
                    TUN costs with no TCP stack at all; conns rows only)
  --max-time S      overall limit in seconds (default computed from the above)
  --keep            keep the work directory (logs, raw results)
  -h, --help        this help
EOF
}

die() {
	printf 'bench: %s\n' "$*" >&2
	exit 1
}
say() { printf 'bench: %s\n' "$*" >&2; }

# --- options -----------------------------------------------------------------
ROUNDS=3
T=10
UDP_RATE=1G
IDLE_N=10000
IDLE_SETTLE=15
SMOKE=0
GOBENCH=""
PEER_NAMES=()        # the --peer columns, in order
declare -A PEER_CMD  # name -> command
PEER_PENDING_NAME="" # a --peer-name given before any --peer
BASELINE=""          # --baseline: a netstackd binary for a column of its own
BASELINE_NAME=baseline
BASE_COL=""          # the baseline's column, "" without --baseline
MAX_TIME=""
KEEP=0
FLOORS=1
PASTA=1
ONLY=""
CONC=8
ARGS=("$@")
while (($# > 0)); do
	case $1 in
	--rounds) ROUNDS=${2:?--rounds needs a value}; shift 2 ;;
	--time) T=${2:?--time needs a value}; shift 2 ;;
	--udp-rate) UDP_RATE=${2:?--udp-rate needs a value}; shift 2 ;;
	--idle) IDLE_N=${2:?--idle needs a value}; shift 2 ;;
	--idle-settle) IDLE_SETTLE=${2:?--idle-settle needs a value}; shift 2 ;;
	--smoke) SMOKE=1; shift ;;
	--gobench) GOBENCH=${2:?--gobench needs a file}; shift 2 ;;
	--peer)
		name=${PEER_PENDING_NAME:-peer$((${#PEER_NAMES[@]} + 1))}
		[[ $name == peer1 ]] && name=peer
		PEER_PENDING_NAME=""
		PEER_NAMES+=("$name")
		PEER_CMD[$name]=${2:?--peer needs a command}
		shift 2
		;;
	--peer-name)
		name=${2:?--peer-name needs a value}
		if ((${#PEER_NAMES[@]} == 0)); then
			PEER_PENDING_NAME=$name
		else
			last=${PEER_NAMES[-1]}
			PEER_CMD[$name]=${PEER_CMD[$last]}
			[[ $last == "$name" ]] || unset "PEER_CMD[$last]"
			PEER_NAMES[-1]=$name
		fi
		shift 2
		;;
	--baseline) BASELINE=${2:?--baseline needs a netstackd binary}; shift 2 ;;
	--baseline-name) BASELINE_NAME=${2:?--baseline-name needs a value}; shift 2 ;;
	--max-time) MAX_TIME=${2:?--max-time needs a value}; shift 2 ;;
	--keep) KEEP=1; shift ;;
	--no-floors) FLOORS=0; shift ;;
	--no-pasta) PASTA=0; shift ;;
	--only) ONLY=${2:?--only needs a list}; shift 2 ;;
	--conc) CONC=${2:?--conc needs a value}; shift 2 ;;
	-h | --help) usage; exit 0 ;;
	*) usage >&2; die "unknown option $1" ;;
	esac
done
if ((SMOKE)); then
	ROUNDS=1
	T=1
	IDLE_N=$((IDLE_N < 300 ? IDLE_N : 300))
	IDLE_SETTLE=1
	: "${MAX_TIME:=130}"
fi
[[ $IDLE_N =~ ^[0-9]+$ ]] || die "--idle: want a count, got $IDLE_N"
[[ $IDLE_SETTLE =~ ^[0-9]+$ ]] && ((IDLE_SETTLE <= 50)) || die "--idle-settle: want 0..50 seconds, got $IDLE_SETTLE"
[[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || die "--rounds: want a positive integer, got $ROUNDS"
[[ $T =~ ^[1-9][0-9]*$ ]] || die "--time: want a positive integer, got $T"
[[ $CONC =~ ^[1-9][0-9]*$ ]] && ((CONC <= 256)) || die "--conc: want 1..256 clients, got $CONC"
[[ $UDP_RATE =~ ^[1-9][0-9]*[KMG]?$ ]] || die "--udp-rate: want a rate like 500M or 1G, got $UDP_RATE"
[[ -z $PEER_PENDING_NAME ]] || die "--peer-name $PEER_PENDING_NAME: no --peer to name"
# The environment's PEER (and PEER_NAME) is one more --peer, for scripts
# that set it.
if [[ -n ${PEER:-} ]]; then
	PEER_NAMES+=("${PEER_NAME:-peer}")
	PEER_CMD[${PEER_NAME:-peer}]=$PEER
fi
declare -A seen_peer=()
for name in "${PEER_NAMES[@]}"; do
	[[ $name =~ ^[a-z0-9_-]+$ ]] || die "--peer-name: want [a-z0-9_-]+, got $name"
	case $name in kernel | direct | socks5 | pasta | tunfloor | relayfloor) die "--peer-name: $name is taken" ;; esac
	[[ -z ${seen_peer[$name]:-} ]] || die "--peer-name: $name given twice"
	seen_peer[$name]=1
done
if [[ -n $BASELINE ]]; then
	[[ -f $BASELINE && -x $BASELINE ]] || die "--baseline: $BASELINE is not an executable file"
	BASELINE=$(realpath "$BASELINE")
	[[ $BASELINE_NAME =~ ^[a-z0-9_-]+$ ]] || die "--baseline-name: want [a-z0-9_-]+, got $BASELINE_NAME"
	case $BASELINE_NAME in kernel | direct | socks5 | pasta | tunfloor | relayfloor) die "--baseline-name: $BASELINE_NAME is taken" ;; esac
	[[ -z ${seen_peer[$BASELINE_NAME]:-} ]] || die "--baseline-name: $BASELINE_NAME is also a --peer-name"
	BASE_COL=$BASELINE_NAME
fi
if [[ -n $GOBENCH ]]; then
	: >"$GOBENCH" || die "--gobench: cannot write $GOBENCH"
	GOBENCH=$(realpath "$GOBENCH")
fi

PATHS=(kernel direct socks5)
# The baseline stands right after direct, the column it is a build of.
[[ -n $BASE_COL ]] && PATHS+=("$BASE_COL")
# pasta does netstackd's direct job the way a user runs it for a namespace
# (a tap device there, each flow relayed to a socket of its own in DMN):
# the peer every run compares with.
((PASTA)) && PATHS+=(pasta)
PATHS+=("${PEER_NAMES[@]}")
# The floors: bench/tunfloor answers connrate's exchange at the TUN itself
# (tunfloor), or carries it upstream with blocking sockets and no TCP stack
# (relayfloor). What they reach is what any program behind a TUN starts
# from on this machine; they run the conns measurement only.
declare -A FLOOR=()
if ((FLOORS)); then
	FLOOR[tunfloor]=1 FLOOR[relayfloor]=1
	PATHS+=(tunfloor relayfloor)
fi
MEASUREMENTS=(tcp1 tcpR tcp4 tcp6 udp udpw conns conc rr)
# Idle connections last: they raise the daemon's peak RSS, which is read
# for the throughput rows just before.
((IDLE_N > 0)) && MEASUREMENTS+=(idle)
if [[ -n $ONLY ]]; then
	declare -A want=()
	for m in ${ONLY//,/ }; do
		case " ${MEASUREMENTS[*]} idle " in *" $m "*) want[$m]=1 ;; *) die "--only: unknown measurement $m" ;; esac
	done
	kept=()
	for m in "${MEASUREMENTS[@]}"; do [[ -n ${want[$m]:-} ]] && kept+=("$m"); done
	((${#kept[@]} > 0)) || die "--only $ONLY: nothing to measure (idle needs --idle N > 0)"
	MEASUREMENTS=("${kept[@]}")
fi
if [[ -z $MAX_TIME ]]; then
	cells=$((${#MEASUREMENTS[@]} * (${#PATHS[@]} - ${#FLOOR[@]}) + ${#FLOOR[@]}))
	MAX_TIME=$((180 + ROUNDS * (40 + cells * (T + 25))))
fi
[[ $MAX_TIME =~ ^[1-9][0-9]*$ ]] || die "--max-time: want a positive integer, got $MAX_TIME"

# --- prerequisites -----------------------------------------------------------
missing=()
tools=(ip iperf3 danted go jq timeout ss awk getconf realpath)
((PASTA)) && tools+=(pasta)
for tool in "${tools[@]}"; do
	command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
((${#missing[@]} == 0)) || die "missing tools: ${missing[*]} (Debian: apt-get install iproute2 iperf3 dante-server jq passt, or bash scripts/deps.sh; Go from go.dev; --no-pasta runs without pasta)"
((EUID == 0)) || die "needs root: creates network namespaces, veths and TUN devices"
[[ -c /dev/net/tun ]] || die "no /dev/net/tun"

# The whole run, cleanup included, is bounded: re-run under timeout(1), which
# sends SIGTERM (our trap cleans up) and SIGKILL 10 s later.
if [[ -z ${NSBENCH_BOUNDED:-} ]]; then
	export NSBENCH_BOUNDED=$MAX_TIME
	exec timeout -s TERM -k 10 "$MAX_TIME" bash "$0" "${ARGS[@]}"
fi

# --- state and cleanup -------------------------------------------------------
P="nsb$$"                    # prefix of every namespace made here
NS_SRV="${P}srv" NS_DMN="${P}dmn" NS_KCLI="${P}kcli"
NAMESPACES=()                # namespaces to delete
STARTED=()                   # PIDs started here (timeout(1) wrappers) still to stop
WORK=$(mktemp -d "/tmp/nsbench.$$.XXXXXX")
FAILED=0                     # a required measurement produced no number
WARNINGS=()
CLK_TCK=$(getconf CLK_TCK)

cleanup() {
	local rc=$?
	trap '' INT TERM HUP
	set +e
	stop_pids "${STARTED[@]}"
	local ns
	for ns in "${NAMESPACES[@]}"; do
		ip netns del "$ns" 2>/dev/null
	done
	if ((KEEP || rc != 0 || FAILED)); then
		say "work directory kept: $WORK"
	else
		rm -rf "$WORK"
	fi
	exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted (SIGINT)"; exit 130' INT
trap 'say "terminated (SIGTERM; the overall limit is ${MAX_TIME}s)"; exit 143' TERM
trap 'exit 129' HUP

# descendants PID: PID and every process below it, from /proc.
descendants() {
	cat /proc/[0-9]*/stat 2>/dev/null | awk -v root="$1" '
		{ pid = $1; sub(/^.*\) /, ""); parent[pid] = $2 }
		END {
			keep[root] = 1; n = 1
			while (n > 0) {
				n = 0
				for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; n++ }
			}
			for (p in keep) if (p in parent) print p
		}'
}

alive() {
	local s
	s=$(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$1/stat" 2>/dev/null) || return 1
	[[ -n $s && $s != Z ]]
}

forget() {
	local pid=$1 i
	for i in "${!STARTED[@]}"; do
		[[ ${STARTED[$i]} == "$pid" ]] && unset 'STARTED[i]'
	done
	STARTED=("${STARTED[@]}")
}

# stop_pids PID...: SIGTERM each (timeout(1) passes it on to its command),
# give them 5 s, then SIGKILL whatever of their process trees is left.
# Returns the exit status of the first PID.
stop_pids() {
	(($# > 0)) || return 0
	local pid tree=() i rc=0 first=1
	for pid in "$@"; do
		mapfile -t -O "${#tree[@]}" tree < <(descendants "$pid")
		kill -TERM "$pid" 2>/dev/null
	done
	for ((i = 0; i < 50; i++)); do
		local any=0
		for pid in "${tree[@]}"; do alive "$pid" && any=1 && break; done
		((any)) || break
		sleep 0.1
	done
	for pid in "${tree[@]}"; do
		alive "$pid" && kill -KILL "$pid" 2>/dev/null
	done
	for pid in "$@"; do
		local st=0
		wait "$pid" 2>/dev/null || st=$?
		((first)) && rc=$st
		first=0
		forget "$pid"
	done
	return "$rc"
}

# spawn NS SECS LOG CMD...: start CMD in namespace NS under timeout SECS, in
# the background; sets SPAWNED to the PID (of timeout(1)).
spawn() {
	local ns=$1 secs=$2 log=$3
	shift 3
	ip netns exec "$ns" timeout -s TERM -k 3 "$secs" "$@" >"$log" 2>&1 &
	SPAWNED=$!
	STARTED+=("$SPAWNED")
}

# run_bounded NS SECS OUT ERR CMD...: run CMD in NS to completion, bounded.
# Waits with the wait builtin so that a signal runs the trap at once.
run_bounded() {
	local ns=$1 secs=$2 out=$3 err=$4
	shift 4
	ip netns exec "$ns" timeout -s TERM -k 3 "$secs" "$@" >"$out" 2>"$err" &
	local pid=$! rc=0
	STARTED+=("$pid")
	wait "$pid" || rc=$?
	forget "$pid"
	return "$rc"
}

# wait_listen NS PROTO PORT: wait up to 10 s for a listener.
wait_listen() {
	local ns=$1 proto=$2 port=$3 i
	for ((i = 0; i < 200; i++)); do
		[[ -n $(ip netns exec "$ns" ss -Hln"${proto:0:1}" "sport = :$port" 2>/dev/null) ]] && return 0
		sleep 0.05
	done
	return 1
}

# proc_cost ROOT: "<peak RSS KiB summed over the tree> <CPU ticks>" of the
# processes below ROOT (a timeout(1) PID, itself not counted); CPU includes
# children already reaped.
proc_cost() {
	local root=$1 pid rss=0 ticks=0 h t
	for pid in $(descendants "$root"); do
		[[ $pid == "$root" ]] && continue
		h=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || h=0
		t=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 + $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || t=0
		rss=$((rss + ${h:-0}))
		ticks=$((ticks + ${t:-0}))
	done
	echo "$rss $ticks"
}

# --- results -----------------------------------------------------------------
declare -A VALS   # "row|path" -> space-separated values, one per round
declare -A STATE  # "row|path" -> fail | na | (empty)
declare -A NOTE   # "row|path" -> why na
ROWS=(tcp1 tcpR tcp4 tcp6 udp_gbps udp_loss udpw_gbps udpw_loss conns cp50 cp99 cerr ccpu nconns np50 nerr nccpu rr50 rr99 rss cpu idle_rss idle_kib drss dcpu)
declare -A LABEL=(
	[tcp1]="tcp 1 stream Gb/s" [tcpR]="tcp reverse Gb/s" [tcp4]="tcp 4 streams Gb/s"
	[tcp6]="tcp ipv6 1 stream Gb/s" [udp_gbps]="udp @$UDP_RATE delivered Gb/s"
	[udp_loss]="udp @$UDP_RATE loss %" [udpw_gbps]="udp @$UDP_RATE -w 4M Gb/s"
	[udpw_loss]="udp @$UDP_RATE -w 4M loss %" [conns]="short conns/s" [cp50]="connect p50 ms"
	[cp99]="connect p99 ms" [cerr]="conn errors" [ccpu]="daemon CPU us/conn"
	[nconns]="short conns/s, $CONC at once" [np50]="connect p50 ms, $CONC at once" [nerr]="conn errors, $CONC at once"
	[nccpu]="daemon CPU us/conn, $CONC at once" [rr50]="request/reply p50 ms" [rr99]="request/reply p99 ms"
	[rss]="daemon peak RSS MiB" [cpu]="daemon CPU s/round"
	[drss]="danted peak RSS MiB" [dcpu]="danted CPU s/round"
	[idle_rss]="$IDLE_N idle conns: RSS MiB" [idle_kib]="idle: daemon KiB/conn"
)
declare -A RATIO=([tcp1]=1 [tcpR]=1 [tcp4]=1 [tcp6]=1 [udp_gbps]=1 [udpw_gbps]=1 [conns]=1 [cp50]=1 [cp99]=1
	[nconns]=1 [np50]=1 [rr50]=1 [rr99]=1)
declare -A ROWS_OF=(
	[tcp1]=tcp1 [tcpR]=tcpR [tcp4]=tcp4 [tcp6]=tcp6 [udp]="udp_gbps udp_loss" [udpw]="udpw_gbps udpw_loss"
	[conns]="conns cp50 cp99 cerr" [conncpu]=ccpu [conc]="nconns np50 nerr" [conccpu]=nccpu [rr]="rr50 rr99"
	[daemon]="rss cpu" [danted]="drss dcpu"
	[idle]="idle_rss idle_kib"
)
declare -A GOUNIT=(
	[tcp1]=Gb/s [tcpR]=Gb/s [tcp4]=Gb/s [tcp6]=Gb/s [udp_gbps]=Gb/s [udp_loss]=loss-% [udpw_gbps]=Gb/s [udpw_loss]=loss-%
	[conns]=conns/s [cp50]=connect-p50-ms [cp99]=connect-p99-ms [cerr]=errors [ccpu]=daemon-CPU-us/conn [rss]=peak-RSS-MiB
	[nconns]=conns/s [np50]=connect-p50-ms [nerr]=errors [nccpu]=daemon-CPU-us/conn [rr50]=rr-p50-ms [rr99]=rr-p99-ms
	[cpu]=CPU-s [drss]=peak-RSS-MiB [dcpu]=CPU-s [idle_rss]=idle-RSS-MiB [idle_kib]=KiB/conn
)

# optional MEAS PATH: a failure here is reported but does not fail the run.
optional() {
	case "$1|$2" in
	"tcp6|socks5") return 0 ;; # danted over IPv6 is not what is being measured
	esac
	[[ (-n ${PEER_CMD[$2]:-} || $2 == pasta) && ($1 == tcp6 || $1 == udp || $1 == udpw) ]]
}

# record MEAS PATH VALUE...: one value per row of MEAS, and a Go benchmark line.
record() {
	local meas=$1 path=$2
	shift 2
	local vals=("$@") rows i line
	read -r -a rows <<<"${ROWS_OF[$meas]}"
	line="BenchmarkE2E/$meas/path=$path 1"
	for i in "${!rows[@]}"; do
		VALS["${rows[$i]}|$path"]+=" ${vals[$i]}"
		line+=" ${vals[$i]} ${GOUNIT[${rows[$i]}]}"
	done
	echo "$line" >>"$WORK/gobench.txt"
}

record_fail() {
	local meas=$1 path=$2 why=$3 r
	for r in ${ROWS_OF[$meas]}; do STATE["$r|$path"]=fail; done
	if optional "$meas" "$path"; then
		say "  $meas $path: FAILED (optional): $why"
		WARNINGS+=("$meas over $path failed (optional): $why")
	else
		say "  $meas $path: FAILED: $why"
		WARNINGS+=("$meas over $path failed: $why")
		FAILED=1
	fi
}

record_na() {
	local meas=$1 path=$2 why=$3 r
	for r in ${ROWS_OF[$meas]}; do
		[[ ${STATE["$r|$path"]:-} == fail ]] || STATE["$r|$path"]=na
		NOTE["$r|$path"]=$why
	done
	say "  $meas $path: n/a: $why"
}

# --- topology ----------------------------------------------------------------
# SRV 192.0.2.2 2001:db8:2::2 (link to DMN), 192.0.3.2 2001:db8:3::2 (to KCLI)
SRV4=192.0.2.2 SRV6=2001:db8:2::2 KSRV4=192.0.3.2 KSRV6=2001:db8:3::2
SOCKS=$SRV4:1080
IPERF_PORT=5201 CONN_PORT=5300

new_ns() {
	ip netns add "$1"
	NAMESPACES+=("$1")
	ip -n "$1" link set lo up
	# No duplicate address detection, so addresses are usable at once; the
	# whole port range, so that a fast connection-rate run is less likely to
	# reuse a 4-tuple the server still holds in TIME_WAIT.
	ip netns exec "$1" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
		net.ipv4.ip_local_port_range="1024 65535" >/dev/null 2>&1 || true
}

# veth NS_A IF_A ADDR4_A ADDR6_A NS_B IF_B ADDR4_B ADDR6_B
veth() {
	ip -n "$1" link add "$2" mtu 1500 type veth peer name "$6" mtu 1500 netns "$5"
	ip -n "$1" addr add "$3/24" dev "$2"
	ip -n "$1" addr add "$4/64" dev "$2" nodad
	ip -n "$5" addr add "$7/24" dev "$6"
	ip -n "$5" addr add "$8/64" dev "$6" nodad
	ip -n "$1" link set "$2" up
	ip -n "$5" link set "$6" up
}

setup_topology() {
	new_ns "$NS_SRV"
	new_ns "$NS_DMN"
	new_ns "$NS_KCLI"
	veth "$NS_SRV" s-dmn 192.0.2.2 2001:db8:2::2 "$NS_DMN" d-srv 192.0.2.1 2001:db8:2::1
	veth "$NS_SRV" s-kcli 192.0.3.2 2001:db8:3::2 "$NS_KCLI" k-srv 192.0.3.1 2001:db8:3::1
	# Whatever a client asks for, netstackd dials from DMN: nothing but the
	# SRV link is reachable from there, and its own TUN and fake-IP ranges
	# are blackholed so nothing can loop.
	ip -n "$NS_DMN" route add blackhole 198.18.0.0/15
	ip -n "$NS_DMN" route add blackhole 198.19.0.0/16
	ip -n "$NS_DMN" -6 route add blackhole fd00:1898::/64
	ip -n "$NS_DMN" -6 route add blackhole fd00:1919::/96
	local ns
	for ns in "$NS_SRV" "$NS_DMN" "$NS_KCLI"; do
		[[ -z $(ip -n "$ns" route show default) && -z $(ip -n "$ns" -6 route show default) ]] ||
			die "namespace $ns has a default route"
	done
}

write_danted_conf() {
	cat >"$WORK/danted.conf" <<EOF
# Dante 1.4 server for the socks5 path; only reachable inside $NS_SRV/$NS_DMN.
logoutput: stderr
internal: $SRV4 port = 1080
external: s-dmn
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
}
socks pass {
	from: 0.0.0.0/0 to: 0.0.0.0/0
	command: connect udpassociate udpreply bind
}
socks pass {
	from: 0.0.0.0/0 to: ::/0
	command: connect udpassociate udpreply bind
}
EOF
	ip netns exec "$NS_SRV" danted -V -f "$WORK/danted.conf" >"$WORK/danted-verify.log" 2>&1 ||
		die "danted rejects its configuration: $(tail -3 "$WORK/danted-verify.log")"
}

# --- daemons per round -------------------------------------------------------
declare -A DPID     # path -> timeout(1) PID of its daemon (netstackd or peer)
declare -A CLI_NS   # path -> client namespace
DANTED_PID=""

start_danted() {
	local r=$1
	spawn "$NS_SRV" "$MAX_TIME" "$WORK/danted.r$r.log" danted -f "$WORK/danted.conf" -N 1 -p "$WORK/danted.r$r.pid"
	DANTED_PID=$SPAWNED
	if ! wait_listen "$NS_SRV" tcp 1080 || ! alive "$DANTED_PID"; then
		say "danted did not start: $(tail -3 "$WORK/danted.r$r.log")"
		stop_pids "$DANTED_PID" || true
		DANTED_PID=""
		return 1
	fi
}

# netstackd_args PATH CLI BINARY: sets the caller's args to what netstackd
# gets for the column PATH (direct or socks5) with client namespace CLI.
# BINARY is asked whether it has --dns, so that a build from before it
# starts too.
netstackd_args() {
	local path=$1 cli=$2 bin=$3
	args=(--netns "/run/netns/$cli")
	if [[ -z ${HAS_DNS[$bin]:-} ]]; then
		HAS_DNS[$bin]=0
		"$bin" --help 2>&1 | grep -q -- '-dns ' && HAS_DNS[$bin]=1
	fi
	[[ ${HAS_DNS[$bin]} == 1 ]] && args+=(--dns off)
	[[ $path == socks5 ]] && args+=(--socks "$SOCKS")
	return 0
}
declare -A HAS_DNS # binary -> 1 if it takes --dns (netstackd's DNS is off in every column)

# start_daemon PATH ROUND INDEX: a fresh client namespace and a daemon serving it.
start_daemon() {
	local path=$1 r=$2 i
	local cli="${P}c${r}x$3" log="$WORK/$1.r$2.log"
	new_ns "$cli"
	CLI_NS[$path]=$cli
	case $path in
	direct | socks5)
		local args
		netstackd_args "$path" "$cli" "$WORK/netstackd"
		spawn "$NS_DMN" "$MAX_TIME" "$log" "$WORK/netstackd" "${args[@]}"
		;;
	"$BASE_COL")
		# The direct column's arguments, given to the other build.
		local args
		netstackd_args direct "$cli" "$BASELINE"
		echo "$BASELINE ${args[*]}" >"$WORK/$path.cmd"
		spawn "$NS_DMN" "$MAX_TIME" "$log" "$BASELINE" "${args[@]}"
		;;
	tunfloor) spawn "$NS_DMN" "$MAX_TIME" "$log" "$WORK/tunfloor" -netns "/run/netns/$cli" -tun peer0 ;;
	relayfloor) spawn "$NS_DMN" "$MAX_TIME" "$log" "$WORK/tunfloor" -relay -netns "/run/netns/$cli" -tun peer0 ;;
	pasta)
		# As a user attaches pasta to a namespace: its tap takes the
		# addresses of DMN's interface, each flow becomes a socket of
		# pasta's own in DMN. Its defaults otherwise (MTU 65520). No
		# port forwarding either way, no DHCP/RA (--config-net sets the
		# addresses), a gateway that is nobody (--no-map-gw: an address
		# pasta would map to DMN's loopback must not be the server),
		# root kept (as nobody it cannot enter the namespace here).
		local cmd=(pasta -f -q --runas 0 --config-net --netns "/run/netns/$cli" -i d-srv
			-g 192.0.2.254 -g 2001:db8:2::fe --no-map-gw -t none -u none -T none -U none
			--no-dhcp --no-dhcpv6 --no-ra)
		echo "${cmd[*]}" >"$WORK/$path.cmd"
		spawn "$NS_DMN" "$MAX_TIME" "$log" "${cmd[@]}"
		;;
	*)
		local cmd=${PEER_CMD[$path]}
		cmd=${cmd//\{netns\}//run/netns/$cli}
		cmd=${cmd//\{netns_name\}/$cli}
		cmd=${cmd//\{socks\}/$SOCKS}
		cmd=${cmd//\{tun\}/peer0}
		cmd=${cmd//\{mtu\}/1500}
		cmd=${cmd//\{netstackd\}/$WORK/netstackd}
		echo "$cmd" >"$WORK/$path.cmd"
		spawn "$NS_DMN" "$MAX_TIME" "$log" sh -c "exec $cmd"
		;;
	esac
	DPID[$path]=$SPAWNED
	# Ready when the client namespace routes by default into a TUN.
	for ((i = 0; i < 150; i++)); do
		if ! alive "${DPID[$path]}"; then
			break
		fi
		local v4 v6
		v4=$(ip -n "$cli" route show default 2>/dev/null)
		v6=$(ip -n "$cli" -6 route show default 2>/dev/null)
		case $path in
		direct | socks5 | "$BASE_COL") [[ $v4 == *"dev netstack0"* && $v6 == *"dev netstack0"* ]] && return 0 ;;
		*) [[ -n $v4 ]] && return 0 ;;
		esac
		sleep 0.1
	done
	local why="not ready within 15 s"
	alive "${DPID[$path]}" || why="exited before it was ready"
	say "$path daemon $why; log: $(tail -5 "$log" | tr '\n' ' ')"
	WARNINGS+=("$path daemon in round $r $why (log $log)")
	stop_pids "${DPID[$path]}" || true
	unset 'DPID[$path]'
	return 1
}

# stop_daemon PATH ROUND: record its cost, stop it, delete its namespace.
stop_daemon() {
	local path=$1 r=$2 pid=${DPID[$1]:-} rc=0 kib ticks
	[[ -n $pid ]] || return 0
	if alive "$pid"; then
		read -r kib ticks < <(proc_cost "$pid")
		if [[ -n ${PRE_IDLE[$path]:-} ]]; then
			read -r kib ticks <<<"${PRE_IDLE[$path]}"
			unset 'PRE_IDLE[$path]'
		fi
		record daemon "$path" "$(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }')" \
			"$(awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')"
	else
		record_fail daemon "$path" "daemon died during the round"
	fi
	stop_pids "$pid" || rc=$?
	if ((rc != 0)); then
		WARNINGS+=("$path daemon exited with status $rc on SIGTERM in round $r (log $WORK/$path.r$r.log)")
	fi
	if grep -qE 'panic:|fatal error:|DATA RACE|level=ERROR' "$WORK/$path.r$r.log" 2>/dev/null; then
		WARNINGS+=("$path daemon log of round $r has errors: $(grep -m1 -E 'panic:|fatal error:|DATA RACE|level=ERROR' "$WORK/$path.r$r.log")")
	fi
	unset 'DPID[$path]'
	ip netns del "${CLI_NS[$path]}" 2>/dev/null || true
}

stop_danted() {
	local r=$1 kib ticks
	[[ -n $DANTED_PID ]] || return 0
	if alive "$DANTED_PID"; then
		read -r kib ticks < <(proc_cost "$DANTED_PID")
		record danted socks5 "$(awk -v k="$kib" 'BEGIN { printf "%.1f", k / 1024 }')" \
			"$(awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }')"
	else
		record_fail danted socks5 "danted died during the round"
	fi
	stop_pids "$DANTED_PID" || true
	DANTED_PID=""
}

# --- measurements ------------------------------------------------------------
# target PATH FAMILY: the client namespace and the server address for PATH.
client_ns() { if [[ $1 == kernel ]]; then echo "$NS_KCLI"; else echo "${CLI_NS[$1]}"; fi; }
server_addr() {
	case "$1|$2" in
	kernel\|4) echo "$KSRV4" ;; kernel\|6) echo "$KSRV6" ;;
	*\|4) echo "$SRV4" ;; *\|6) echo "$SRV6" ;;
	esac
}

# iperf MEAS PATH ROUND FAMILY ARGS...: one iperf3 run against a fresh
# one-off server; prints the JSON file name.
iperf() {
	local meas=$1 path=$2 r=$3 fam=$4
	shift 4
	local base="$WORK/$meas.$path.r$r" srv
	spawn "$NS_SRV" $((T + 30)) "$base.server.log" iperf3 -s -1 -p "$IPERF_PORT"
	srv=$SPAWNED
	if ! wait_listen "$NS_SRV" tcp "$IPERF_PORT"; then
		stop_pids "$srv" || true
		echo "iperf3 server did not start" >"$base.err"
		return 1
	fi
	local rc=0
	run_bounded "$(client_ns "$path")" $((T + 20)) "$base.json" "$base.err" \
		iperf3 -c "$(server_addr "$path" "$fam")" -p "$IPERF_PORT" -t "$T" -J --connect-timeout 3000 "$@" || rc=$?
	# The one-off server ends by itself after a test; give it a moment.
	local i
	for ((i = 0; i < 30; i++)); do alive "$srv" || break; sleep 0.1; done
	stop_pids "$srv" || true
	return "$rc"
}

iperf_error() {
	local base="$WORK/$1.$2.r$3" e
	e=$(jq -r '.error // empty' "$base.json" 2>/dev/null) || true
	[[ -n $e ]] || e=$(tail -2 "$base.err" 2>/dev/null | tr '\n' ' ')
	echo "${e:-no result}"
}

gbps() { awk -v b="$1" 'BEGIN { printf "%.3f", b / 1e9 }'; }
positive() { awk -v v="$1" 'BEGIN { exit !(v + 0 > 0) }'; }

measure_tcp() {
	local meas=$1 path=$2 r=$3 fam=4 args=() bps
	case $meas in
	tcpR) args=(-R) ;;
	tcp4) args=(-P 4) ;;
	tcp6) fam=6 ;;
	esac
	iperf "$meas" "$path" "$r" "$fam" "${args[@]}" || true
	bps=$(jq -er '.end.sum_received.bits_per_second' "$WORK/$meas.$path.r$r.json" 2>/dev/null) || bps=""
	if [[ -n $bps ]] && positive "$bps"; then
		record "$meas" "$path" "$(gbps "$bps")"
		say "  $meas $path: $(gbps "$bps") Gb/s"
	else
		record_fail "$meas" "$path" "$(iperf_error "$meas" "$path" "$r")"
	fi
}

# measure_udp MEAS PATH R [IPERF-ARGS...]: udp is iperf3's defaults; udpw
# gives both ends 4 MiB socket buffers (-w 4M), which shows how much of the
# loss is the receiving application's socket, not the path.
measure_udp() {
	local meas=$1 path=$2 r=$3 base="$WORK/$1.$2.r$3" rc=0
	shift 3
	# One datagram first: a path that answers it with ICMP port unreachable
	# does not carry UDP at all, which is "n/a", not a failed measurement.
	run_bounded "$(client_ns "$path")" 10 "$base.probe" "$base.probe.err" \
		"$WORK/connrate" -c "$(server_addr "$path" 4):$CONN_PORT" -udp-probe || rc=$?
	if ((rc == 3)) && [[ $path != kernel ]]; then
		record_na "$meas" "$path" "refuses UDP (ICMP port unreachable)"
		return
	elif ((rc != 0)); then
		record_fail "$meas" "$path" "UDP probe: $(cat "$base.probe" "$base.probe.err" 2>/dev/null | tr '\n' ' ')"
		return
	fi
	iperf "$meas" "$path" "$r" 4 -u -b "$UDP_RATE" -l 1400 "$@" || true
	local bps loss
	bps=$(jq -er '(.end.sum_received // .end.sum).bits_per_second' "$base.json" 2>/dev/null) || bps=""
	loss=$(jq -er '(.end.sum_received // .end.sum).lost_percent' "$base.json" 2>/dev/null) || loss=""
	if [[ -n $bps && -n $loss ]] && positive "$bps"; then
		loss=$(awk -v l="$loss" 'BEGIN { printf "%.2f", l }')
		record "$meas" "$path" "$(gbps "$bps")" "$loss"
		say "  $meas $path: $(gbps "$bps") Gb/s delivered, $loss % lost"
	else
		record_fail "$meas" "$path" "$(iperf_error "$meas" "$path" "$r")"
	fi
}

# kv KEY LINE: the value of KEY=VALUE in LINE.
kv() { tr ' ' '\n' <<<"$2" | sed -n "s/^$1=//p"; }

# measure_conns MEAS PATH R: conns runs connrate's clients one at a time,
# conc runs CONC of them at once.
measure_conns() {
	local meas=$1 path=$2 r=$3 base="$WORK/$1.$2.r$3" rc=0 before="" args=()
	[[ $meas == conc ]] && args=(-conc "$CONC")
	# The daemon's CPU per connection: steadier than the rate, which
	# moves with every wait for a CPU on a shared machine.
	[[ $path != kernel && -n ${DPID[$path]:-} ]] && before=$(proc_cost "${DPID[$path]}")
	run_bounded "$(client_ns "$path")" $((T + 15)) "$base.out" "$base.err" \
		"$WORK/connrate" -c "$(server_addr "$path" 4):$CONN_PORT" -d "${T}s" -timeout 2s "${args[@]}" || rc=$?
	local line n errs cps p50 p99
	line=$(grep -m1 '^conns=' "$base.out" 2>/dev/null) || line=""
	n=$(kv conns "$line") errs=$(kv errors "$line") cps=$(kv conns_per_s "$line")
	p50=$(kv connect_p50_ms "$line") p99=$(kv connect_p99_ms "$line")
	if ((rc == 0)) && [[ -n $n && -n $cps ]] && positive "$n"; then
		if [[ $meas == conc ]]; then
			record conc "$path" "$cps" "$p50" "${errs:-0}"
		else
			record conns "$path" "$cps" "$p50" "$p99" "${errs:-0}"
		fi
		if [[ -n $before ]]; then
			local after
			after=$(proc_cost "${DPID[$path]}")
			record "${meas/conns/conn}cpu" "$path" "$(awk -v a="${before#* }" -v b="${after#* }" -v hz="$CLK_TCK" -v n="$n" -v e="${errs:-0}" \
				'BEGIN { printf "%.1f", (b - a) * 1e6 / hz / (n + e) }')"
		fi
		say "  $meas $path: $cps conns/s, connect p50 $p50 ms p99 $p99 ms, ${errs:-0} errors"
		# Each error is a connection that did not complete within 2 s:
		# a few of them eat much of the run, so any is worth a word.
		if ((${errs:-0} > 0)); then
			WARNINGS+=("$meas over $path in round $r: ${errs} of $((n + errs)) connections failed, last: $(tail -1 "$base.err" | sed 's/^connrate: [0-9]* errors, last: //')")
		fi
	else
		record_fail "$meas" "$path" "connrate: $(cat "$base.out" "$base.err" 2>/dev/null | tail -2 | tr '\n' ' ')"
	fi
}

# measure_rr PATH R: round trips of a small request and its echo on one
# open connection.
measure_rr() {
	local path=$1 r=$2 base="$WORK/rr.$1.r$2" rc=0
	run_bounded "$(client_ns "$path")" $((T + 15)) "$base.out" "$base.err" \
		"$WORK/connrate" -c "$(server_addr "$path" 4):$CONN_PORT" -rr -d "${T}s" -timeout 2s || rc=$?
	local line n p50 p99
	line=$(grep -m1 '^rr=' "$base.out" 2>/dev/null) || line=""
	n=$(kv rr "$line") p50=$(kv rr_p50_ms "$line") p99=$(kv rr_p99_ms "$line")
	if ((rc == 0)) && [[ -n $n && -n $p50 ]] && positive "$n"; then
		record rr "$path" "$p50" "$p99"
		say "  rr $path: $n round trips, p50 $p50 ms p99 $p99 ms"
	else
		record_fail rr "$path" "connrate -rr: $(cat "$base.out" "$base.err" 2>/dev/null | tail -2 | tr '\n' ' ')"
	fi
}

# daemon_rss PID: the current RSS in KiB summed over the process tree.
daemon_rss() {
	local pid kib=0 k
	for pid in $(descendants "$1"); do
		[[ $pid == "$1" ]] && continue
		k=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status" 2>/dev/null) || k=0
		kib=$((kib + ${k:-0}))
	done
	echo "$kib"
}

declare -A PRE_IDLE # path -> "KiB ticks" read before the idle measurement

# measure_idle PATH R: hold IDLE_N idle connections through the daemon and
# read its RSS while they are open; the difference from before, per
# connection, is what an idle flow costs.
measure_idle() {
	local path=$1 r=$2 base="$WORK/idle.$1.r$2"
	case $path in
	kernel) record_na idle "$path" "no daemon"; return ;;
	socks5) record_na idle "$path" "measured on the direct path"; return ;;
	esac
	local pid=${DPID[$path]} before after line held
	PRE_IDLE[$path]=$(proc_cost "$pid")
	before=$(daemon_rss "$pid")
	spawn "$(client_ns "$path")" 120 "$base.out" bash -c 'ulimit -n $(( $1 + 1000 )) 2>/dev/null; exec "$2" -c "$3" -hold "$1" -d 60s -timeout 5s' \
		idle "$IDLE_N" "$WORK/connrate" "$(server_addr "$path" 4):$CONN_PORT"
	local client=$SPAWNED i
	for ((i = 0; i < 900; i++)); do
		line=$(grep -m1 '^held=' "$base.out" 2>/dev/null) && break
		alive "$client" || break
		sleep 0.1
	done
	held=$(kv held "$line")
	# The connections are held for 60 s; the RSS that counts is that of
	# idle flows, not of flows still opening.
	if [[ -n $held ]] && ((IDLE_SETTLE > 0)) && alive "$client"; then
		sleep "$IDLE_SETTLE"
	fi
	after=$(daemon_rss "$pid")
	stop_pids "$client" || true
	if [[ -n $held ]] && ((held == IDLE_N)); then
		record idle "$path" "$(awk -v k="$after" 'BEGIN { printf "%.1f", k / 1024 }')" \
			"$(awk -v a="$after" -v b="$before" -v n="$held" 'BEGIN { printf "%.1f", (a - b) / n }')"
		say "  idle $path: $held connections, RSS $((before / 1024)) -> $((after / 1024)) MiB"
	else
		record_fail idle "$path" "held ${held:-0} of $IDLE_N: $(tail -2 "$base.out" | tr '\n' ' ')"
	fi
}

measure() {
	local meas=$1 path=$2 r=$3
	if [[ -n ${FLOOR[$path]:-} && $meas != conns ]]; then
		record_na "$meas" "$path" "a floor is measured on short connections one at a time only"
		return
	fi
	if [[ $path != kernel ]] && { [[ -z ${DPID[$path]:-} ]] || ! alive "${DPID[$path]}"; }; then
		record_fail "$meas" "$path" "its daemon is not running"
		return
	fi
	if [[ $path == socks5 ]] && { [[ -z $DANTED_PID ]] || ! alive "$DANTED_PID"; }; then
		record_fail "$meas" "$path" "danted is not running"
		return
	fi
	case $meas in
	tcp*) measure_tcp "$meas" "$path" "$r" ;;
	udp) measure_udp udp "$path" "$r" ;;
	udpw) measure_udp udpw "$path" "$r" -w 4M ;;
	conns | conc) measure_conns "$meas" "$path" "$r" ;;
	rr) measure_rr "$path" "$r" ;;
	idle) measure_idle "$path" "$r" ;;
	esac
}

# --- table -------------------------------------------------------------------
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) exit 1; if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

fmt() { awk -v v="$1" 'BEGIN { a = v < 0 ? -v : v; if (a >= 1000) printf "%.0f", v; else if (a >= 100) printf "%.1f", v; else printf "%.2f", v }'; }

print_table() {
	local model
	model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
	echo "machine: $(nproc) cores, ${model:-unknown cpu}, kernel $(uname -r), date $(date -u +%Y-%m-%dT%H:%MZ), rounds $ROUNDS, mtu 1500"
	echo "runs: ${T}s each, udp offered $UDP_RATE with 1400-byte datagrams, netstackd $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo unknown)"
	[[ -z $BASE_COL ]] || echo "$BASE_COL: $BASELINE, with the direct column's arguments"
	((PASTA)) && echo "pasta: $(cat "$WORK/pasta.cmd" 2>/dev/null || echo pasta) (tap MTU 65520, its default)"
	# The issue's yardstick: netstackd direct against pasta, same run.
	local vs=""
	((PASTA)) && vs=1
	printf '%-34s' metric
	local path row
	for path in "${PATHS[@]}"; do
		if [[ $path == kernel ]]; then printf '%12s' kernel; else printf '%20s' "$path (x)"; fi
	done
	[[ -z $vs ]] || printf '%14s' direct/pasta
	echo
	local notes=()
	for row in "${ROWS[@]}"; do
		local any=0
		for path in "${PATHS[@]}"; do
			[[ -n ${VALS["$row|$path"]:-} || -n ${STATE["$row|$path"]:-} ]] && any=1
		done
		((any)) || continue
		printf '%-34s' "${LABEL[$row]}"
		local base=""
		base=$(median <<<"${VALS["$row|kernel"]:-}") || base=""
		for path in "${PATHS[@]}"; do
			local cell m
			if m=$(median <<<"${VALS["$row|$path"]:-}"); then
				if [[ $row == cerr || $row == nerr ]]; then cell=$(awk -v v="$m" 'BEGIN { print v + 0 }'); else cell=$(fmt "$m"); fi
				if [[ $path != kernel && -n ${RATIO[$row]:-} && -n $base ]] && positive "$base"; then
					cell+=" ($(awk -v a="$m" -v b="$base" 'BEGIN { printf "%.2f", a / b }'))"
				fi
				[[ ${STATE["$row|$path"]:-} == fail ]] && cell+="!"
			else
				case ${STATE["$row|$path"]:-} in
				fail) cell=FAIL ;;
				na) cell="n/a"; notes+=("$path: ${NOTE["$row|$path"]}") ;;
				*) cell="-" ;;
				esac
			fi
			if [[ $path == kernel ]]; then printf '%12s' "$cell"; else printf '%20s' "$cell"; fi
		done
		if [[ -n $vs ]]; then
			local d p
			d=$(median <<<"${VALS["$row|direct"]:-}") || d=""
			p=$(median <<<"${VALS["$row|pasta"]:-}") || p=""
			if [[ -n $d && -n $p && $row != cerr && $row != nerr ]] && positive "$p"; then
				printf '%14s' "$(awk -v a="$d" -v b="$p" 'BEGIN { printf "%.2f", a / b }')"
			else
				printf '%14s' -
			fi
		fi
		echo
	done
	echo "medians over rounds; (x) = ratio to kernel; ! = some rounds failed; - = not applicable"
	[[ -z $vs ]] || echo "direct/pasta = direct's median over pasta's (rates: above 1 is netstackd ahead; times and CPU: below 1 is)"
	if ((${#notes[@]})); then
		printf '%s\n' "${notes[@]}" | sort -u | sed 's/^/n\/a: /'
	fi
	echo "daemon = netstackd (or pasta, or the peer program); RSS summed over its processes; CPU = user+system over the round"
}

# --- main --------------------------------------------------------------------
REPO=$(cd "$(dirname "$0")/.." && pwd)
say "building netstackd, connrate and tunfloor in $WORK"
(cd "$REPO" && go build -o "$WORK/netstackd" ./cmd/netstackd) || die "go build ./cmd/netstackd failed"
# The tools are a module of their own (bench/go.mod), apart from the product.
(cd "$REPO/bench" && go build -o "$WORK/connrate" ./connrate) || die "go build ./connrate in bench/ failed"
(cd "$REPO/bench" && go build -o "$WORK/tunfloor" ./tunfloor) || die "go build ./tunfloor in bench/ failed"

setup_topology
write_danted_conf
spawn "$NS_SRV" "$MAX_TIME" "$WORK/connrate-server.log" "$WORK/connrate" -serve ":$CONN_PORT"
CONNRATE_SRV=$SPAWNED
if ! wait_listen "$NS_SRV" tcp "$CONN_PORT" || ! wait_listen "$NS_SRV" udp "$CONN_PORT"; then
	die "connrate server did not start: $(tail -3 "$WORK/connrate-server.log")"
fi

{
	echo "goos: linux"
	echo "goarch: $(go env GOARCH)"
	echo "pkg: github.com/netstackd/netstackd/bench"
	echo "cpu: $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
} >"$WORK/gobench.txt"

say "paths: ${PATHS[*]}; rounds $ROUNDS; ${T}s per run; overall limit ${MAX_TIME}s"
for ((r = 1; r <= ROUNDS; r++)); do
	say "round $r/$ROUNDS"
	start_danted "$r" || WARNINGS+=("danted did not start in round $r")
	for i in "${!PATHS[@]}"; do
		[[ ${PATHS[$i]} == kernel ]] && continue
		start_daemon "${PATHS[$i]}" "$r" "$i" || true
	done
	# Rotate the order of paths each round, so that no path always runs
	# first (or right after another) while the machine's load drifts.
	order=()
	for ((i = 0; i < ${#PATHS[@]}; i++)); do
		order+=("${PATHS[$(((i + r - 1) % ${#PATHS[@]}))]}")
	done
	for meas in "${MEASUREMENTS[@]}"; do
		for path in "${order[@]}"; do
			measure "$meas" "$path" "$r"
		done
	done
	for path in "${PATHS[@]}"; do
		[[ $path == kernel ]] && continue
		if [[ -n ${DPID[$path]:-} ]]; then
			stop_daemon "$path" "$r"
		else
			record_fail daemon "$path" "daemon did not start"
		fi
	done
	if [[ -n $DANTED_PID ]]; then stop_danted "$r"; else record_fail danted socks5 "danted did not start"; fi
done
alive "$CONNRATE_SRV" || WARNINGS+=("the connrate server died (log $WORK/connrate-server.log)")

echo
print_table
if ((${#WARNINGS[@]})); then
	echo
	printf 'warning: %s\n' "${WARNINGS[@]}"
fi
if [[ -n $GOBENCH ]]; then
	cp "$WORK/gobench.txt" "$GOBENCH"
	say "Go benchmark lines in $GOBENCH (benchstat -col /path $GOBENCH)"
fi
if ((FAILED)); then
	say "FAIL: some measurements produced no number (see warnings above)"
	exit 1
fi
