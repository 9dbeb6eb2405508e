package main

import (
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestPlanFDs(t *testing.T) {
	direct := fdDemand{udpCost: 1, ping: true, dns: true, extra: 1, maxFlows: 65536}
	socks := fdDemand{udpCost: 2, dns: true, extra: 1, maxFlows: 65536}
	with := func(d fdDemand, f func(*fdDemand)) fdDemand { f(&d); return d }
	cases := []struct {
		name                 string
		d                    fdDemand
		limit                uint64
		tcp, udp, ping, dnsN int
		capped               bool
	}{
		// Issue 19: 1,024 descriptors. 1024-65 = 959; DNS 239 (a
		// quarter); ping 720/16 = 45; UDP 675/4 = 168; TCP the 507 left.
		{name: "issue19-1024-direct", d: direct, limit: 1024, tcp: 507, udp: 168, ping: 45, dnsN: 239},
		// Through SOCKS5 a UDP association costs two: half as many.
		{name: "1024-socks5", d: socks, limit: 1024, tcp: 540, udp: 90, dnsN: 239},
		{name: "no-dns", d: with(direct, func(d *fdDemand) { d.dns = false }), limit: 1024, tcp: 675, udp: 225, ping: 59},
		{name: "udp-refused", d: with(socks, func(d *fdDemand) { d.udpCost = 0 }), limit: 1024, tcp: 720, dnsN: 239},
		// systemd's default hard limit: every table at its default.
		{name: "524288-defaults", d: direct, limit: 524288, tcp: 65536, udp: 16384, ping: 1024, dnsN: 256},
		// A common 65536: UDP and ping keep their defaults-or-share,
		// TCP gets what is left, below its default.
		{name: "65536", d: direct, limit: 65536, tcp: 48144, udp: 16047, ping: 1024, dnsN: 256},
		{name: "explicit-lower-kept", d: with(direct, func(d *fdDemand) { d.maxFlows, d.maxFlowsSet = 100, true }), limit: 1024, tcp: 100, udp: 168, ping: 45, dnsN: 239},
		{name: "explicit-higher-capped", d: with(direct, func(d *fdDemand) { d.maxFlows, d.maxFlowsSet = 5000, true }), limit: 1024, tcp: 507, udp: 168, ping: 45, dnsN: 239, capped: true},
		// The default is not the user's: capped without a warning.
		{name: "default-capped-silently", d: direct, limit: 2048, tcp: 1215, udp: 405, ping: 107, dnsN: 256},
		// Below the reserve every table keeps one slot: a 0 would mean
		// stack's default.
		{name: "tiny", d: direct, limit: 32, tcp: 1, udp: 1, ping: 1},
		// The smallest limit at which every table keeps its default
		// (docs/architecture.md says "about 83,000"), and one below.
		{name: "defaults-threshold", d: direct, limit: 83265, tcp: 65536, udp: 16384, ping: 1024, dnsN: 256},
		{name: "below-threshold", d: direct, limit: 83264, tcp: 65535, udp: 16384, ping: 1024, dnsN: 256},
		{name: "huge-limit", d: direct, limit: 1 << 40, tcp: 65536, udp: 16384, ping: 1024, dnsN: 256},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.d.limit = c.limit
			b := planFDs(c.d)
			if b.maxFlows != c.tcp || b.maxUDPFlows != c.udp || b.maxPingFlows != c.ping || b.dns != c.dnsN {
				t.Errorf("tcp %d udp %d ping %d dns %d, want %d %d %d %d", b.maxFlows, b.maxUDPFlows, b.maxPingFlows, b.dns, c.tcp, c.udp, c.ping, c.dnsN)
			}
			if (b.capped != "") != c.capped {
				t.Errorf("capped warning %q, want one: %v", b.capped, c.capped)
			}
			if c.capped && !strings.Contains(b.capped, "--max-flows") {
				t.Errorf("warning %q does not name the flag", b.capped)
			}
			// What every table may hold fits the limit, when it can.
			used := b.reserve + b.dns + b.maxFlows + b.maxUDPFlows*c.d.udpCost + b.maxPingFlows
			if c.limit >= fdReserve+64 && uint64(used) > c.limit {
				t.Errorf("tables may use %d descriptors, above the limit %d", used, c.limit)
			}
		})
	}
}

func TestNeedsRaise(t *testing.T) {
	cases := []struct {
		name     string
		cur, max uint64
		want     bool
	}{
		// What Go's runtime leaves when it raised the limit itself:
		// touching it would make children inherit the raised limit.
		{name: "runtime-raised", cur: 524287, max: 524288, want: false},
		{name: "equal", cur: 1024, max: 1024, want: false},
		{name: "low", cur: 1024, max: 524288, want: true},
		{name: "infinite-hard", cur: 1024, max: unix.RLIM_INFINITY, want: false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := needsRaise(unix.Rlimit{Cur: c.cur, Max: c.max}); got != c.want {
				t.Errorf("needsRaise(%d, %d) = %v, want %v", c.cur, c.max, got, c.want)
			}
		})
	}
}
