package dns

import (
	"errors"
	"fmt"
	"net/netip"
	"testing"
	"time"
)

// testReuse is the reuse horizon of the pools under test: the default TTL
// plus the margin.
const testReuse = defaultFakeTTL + fakeReuseMargin

// mustPool builds a pool over prefixes whose clock is c.
func mustPool(t *testing.T, c *clock, prefixes ...string) *pool {
	t.Helper()
	var pfx []netip.Prefix
	for _, s := range prefixes {
		pfx = append(pfx, netip.MustParsePrefix(s))
	}
	p, err := newPool(pfx, testReuse)
	if err != nil {
		t.Fatal(err)
	}
	p.now = c.Now
	return p
}

func mustLookup(t *testing.T, p *pool, name string, v6 bool) netip.Addr {
	t.Helper()
	a, err := p.lookup(name, v6)
	if err != nil {
		t.Fatalf("lookup %q: %v", name, err)
	}
	return a
}

// wantExhausted fails unless a lookup of name finds no address to give.
func wantExhausted(t *testing.T, p *pool, name string, v6 bool) {
	t.Helper()
	if a, err := p.lookup(name, v6); !errors.Is(err, errPoolExhausted) {
		t.Fatalf("lookup %q = %v, %v; want errPoolExhausted", name, a, err)
	}
}

// fill maps n names "nameI.test" and returns their addresses.
func fill(t *testing.T, p *pool, n int) []netip.Addr {
	t.Helper()
	var addrs []netip.Addr
	for i := range n {
		addrs = append(addrs, mustLookup(t, p, fmt.Sprintf("name%d.test", i), false))
	}
	return addrs
}

