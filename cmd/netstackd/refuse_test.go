package main

import (
	"bytes"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/netstackd/netstackd/proxy"
)

// TestUpstreamRefuses: which of netstackd's dialers refuses what, in each
// mode (issue 19).
func TestUpstreamRefuses(t *testing.T) {
	const (
		tunAddr   = "198.18.5.5"
		fakeAddr  = "198.19.0.9"
		fake6     = "fd00:1919::9"
		dnsAddr   = "198.18.0.2"
		loop      = "127.0.0.1"
		mapped    = "::ffff:127.0.0.1"
		routed    = "10.9.9.9"
		elsewhere = "192.0.2.1"
	)
	type want map[string]bool // address → refused
	tests := []struct {
		name string
		args []string
		run  bool
		// what the flows' dialer, netstackd's own Direct and the stack refuse
		flows, own, stack want
	}{
		{name: "direct", args: nil,
			flows: want{tunAddr: true, fakeAddr: true, fake6: true, dnsAddr: true, loop: true, mapped: true, elsewhere: false},
			own:   want{tunAddr: true, dnsAddr: true, loop: false, mapped: false, elsewhere: false},
			stack: want{tunAddr: true, loop: true, elsewhere: false}},
		{name: "direct allow-host-loopback", args: []string{"--allow-host-loopback"},
			flows: want{tunAddr: true, loop: false, mapped: false},
			stack: want{tunAddr: true, loop: false}},
		{name: "host-wide direct", args: []string{"--route", "0.0.0.0/0"},
			flows: want{tunAddr: true, fakeAddr: true, dnsAddr: true, loop: true, elsewhere: false},
			own:   want{tunAddr: true, loop: false}},
		{name: "run", args: []string{"--", "true"}, run: true,
			flows: want{tunAddr: true, loop: true, mapped: true, elsewhere: false}},
		{name: "container", args: []string{"--netns", "/x"},
			flows: want{tunAddr: true, loop: true, elsewhere: false}},
		{name: "socks5", args: []string{"--socks", "127.0.0.1:1080"},
			own:   want{tunAddr: true, loop: false},
			stack: want{tunAddr: true, fakeAddr: true, dnsAddr: true, loop: false, elsewhere: false}},
		{name: "own-namespace route", args: []string{"--route", "10.0.0.0/8"},
			flows: want{routed: true, elsewhere: false},
			own:   want{routed: true, loop: false}},
		{name: "own-namespace route with a mark of the user's", args: []string{"--route", "10.0.0.0/8", "--fwmark", "7"},
			flows: want{routed: false}},
		{name: "container route", args: []string{"--netns", "/x", "--route", "10.0.0.0/8"},
			flows: want{routed: false}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts, err := parseFlags(tc.args, tc.run, io.Discard)
			if err != nil {
				t.Fatal(err)
			}
			up, err := newUpstream(t.Context(), opts, &refusals{log: slog.New(slog.DiscardHandler)}, nil, nil)
			if err == nil && up.live != nil {
				t.Cleanup(up.live.Close)
			}
			if err != nil {
				t.Fatal(err)
			}
			check := func(what string, refuse func(netip.Addr) bool, w want) {
				t.Helper()
				for a, refused := range w {
					got := refuse != nil && refuse(netip.MustParseAddr(a))
					if got != refused {
						t.Errorf("%s refuses %s: %v, want %v", what, a, got, refused)
					}
				}
			}
			if tc.flows != nil {
				d, ok := up.dialer.(proxy.Direct)
				if !ok {
					t.Fatalf("flows' dialer is %T, want proxy.Direct", up.dialer)
				}
				check("flows' dialer", d.Refuse, tc.flows)
			}
			check("own Direct", up.direct.Refuse, tc.own)
			check("stack", up.refuse, tc.stack)
		})
	}
}

// TestRefusalsLogged: every refusal is counted and logged at debug level,
// at info level at most once per refuseLogEvery.
func TestRefusalsLogged(t *testing.T) {
	var buf bytes.Buffer
	r := &refusals{log: slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))}
	refuse := r.refuser(refuseSet{[]netip.Prefix{netip.MustParsePrefix("198.18.0.0/15")}, reasonOwn}, refuseSet{proxy.LoopbackPrefixes(), reasonLoopback})
	for range 100 {
		if !refuse(netip.MustParseAddr("198.18.0.2")) {
			t.Fatal("198.18.0.2 not refused")
		}
	}
	if !refuse(netip.MustParseAddr("::ffff:127.0.0.1")) {
		t.Fatal("::ffff:127.0.0.1 not refused")
	}
	if refuse(netip.MustParseAddr("192.0.2.1")) {
		t.Fatal("192.0.2.1 refused")
	}
	if n := r.count.Load(); n != 101 {
		t.Errorf("count %d, want 101", n)
	}
	out := buf.String()
	if n := strings.Count(out, "level=INFO"); n != 1 {
		t.Errorf("%d info lines for 101 refusals within %v, want 1:\n%s", n, refuseLogEvery, out)
	}
	if n := strings.Count(out, "level=DEBUG"); n != 101 {
		t.Errorf("%d debug lines, want 101", n)
	}
	if !strings.Contains(out, "--allow-host-loopback") {
		t.Error("the loopback refusal does not name --allow-host-loopback")
	}
}

// BenchmarkRefuser: the check every direct datagram pays in the stack, for
// an address that passes (the common case) with the default prefixes.
func BenchmarkRefuser(b *testing.B) {
	opts, err := parseFlags(nil, false, io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	refuse := (&refusals{log: slog.New(slog.DiscardHandler)}).refuser(ownSet(opts), routeSet(opts), loopbackSet(opts))
	for _, a := range []string{"192.0.2.1", "2001:db8::1"} {
		addr := netip.MustParseAddr(a)
		b.Run(a, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if refuse(addr) {
					b.Fatal("refused")
				}
			}
		})
	}
}
