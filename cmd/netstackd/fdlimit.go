package main

import (
	"fmt"
	"log/slog"
	"math"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/proxy"
)

// Every flow netstackd relays costs it a file descriptor: the upstream
// socket of a TCP flow (or its connection to the proxy), the socket of a UDP
// association (with SOCKS5, the UDP socket and the TCP connection that keeps
// the association alive), a ping socket. A client behind the TUN chooses how
// many flows it opens, so the tables are sized against the open-file limit:
// a share for each, a reserve for the descriptors netstackd cannot do
// without, so that no kind of flow can take the descriptors another needs
// (issue 19: about 1,000 UDP source ports once refused every TCP flow and
// all DNS for the whole UDP timeout).

// Defaults of the tables, as stack.Config sets them, kept here to tell a
// default from a cap.
const (
	defaultMaxUDPFlows  = 16384
	defaultMaxPingFlows = 1024
)

const (
	// fdReserve is what the tables leave for netstackd's own descriptors:
	// stdin, stdout and stderr (3); the Go runtime's poller and its
	// wake-up (2) and the relay's poller (2); the netlink sockets of the
	// TUN set-up and of host-wide routing (a few, some short-lived); the
	// run subcommand's socketpair; files read at start and while running
	// (resolv.conf, /proc and cgroup files, profiles: a handful); and
	// the sockets the tables cannot count, such as a published connection
	// accepted and then reset for want of a slot. About 20 are in use on
	// a quiet daemon; 64 leaves room for bursts. TUN queues and published
	// ports come on top (fdBudgetFor).
	fdReserve = 64
	// dnsUpstreamFDs is the most descriptors the resolver holds at once:
	// each forwarded query dials the upstream over TCP, and dns bounds
	// those in flight at 256 (maxUpstreamInFlight). A small limit gives
	// it at most a quarter of what the reserve leaves.
	dnsUpstreamFDs = 256
	// udpShareDiv and pingShareDiv give UDP a quarter, and ping sockets a
	// sixteenth, of what the reserve and DNS leave; TCP, the bulk of
	// what clients open, gets the rest. UDP's share is a cap, not a
	// guarantee: a UDP flood fills it and no more.
	udpShareDiv  = 4
	pingShareDiv = 16
	// minFDs is the limit below which netstackd warns at start: the
	// tables would hold a few dozen flows.
	minFDs = 512
)

// fdDemand is what decides the budget: the limit and what each flow costs.
type fdDemand struct {
	limit uint64 // the soft RLIMIT_NOFILE
	// udpCost is the descriptors of one UDP association: 1 direct, 2
	// through SOCKS5 (the UDP socket and the TCP control connection), 0
	// when UDP is refused.
	udpCost int
	ping    bool // ping sockets are used (direct mode)
	dns     bool // a resolver forwards queries (DNS not off)
	// extra are descriptors held for the whole run besides the reserve:
	// TUN queues and published ports' listeners.
	extra int
	// maxFlows is --max-flows, explicit when maxFlowsSet.
	maxFlows    int
	maxFlowsSet bool
}

// fdBudget is the split of the limit between the tables.
type fdBudget struct {
	limit, reserve, dns int
	maxFlows            int // TCP flows, one descriptor each
	maxUDPFlows         int // UDP associations, udpCost each
	maxPingFlows        int // ping sockets
	// capped is a warning for the user when the limit lowers a value
	// they set explicitly; "" when it does not.
	capped string
}

// planFDs splits d.limit: the reserve and the DNS resolver first, then a
// share for UDP and one for ping sockets, the rest for TCP. A table never
// gets more than its default, nor TCP more than --max-flows.
func planFDs(d fdDemand) fdBudget {
	limit := int(min(d.limit, math.MaxInt32))
	b := fdBudget{limit: limit, reserve: fdReserve + d.extra}
	rest := max(limit-b.reserve, 0)
	if d.dns {
		b.dns = min(dnsUpstreamFDs, rest/4)
		rest -= b.dns
	}
	if d.ping {
		b.maxPingFlows = min(defaultMaxPingFlows, rest/pingShareDiv)
		rest -= b.maxPingFlows
	}
	if d.udpCost > 0 {
		b.maxUDPFlows = min(defaultMaxUDPFlows, rest/udpShareDiv/d.udpCost)
		rest -= b.maxUDPFlows * d.udpCost
	}
	b.maxFlows = min(d.maxFlows, rest)
	if d.maxFlowsSet && d.maxFlows > rest {
		b.capped = fmt.Sprintf("--max-flows %d is more than the open-file limit %d allows: at most %d TCP flows (raise the limit: LimitNOFILE= in systemd, ulimit -Hn)", d.maxFlows, limit, rest)
	}
	// A table of 0 would mean its default to stack.Config: keep one
	// slot. The limit is then far too low anyway, and said so at start.
	b.maxFlows = max(b.maxFlows, 1)
	if d.udpCost > 0 {
		b.maxUDPFlows = max(b.maxUDPFlows, 1)
	}
	if d.ping {
		b.maxPingFlows = max(b.maxPingFlows, 1)
	}
	return b
}