func TestPool(t *testing.T) {
	// 10.0.0.0/29 has 8 addresses: .0 (network), .1 (gateway) and .7
	// (broadcast) are skipped, leaving 5.
	const v4, v6, usable = "10.0.0.0/29", "fd00::/125", 5
	tests := []struct {
		name string
		run  func(t *testing.T, p *pool, c *clock)
	}{
		{"allocation skips network gateway broadcast", func(t *testing.T, p *pool, c *clock) {
			got := fill(t, p, usable)
			for i, a := range got {
				if want := netip.AddrFrom4([4]byte{10, 0, 0, byte(2 + i)}); a != want {
					t.Errorf("address %d = %v, want %v", i, a, want)
				}
			}
		}},
		{"stability", func(t *testing.T, p *pool, c *clock) {
			a := mustLookup(t, p, "a.test", false)
			fill(t, p, usable-1)
			c.Advance(10 * testReuse)
			if b := mustLookup(t, p, "a.test", false); b != a {
				t.Errorf("a.test moved from %v to %v", a, b)
			}
		}},
		{"names normalised", func(t *testing.T, p *pool, c *clock) {
			a := mustLookup(t, p, normaliseName("WWW.Example.COM."), false)
			if b := mustLookup(t, p, normaliseName("www.example.com"), false); b != a {
				t.Errorf("same name, two addresses: %v and %v", a, b)
			}
			if n, ok := p.name(a); !ok || n != "www.example.com" {
				t.Errorf("name(%v) = %q, %v; want www.example.com", a, n, ok)
			}
		}},
		{"v4 and v6 separate", func(t *testing.T, p *pool, c *clock) {
			a4 := mustLookup(t, p, "a.test", false)
			a6 := mustLookup(t, p, "a.test", true)
			if !a4.Is4() || !netip.MustParsePrefix(v4).Contains(a4) {
				t.Errorf("A address %v outside %s", a4, v4)
			}
			if !a6.Is6() || !netip.MustParsePrefix(v6).Contains(a6) {
				t.Errorf("AAAA address %v outside %s", a6, v6)
			}
			for _, a := range []netip.Addr{a4, a6} {
				if n, ok := p.name(a); !ok || n != "a.test" {
					t.Errorf("name(%v) = %q, %v", a, n, ok)
				}
			}
			if n4, n6 := p.mappings(); n4 != 1 || n6 != 1 {
				t.Errorf("mappings = %d, %d; want 1, 1", n4, n6)
			}
		}},
		{"issue 19: not recycled while an answer may be cached", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			wantExhausted(t, p, "new.test", false)
			c.Advance(testReuse - time.Nanosecond)
			wantExhausted(t, p, "new.test", false)
			for i, a := range addrs {
				if n, ok := p.name(a); !ok || n != fmt.Sprintf("name%d.test", i) {
					t.Fatalf("after the refused lookups %v names %q, %v", a, n, ok)
				}
			}
		}},
		{"recycled once the horizon has passed", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			c.Advance(testReuse)
			if got := mustLookup(t, p, "new.test", false); got != addrs[0] {
				t.Errorf("new.test got %v, want the least recent %v", got, addrs[0])
			}
			if n, _ := p.name(addrs[0]); n != "new.test" {
				t.Errorf("name(%v) = %q, want new.test", addrs[0], n)
			}
			if b := mustLookup(t, p, "name0.test", false); b == addrs[0] {
				t.Error("name0 kept its address after it was recycled")
			}
		}},
		{"re-asking refreshes", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			c.Advance(testReuse / 2)
			if a := mustLookup(t, p, "name0.test", false); a != addrs[0] {
				t.Fatalf("name0 asked again got %v, want its %v", a, addrs[0])
			}
			c.Advance(testReuse - testReuse/2) // the others' horizon
			for i := 1; i < usable; i++ {
				if got := mustLookup(t, p, fmt.Sprintf("new%d.test", i), false); got != addrs[i] {
					t.Errorf("new%d.test got %v, want name%d's %v", i, got, i, addrs[i])
				}
			}
			wantExhausted(t, p, "last.test", false) // name0 was answered later
			c.Advance(testReuse / 2)
			if got := mustLookup(t, p, "last.test", false); got != addrs[0] {
				t.Errorf("last.test got %v, want name0's %v", got, addrs[0])
			}
		}},
		{"recycled in order of last use", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			mustLookup(t, p, "name0.test", false) // name1 is now the least recent
			c.Advance(testReuse)
			if got := mustLookup(t, p, "new.test", false); got != addrs[1] {
				t.Errorf("new.test got %v, want name1's %v", got, addrs[1])
			}
			if _, ok := p.name(addrs[0]); !ok {
				t.Error("name0 lost although recently used")
			}
		}},
		{"reverse lookup counts as use", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			c.Advance(time.Second)
			p.name(addrs[0])
			c.Advance(testReuse - time.Second)
			for i := 1; i < usable; i++ {
				if got := mustLookup(t, p, fmt.Sprintf("new%d.test", i), false); got != addrs[i] {
					t.Errorf("new%d.test got %v, want %v", i, got, addrs[i])
				}
			}
			wantExhausted(t, p, "last.test", false)
		}},
		{"held never recycled", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			release := p.hold(addrs[0])
			defer release()
			for i := range 3 * usable {
				c.Advance(testReuse)
				a := mustLookup(t, p, fmt.Sprintf("churn%d.test", i), false)
				if a == addrs[0] {
					t.Fatalf("held address %v reassigned", a)
				}
			}
			if n, ok := p.name(addrs[0]); !ok || n != "name0.test" {
				t.Errorf("held mapping now %q, %v", n, ok)
			}
		}},
		{"exhausted when all held, reuse after release and horizon", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			var releases []func()
			for _, a := range addrs {
				releases = append(releases, p.hold(a))
			}
			c.Advance(testReuse)
			wantExhausted(t, p, "more.test", false)
			if a := mustLookup(t, p, "name3.test", false); a != addrs[3] {
				t.Errorf("held name3 moved to %v", a)
			}
			// The flow has just ended: its client may come back to the
			// address for as long as an answer would be cached.
			releases[2]()
			wantExhausted(t, p, "more.test", false)
			c.Advance(testReuse)
			if a := mustLookup(t, p, "more.test", false); a != addrs[2] {
				t.Errorf("more.test got %v, want the released %v", a, addrs[2])
			}
			for _, r := range releases {
				r()
			}
		}},
		{"holds nest and release is idempotent", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			r1 := p.hold(addrs[0])
			r2 := p.hold(addrs[0])
			r1()
			r1() // counts once
			for i := range usable {
				c.Advance(testReuse)
				if a := mustLookup(t, p, fmt.Sprintf("x%d.test", i), false); a == addrs[0] {
					t.Fatal("address recycled while a hold remains")
				}
			}
			r2()
			if n4, _ := p.mappings(); n4 != usable {
				t.Errorf("mappings = %d, want %d", n4, usable)
			}
		}},
		{"released, then asked again", func(t *testing.T, p *pool, c *clock) {
			addrs := fill(t, p, usable)
			release := p.hold(addrs[0])
			c.Advance(testReuse)
			release()
			c.Advance(testReuse - time.Second)
			mustLookup(t, p, "name0.test", false) // asked again while no flow holds it
			c.Advance(time.Second)
			for i := 1; i < usable; i++ {
				mustLookup(t, p, fmt.Sprintf("new%d.test", i), false)
			}
			wantExhausted(t, p, "last.test", false)
		}},
		{"A and AAAA answers are separate", func(t *testing.T, p *pool, c *clock) {
			a4 := mustLookup(t, p, "a.test", false)
			a6 := mustLookup(t, p, "a.test", true)
			fill(t, p, usable-1)
			c.Advance(testReuse - time.Second)
			// An AAAA answer names the IPv6 address only: the A answer
			// given before still expires on time.
			if b := mustLookup(t, p, "a.test", true); b != a6 {
				t.Fatalf("AAAA moved from %v to %v", a6, b)
			}
			c.Advance(time.Second)
			if got := mustLookup(t, p, "new.test", false); got != a4 {
				t.Errorf("new.test got %v, want a.test's expired %v", got, a4)
			}
			if n, ok := p.name(a6); !ok || n != "a.test" {
				t.Errorf("name(%v) = %q, %v; want a.test", a6, n, ok)
			}
		}},
		{"hold of unmapped or foreign address is a no-op", func(t *testing.T, p *pool, c *clock) {
			p.hold(netip.MustParseAddr("10.0.0.4"))()
			p.hold(netip.MustParseAddr("192.0.2.1"))()
			if _, ok := p.name(netip.MustParseAddr("10.0.0.4")); ok {
				t.Error("unmapped address has a name")
			}
			fill(t, p, usable) // still allocates every address
		}},
		{"v4-mapped v6 address found", func(t *testing.T, p *pool, c *clock) {
			a := mustLookup(t, p, "a.test", false)
			mapped := netip.AddrFrom16(a.As16())
			if n, ok := p.name(mapped); !ok || n != "a.test" {
				t.Errorf("name(%v) = %q, %v", mapped, n, ok)
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			tt.run(t, mustPool(t, c, v4, v6), c)
		})
	}
}

