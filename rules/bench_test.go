package rules

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"testing"
)

// benchRules is a rule set of n mixed rules: v4 prefixes of 10.0.0.0/8
// (lengths 12 to 32), v6 prefixes of 2001:db8::/32 (lengths 33 to 128),
// exact names, suffixes, and a few port rules. Flows to 198.18.0.0/15 and
// names under .invalid match none of them. It returns the texts, and for
// each rule a flow that matches it when the rules before it do not.
func benchRules(n int) ([]string, []*Flow) {
	r := rand.New(rand.NewPCG(1, 2))
	texts := make([]string, n)
	flows := make([]*Flow, n)
	none := netip.MustParseAddr("198.18.0.1")
	for i := range texts {
		f := &Flow{Proto: TCP, Dst: netip.AddrPortFrom(none, 443)}
		switch k := r.IntN(100); {
		case k < 40:
			bits := 12 + r.IntN(21)
			a := netip.AddrFrom4([4]byte{10, byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))})
			p := netip.PrefixFrom(a, bits).Masked()
			texts[i] = fmt.Sprintf("cidr:%s=proxy:a", p)
			f.Dst = netip.AddrPortFrom(a, 443)
		case k < 60:
			var b [16]byte
			b[0], b[1], b[2], b[3] = 0x20, 0x01, 0x0d, 0xb8
			for j := 4; j < 16; j++ {
				b[j] = byte(r.IntN(256))
			}
			a := netip.AddrFrom16(b)
			p := netip.PrefixFrom(a, 33+r.IntN(96)).Masked()
			texts[i] = fmt.Sprintf("cidr:%s=direct", p)
			f.Dst = netip.AddrPortFrom(a, 443)
		case k < 80:
			name := fmt.Sprintf("host%d.site%d.com", i, r.IntN(5000))
			texts[i] = "domain:" + name + "=reject"
			f.Name = name
		case k < 99:
			name := fmt.Sprintf("site%d.net", i)
			texts[i] = "suffix:" + name + "=proxy"
			f.Name = "www.cdn." + name
		default:
			port := 1 + r.IntN(1024)
			texts[i] = fmt.Sprintf("port:%d,net:udp=drop", port)
			f.Proto, f.Dst = UDP, netip.AddrPortFrom(none, uint16(port))
		}
		flows[i] = f
	}
	return texts, flows
}

func benchSet(b *testing.B, n int) (*Set, []*Flow) {
	b.Helper()
	texts, flows := benchRules(n)
	rs, err := ParseAll(texts)
	if err != nil {
		b.Fatal(err)
	}
	s, err := Compile(rs, Options{})
	if err != nil {
		b.Fatal(err)
	}
	return s, flows
}

// BenchmarkMatch matches flows against 100,000 rules: flows whose rule is
// among the first 1,000, among the last 1,000, and flows no rule matches
// (with a name and without). Each sub-benchmark cycles through 1,000
// different flows, so that one trie path does not stay in cache.
func BenchmarkMatch(b *testing.B) {
	const n = 100_000
	s, flows := benchSet(b, n)
	check := func(fs []*Flow, want func(i int) bool) []*Flow {
		for _, f := range fs {
			if i, _ := s.Match(f); !want(i) {
				b.Fatalf("flow %+v matched rule %d", f, i+1)
			}
		}
		return fs
	}
	r := rand.New(rand.NewPCG(3, 4))
	var noName, withName []*Flow
	for range 1000 {
		a := netip.AddrFrom4([4]byte{198, 18 + byte(r.IntN(2)), byte(r.IntN(256)), byte(r.IntN(256))})
		noName = append(noName, &Flow{Proto: TCP, Dst: netip.AddrPortFrom(a, 2000+uint16(r.IntN(1000)))})
		withName = append(withName, &Flow{Proto: TCP, Dst: netip.AddrPortFrom(a, 443),
			Name: fmt.Sprintf("www.host%d.site%d.example.invalid", r.IntN(n), r.IntN(5000))})
	}
	for _, bc := range []struct {
		name  string
		flows []*Flow
	}{
		{"early", check(flows[:1000], func(i int) bool { return i >= 0 && i < 1000 })},
		{"late", check(flows[n-1000:], func(i int) bool { return i >= 0 })},
		{"none", check(noName, func(i int) bool { return i < 0 })},
		{"none-name", check(withName, func(i int) bool { return i < 0 })},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				s.Match(bc.flows[i%len(bc.flows)])
				i++
			}
		})
	}
	b.Run("needs-name", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			s.NeedsName(noName[i%len(noName)])
			i++
		}
	})
	var named []string
	for _, f := range flows[n/2:] {
		if f.Name != "" && len(named) < 1000 {
			named = append(named, f.Name)
		}
	}
	b.Run("match-name", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			s.MatchName(named[i%len(named)])
			i++
		}
	})
}

// BenchmarkCompile parses and compiles 100,000 rules, as a reload does.
func BenchmarkCompile(b *testing.B) {
	texts, _ := benchRules(100_000)
	b.ReportAllocs()
	for b.Loop() {
		rs, err := ParseAll(texts)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := Compile(rs, Options{}); err != nil {
			b.Fatal(err)
		}
	}
}
