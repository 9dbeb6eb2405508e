package main

import (
	"log/slog"
	"net/netip"
	"sync/atomic"

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/proxy"
)

// What a client behind the TUN may not make netstackd reach (issue 19), and
// why:
//
//   - netstackd's own addresses (ownPrefixes: the TUN's prefixes, the fake-IP
//     ranges, the DNS address), in every mode and through every socket of
//     its own: in host-wide mode its marked sockets are routed by the main
//     table, which holds the TUN's prefixes, so a dial there came back into
//     the TUN and dialed again until every handshake slot was taken;
//     elsewhere the dial left for an address that means nothing outside.
//   - the routes netstackd put into its own namespace's main table (a
//     --route without --netns, run or host-wide mode) when its sockets carry
//     no mark: its own dial there would enter the TUN again.
//   - in direct mode, loopback (127.0.0.0/8, ::1, and 0.0.0.0 and ::, which
//     Linux connects locally), however the flow named it: a packet to
//     127.0.0.1 never enters the TUN, but a name can resolve there
//     (a fake-IP flow is dialed by name, /etc/hosts, a DNS answer), and the
//     services listening on netstackd's loopback are not the client's.
//     --allow-host-loopback opens it, as slirp4netns's allow_host_loopback
//     does.
//
// The checks are on the resolved address in proxy.Direct (its Control hook,
// and WriteTo for datagrams) and on the address a client sent to in the
// stack, which also covers datagrams sent in batches on the socket itself.
// Through a proxy the proxy server's host decides, but an address of
// netstackd's own is refused before the proxy is asked.

// refuseLogEvery bounds the info lines about refusals: a client can cause
// one per packet.
const refuseLogEvery = ratelog.DefaultEvery

// refusals counts what the refuse funcs refuse, logs each at debug level, and
// a summary at info level at most every refuseLogEvery.
type refusals struct {
	log   *slog.Logger
	count atomic.Uint64
	info  ratelog.Limiter // Every 0: ratelog.DefaultEvery
}

// refuser returns a func for proxy.Direct.Refuse and stack.Config.Refuse:
// an address in one of the prefixes of a set is refused, counted and
// logged with the set's reason.
func (r *refusals) refuser(sets ...refuseSet) func(netip.Addr) bool {
	type compiled struct {
		in     func(netip.Addr) bool
		reason string
	}
	cs := make([]compiled, 0, len(sets))
	for _, s := range sets {
		if len(s.prefixes) > 0 {
			cs = append(cs, compiled{proxy.RefusePrefixes(s.prefixes...), s.reason})
		}
	}
	return func(a netip.Addr) bool {
		for _, c := range cs {
			if c.in(a) {
				r.refused(a, c.reason)
				return true
			}
		}
		return false
	}
}

// refuseSet is a list of prefixes refused for one reason.
type refuseSet struct {
	prefixes []netip.Prefix
	reason   string
}

func (r *refusals) refused(a netip.Addr, reason string) {
	n := r.count.Add(1)
	r.log.Debug("refused destination", "dst", a, "why", reason)
	r.info.Log(r.log, slog.LevelInfo, "refused a destination (further refusals within "+refuseLogEvery.String()+" are logged at debug level)",
		"dst", a, "why", reason, "refused_total", n)
}

// Reasons, as logged.
const (
	reasonOwn      = "netstackd's own address (TUN prefix, fake-IP range or DNS address)"
	reasonRoute    = "routed into netstackd's TUN in its own namespace"
	reasonLoopback = "loopback of netstackd's host (--allow-host-loopback opens it)"
)

// ownSet is what no socket of netstackd's may reach, whatever the mode.
func ownSet(opts *options) refuseSet {
	return refuseSet{opts.ownPrefixes(), reasonOwn}
}

// routeSet is the routes netstackd installs in the main table of its own
// namespace, which its unmarked sockets would follow into the TUN; empty
// where they do not: the TUN in another namespace (--netns, run), a
// descriptor netstackd does not configure (--tun-fd), host-wide mode (the
// routes are in a table of their own, and the sockets are marked), or a
// --fwmark for rules of the user's own.
func routeSet(opts *options) refuseSet {
	if opts.netns != "" || len(opts.command) > 0 || opts.tunFD >= 0 || opts.hostWide || opts.fwmark != 0 {
		return refuseSet{}
	}
	return refuseSet{opts.routes, reasonRoute}
}

// loopbackSet is refused for direct flows unless --allow-host-loopback.
func loopbackSet(opts *options) refuseSet {
	if opts.allowLoopback {
		return refuseSet{}
	}
	return refuseSet{proxy.LoopbackPrefixes(), reasonLoopback}
}