// raiseFileLimit returns the open-file limit netstackd runs with, raising
// the soft limit to the hard one if that has not been done already.
//
// Go's runtime does it itself before main (syscall's init, go.dev/issue/46279):
// it sets the soft limit to hard-1 and remembers the original, which
// os/exec and syscall.Exec put back in every child, so that programs run by
// `netstackd run` get the limit they would have had. Calling Setrlimit
// makes it forget the original (syscall.Setrlimit clears it), so netstackd
// calls it only when the runtime did not raise the limit; origSoft is then
// the limit to give children back, 0 otherwise.
func raiseFileLimit() (soft, hard, origSoft uint64, err error) {
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil {
		return 0, 0, 0, fmt.Errorf("read open-file limit: %w", err)
	}
	if !needsRaise(lim) {
		return lim.Cur, lim.Max, 0, nil
	}
	raised := unix.Rlimit{Cur: lim.Max, Max: lim.Max}
	if err := unix.Setrlimit(unix.RLIMIT_NOFILE, &raised); err != nil {
		return lim.Cur, lim.Max, 0, fmt.Errorf("raise open-file limit from %d to %d: %w", lim.Cur, lim.Max, err)
	}
	return raised.Cur, raised.Max, lim.Cur, nil
}

// needsRaise reports whether the soft limit is below what Go's runtime
// would have raised it to (hard-1).
func needsRaise(lim unix.Rlimit) bool {
	return lim.Max != unix.RLIM_INFINITY && lim.Cur+1 < lim.Max
}

// sizeTables raises the open-file limit and sizes the flow tables against
// it, setting opts.maxFlows, opts.maxUDPFlows and opts.maxPingFlows, and
// logs the result. origSoft is the soft limit for run's program when
// netstackd raised it itself (raiseFileLimit), 0 otherwise.
func sizeTables(opts *options, up *upstream, log *slog.Logger) (origSoft uint64) {
	soft, hard, orig, err := raiseFileLimit()
	if err != nil {
		log.Warn("open-file limit", "err", err)
		if soft == 0 {
			return 0 // unknown: keep the defaults
		}
	}
	d := fdDemand{
		limit:       soft,
		dns:         opts.dnsMode != "off",
		extra:       opts.queues + len(opts.publish),
		maxFlows:    opts.maxFlows,
		maxFlowsSet: opts.maxFlowsSet,
	}
	_, direct := up.dialer.(proxy.Direct)
	if up.udp() != nil {
		d.udpCost = 2 // the UDP socket and the SOCKS5 control connection
		if direct {
			d.udpCost = 1
		}
	}
	d.ping = direct
	b := planFDs(d)
	opts.maxFlows, opts.maxUDPFlows, opts.maxPingFlows = b.maxFlows, b.maxUDPFlows, b.maxPingFlows
	attrs := []any{"limit", soft, "hard", hard, "reserve", b.reserve, "dns", b.dns,
		"max_flows", b.maxFlows, "max_udp_flows", b.maxUDPFlows, "max_ping_flows", b.maxPingFlows}
	if orig != 0 {
		attrs = append(attrs, "raised_from", orig)
	}
	log.Info("open files", attrs...)
	if b.capped != "" {
		log.Warn(b.capped)
	}
	if soft < minFDs {
		log.Warn("open-file limit is low: few flows fit (raise it: LimitNOFILE= in systemd, ulimit -Hn)", "limit", soft, "want_at_least", minFDs)
	}
	return orig
}
