package dns

import (
	"context"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fuzzSeeds are queries of the kinds the stack hands over.
func fuzzSeeds(t testing.TB) [][]byte {
	seeds := [][]byte{
		query(t, 0x0101, "www.example.com", dns.TypeA, 0),
		query(t, 0x0202, "WWW.Example.COM", dns.TypeAAAA, 1232),
		query(t, 0x0303, "example.com", dns.TypeTXT, 4096),
		query(t, 0x0404, "example.com", dns.TypeHTTPS, 512),
		query(t, 0x0505, "localhost", dns.TypeA, 0),
		query(t, 0x0606, "printer.lan", dns.TypeAAAA, 0),
		query(t, 0x0707, ".", dns.TypeA, 0),
		query(t, 0x0808, `a\032b.example`, dns.TypeA, 0),
		{0x09, 0x09, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0},
		{0x0a, 0x0a, 1, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0xc0, 0x0c, 0, 1, 0, 1},
		{0x0b},
	}
	ch := new(dns.Msg).SetQuestion("version.bind.", dns.TypeTXT)
	ch.Question[0].Qclass = dns.ClassCHAOS
	badVers := new(dns.Msg).SetQuestion("a.example.", dns.TypeA)
	badVers.SetEdns0(1232, true)
	badVers.IsEdns0().SetVersion(2)
	for _, m := range []*dns.Msg{ch, badVers} {
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		seeds = append(seeds, b)
	}
	return seeds
}

// FuzzAnswer feeds raw bytes to Answer in fake-ip mode, over small ranges
// and a clock that moves on by fuzzStep a query so that recycling runs,
// with an upstream that refuses connections. Properties: no panic; no reply
// below 12 bytes or to a response; else a reply that parses, with the
// query's ID, its question when it had one, an UDP size within max(512,
// EDNS size), and no real address outside the direct names; a fake address
// maps back to the name it was answered for, and is never answered for
// another name while an earlier answer naming it may still be cached.
func FuzzAnswer(f *testing.F) {
	for _, seed := range fuzzSeeds(f) {
		f.Add(seed, false)
		f.Add(seed, true)
	}
	s := fakeServer(f, Config{
		FakeRanges: []netip.Prefix{
			netip.MustParsePrefix("198.19.0.0/28"),
			netip.MustParsePrefix("fd00:1919::/124"),
		},
		DirectSuffixes: []string{"lan"},
		DirectResolver: &mapResolver{addrs: map[string][]netip.Addr{
			"localhost.":   {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
			"printer.lan.": {netip.MustParseAddr("192.168.1.9")},
		}},
		Logger: debugLogger(),
	})
	c := newClock()
	setClock(s, c)
	horizon := defaultFakeTTL + fakeReuseMargin
	type answered struct {
		name string
		at   time.Time
	}
	last := make(map[netip.Addr]answered) // each fake address's last answer
	f.Fuzz(func(t *testing.T, q []byte, overTCP bool) {
		c.Advance(fuzzStep)
		r := s.Answer(context.Background(), q, overTCP)
		if len(q) < headerLen || q[2]&0x80 != 0 {
			if r != nil {
				t.Fatalf("reply %x to a short message or a response", r)
			}
			return
		}
		if r == nil {
			t.Fatal("no reply to a query")
		}
		m := new(dns.Msg)
		if err := m.Unpack(r); err != nil {
			t.Fatalf("reply %x does not parse: %v", r, err)
		}
		if !m.Response || m.Id != binary.BigEndian.Uint16(q) {
			t.Fatalf("reply id %#x response %v; query id %#x", m.Id, m.Response, binary.BigEndian.Uint16(q))
		}
		limit := dns.MinMsgSize
		req := new(dns.Msg)
		if err := req.Unpack(q); err != nil {
			if m.Rcode != dns.RcodeFormatError {
				t.Fatalf("rcode %s for a query that does not parse", dns.RcodeToString[m.Rcode])
			}
		} else {
			if opt := req.IsEdns0(); opt != nil {
				limit = max(limit, int(opt.UDPSize()))
			}
			if len(req.Question) > 0 && (len(m.Question) != 1 || m.Question[0] != req.Question[0]) {
				t.Fatalf("reply question %v, query question %v", m.Question, req.Question)
			}
		}
		if !overTCP && len(r) > limit {
			t.Fatalf("UDP reply of %d bytes, limit %d", len(r), limit)
		}
		for _, rr := range m.Answer {
			var a netip.Addr
			switch rr := rr.(type) {
			case *dns.A:
				a, _ = netip.AddrFromSlice(rr.A)
			case *dns.AAAA:
				a, _ = netip.AddrFromSlice(rr.AAAA)
			default:
				continue
			}
			a = a.Unmap()
			name := normaliseName(rr.Header().Name)
			if s.isDirect(name) {
				continue
			}
			if !s.IsFake(a) {
				t.Fatalf("real address %v for %s", a, name)
			}
			if got, ok := s.Resolve(a); !ok || got != name {
				t.Fatalf("fake address %v answered for %q maps back to %q, %v", a, name, got, ok)
			}
			now := c.Now()
			if prev, ok := last[a]; ok && prev.name != name && now.Sub(prev.at) < horizon {
				t.Fatalf("fake address %v answered for %q %v after it was answered for %q", a, name, now.Sub(prev.at), prev.name)
			}
			last[a] = answered{name, now}
		}
	})
}

// fuzzStep is how far FuzzAnswer's clock moves per query: with 13 IPv4
// addresses, a range refills in about one reuse horizon.
const fuzzStep = 5 * time.Second
