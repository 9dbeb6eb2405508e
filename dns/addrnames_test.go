package dns

import (
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// Issue 17: the addresses a forwarded answer gave are known by the name
// asked for (NameOf), from the cache too, until the answer's TTL and a
// minute more have passed.
func TestNameOfForwarded(t *testing.T) {
	d := startRecursive(t)
	s, c := remoteServer(t, d.addr, nil)
	h := netip.MustParseAddr("192.0.2.20")
	if _, ok := s.NameOf(h); ok {
		t.Fatal("a name before any answer")
	}
	q := query(t, 1, "H.test.", dns.TypeA, 0)
	if m := parse(t, q, s.Answer(t.Context(), q, false)); len(m.Answer) != 1 {
		t.Fatalf("h.test answered %v", m.Answer)
	}
	if name, ok := s.NameOf(h); !ok || name != "h.test" {
		t.Fatalf("NameOf(%s) = %q, %v; want h.test", h, name, ok)
	}
	if name, ok := s.NameOf(netip.MustParseAddr("::ffff:192.0.2.20")); !ok || name != "h.test" {
		t.Fatalf("NameOf v4-mapped = %q, %v", name, ok)
	}
	// h.test's TTL is 120 s: past it and the margin, unknown again.
	c.Advance(120*time.Second + addrNameMargin + time.Second)
	if _, ok := s.NameOf(h); ok {
		t.Fatal("a name past its answer's TTL and the margin")
	}
	// A cached answer names it again: the table is emptied, so only the
	// answer from the cache can put the name back.
	c2 := newClock()
	s.now = c2.Now
	s.addrNames.mu.Lock()
	s.addrNames.m, s.addrNames.order, s.addrNames.next = nil, nil, 0
	s.addrNames.mu.Unlock()
	parse(t, q, s.Answer(t.Context(), q, false))
	if name, ok := s.NameOf(h); !ok || name != "h.test" {
		t.Fatalf("NameOf after the answer came again = %q, %v", name, ok)
	}
}

// The table is bounded: past maxAddrNames the oldest address goes.
func TestAddrNamesBounded(t *testing.T) {
	var a addrNames
	now := time.Now()
	first := netip.MustParseAddr("10.0.0.0")
	addr := first
	for range maxAddrNames + 1 {
		a.put(addr, addrName{name: "n.test", expires: now.Add(time.Hour).UnixNano()})
		addr = addr.Next()
	}
	if _, ok := a.lookup(first, now); ok {
		t.Error("the oldest address is still held past the bound")
	}
	if _, ok := a.lookup(addr.Prev(), now); !ok {
		t.Error("the newest address is not held")
	}
	if len(a.m) != maxAddrNames {
		t.Errorf("%d addresses held, want %d", len(a.m), maxAddrNames)
	}
}