func TestPoolBounded(t *testing.T) {
	// 10,000 names through a /28 (13 usable addresses) and a /124, with
	// time moving on so that addresses are recycled: the maps never
	// outgrow the ranges, and the most recent names resolve.
	c := newClock()
	p := mustPool(t, c, "198.19.0.0/28", "fd00:1919::/124")
	const names = 10_000
	for i := range names {
		c.Advance(testReuse / 12)
		name := fmt.Sprintf("host%d.example", i)
		mustLookup(t, p, name, false)
		mustLookup(t, p, name, true)
		if n4, n6 := p.mappings(); n4 > 16 || n6 > 16 {
			t.Fatalf("after %d names: %d and %d mappings, more than the range", i+1, n4, n6)
		}
	}
	if n4, n6 := p.mappings(); n4 != 13 || n6 != 14 {
		t.Errorf("mappings = %d, %d; want 13, 14", n4, n6)
	}
	if len(p.v4.byAddr) != 13 || len(p.v6.byAddr) != 14 {
		t.Errorf("address maps hold %d and %d", len(p.v4.byAddr), len(p.v6.byAddr))
	}
	for i := names - 13; i < names; i++ {
		name := fmt.Sprintf("host%d.example", i)
		a, _ := p.lookup(name, false)
		if n, ok := p.name(a); !ok || n != name {
			t.Errorf("recent name %s lost", name)
		}
	}
}

func TestPoolLargeV6(t *testing.T) {
	p := mustPool(t, newClock(), "fd00:1919::/96")
	if p.v6.size != maxPoolAddrs {
		t.Errorf("size of a /96 = %d, want the cap %d", p.v6.size, maxPoolAddrs)
	}
	if got, want := p.v6.addrAt(firstOffset+maxPoolAddrs-1), netip.MustParseAddr("fd00:1919::1:1"); got != want {
		t.Errorf("last address = %v, want %v", got, want)
	}
	if p.v4 != nil {
		t.Error("IPv4 range without an IPv4 prefix")
	}
}

func TestNewPoolErrors(t *testing.T) {
	tests := []struct {
		name     string
		prefixes []netip.Prefix
	}{
		{"v4 /31 too small", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/31")}},
		{"v6 /127 too small", []netip.Prefix{netip.MustParsePrefix("fd00::/127")}},
		{"two v4", []netip.Prefix{netip.MustParsePrefix("10.0.0.0/24"), netip.MustParsePrefix("10.1.0.0/24")}},
		{"two v6", []netip.Prefix{netip.MustParsePrefix("fd00::/64"), netip.MustParsePrefix("fd01::/64")}},
		{"invalid", []netip.Prefix{{}}},
		{"4in6", []netip.Prefix{netip.MustParsePrefix("::ffff:10.0.0.0/120")}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := newPool(tt.prefixes, testReuse); err == nil {
				t.Errorf("newPool(%v) succeeded", tt.prefixes)
			}
		})
	}
	// The smallest ranges work: one address each.
	p, err := newPool([]netip.Prefix{netip.MustParsePrefix("10.0.0.4/30"), netip.MustParsePrefix("fd00::/126")}, testReuse)
	if err != nil {
		t.Fatal(err)
	}
	if p.v4.size != 1 || p.v6.size != 2 {
		t.Errorf("sizes %d, %d; want 1, 2", p.v4.size, p.v6.size)
	}
}

func TestNormaliseName(t *testing.T) {
	for in, want := range map[string]string{
		"Example.COM.": "example.com",
		"example.com":  "example.com",
		".":            "",
		`A\066c.`:      `a\066c`, // escapes kept as they are
		"ÄB.":          "Äb",     // only ASCII folds
	} {
		if got := normaliseName(in); got != want {
			t.Errorf("normaliseName(%q) = %q, want %q", in, got, want)
		}
	}
}
