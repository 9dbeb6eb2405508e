package dns

import (
	"context"
	"encoding/binary"
	"net/netip"
	"testing"

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
// so that recycling runs, with an upstream that refuses connections.
// Properties: no panic; no reply below 12 bytes or to a response; else a
// reply that parses, with the query's ID, its question when it had one, an
// UDP size within max(512, EDNS size), and no real address outside the
// direct names.
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
	f.Fuzz(func(t *testing.T, q []byte, overTCP bool) {
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
			if name := normaliseName(rr.Header().Name); !s.isDirect(name) && !s.IsFake(a.Unmap()) {
				t.Fatalf("real address %v for %s", a, name)
			}
		}
	})
}
