package dns

import (
	"context"
	"encoding/binary"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// fakeServer is a fake-ip Server whose upstream refuses connections.
func fakeServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	cfg.Mode = ModeFakeIP
	if cfg.Upstream == "" {
		cfg.Upstream = closedAddr(t)
	}
	return newServer(t, cfg)
}

func TestAnswerFake(t *testing.T) {
	s := fakeServer(t, Config{FakeTTL: 42 * time.Second})
	v4 := netip.MustParsePrefix("198.19.0.0/16")
	v6 := netip.MustParsePrefix("fd00:1919::/96")
	tests := []struct {
		name   string
		qname  string
		qtype  uint16
		edns   int
		tcp    bool
		prefix netip.Prefix
	}{
		{"A", "www.example.com", dns.TypeA, 0, false, v4},
		{"AAAA", "www.example.com", dns.TypeAAAA, 0, false, v6},
		{"A mixed case with EDNS", "WwW.ExAmPlE.CoM", dns.TypeA, 1232, false, v4},
		{"A over TCP", "tcp.example.com", dns.TypeA, 0, true, v4},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			q := query(t, uint16(0xbe00+i), tt.qname, tt.qtype, tt.edns)
			m := parse(t, q, s.Answer(t.Context(), q, tt.tcp))
			if m.Rcode != dns.RcodeSuccess || !m.RecursionDesired || !m.RecursionAvailable || m.Truncated {
				t.Fatalf("header: %v", m.MsgHdr)
			}
			if (m.IsEdns0() != nil) != (tt.edns > 0) {
				t.Errorf("OPT in reply %v, in query %v", m.IsEdns0() != nil, tt.edns > 0)
			}
			if len(m.Answer) != 1 {
				t.Fatalf("answers: %v", m.Answer)
			}
			h := m.Answer[0].Header()
			if h.Name != dns.Fqdn(tt.qname) || h.Rrtype != tt.qtype || h.Ttl != 42 {
				t.Errorf("answer header %v; want name %s, TTL 42", h, dns.Fqdn(tt.qname))
			}
			var ip net.IP
			switch rr := m.Answer[0].(type) {
			case *dns.A:
				ip = rr.A
			case *dns.AAAA:
				ip = rr.AAAA
			}
			addr, _ := netip.AddrFromSlice(ip)
			addr = addr.Unmap()
			if !tt.prefix.Contains(addr) {
				t.Fatalf("address %v outside %v", addr, tt.prefix)
			}
			if !s.IsFake(addr) {
				t.Errorf("IsFake(%v) = false", addr)
			}
			name, ok := s.Resolve(addr)
			if !ok || name != strings.ToLower(tt.qname) {
				t.Errorf("Resolve(%v) = %q, %v; want %q", addr, name, ok, strings.ToLower(tt.qname))
			}
			// Asked again, the same address.
			m2 := parse(t, q, s.Answer(t.Context(), q, tt.tcp))
			if m2.Answer[0].String() != m.Answer[0].String() {
				t.Errorf("second answer %v, first %v", m2.Answer[0], m.Answer[0])
			}
		})
	}
}

func TestAnswerFakeDefaults(t *testing.T) {
	s := fakeServer(t, Config{})
	q := query(t, 7, "a.test", dns.TypeA, 0)
	m := parse(t, q, s.Answer(t.Context(), q, false))
	if len(m.Answer) != 1 || m.Answer[0].Header().Ttl != 10 {
		t.Fatalf("answer %v, want one with TTL 10", m.Answer)
	}
	a := netip.MustParseAddr(m.Answer[0].(*dns.A).A.String())
	if a != netip.MustParseAddr("198.19.0.2") {
		t.Errorf("first fake address %v, want 198.19.0.2", a)
	}
}

func TestAnswerNoAddressesOfFamily(t *testing.T) {
	tests := []struct {
		name   string
		ranges []netip.Prefix
		qtype  uint16
	}{
		{"AAAA without v6 range", []netip.Prefix{netip.MustParsePrefix("198.19.0.0/24")}, dns.TypeAAAA},
		{"A without v4 range", []netip.Prefix{netip.MustParsePrefix("fd00::/120")}, dns.TypeA},
		{"HTTPS", nil, dns.TypeHTTPS},
		{"SVCB", nil, dns.TypeSVCB},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := fakeServer(t, Config{FakeRanges: tt.ranges})
			q := query(t, 99, "www.example.com", tt.qtype, 0)
			m := parse(t, q, s.Answer(t.Context(), q, false))
			if m.Rcode != dns.RcodeSuccess || len(m.Answer)+len(m.Ns)+len(m.Extra) != 0 {
				t.Errorf("reply %v; want empty NOERROR", m)
			}
		})
	}
}

func TestAnswerMalformed(t *testing.T) {
	s := fakeServer(t, Config{})
	twoQuestions := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	twoQuestions.Question = append(twoQuestions.Question, dns.Question{Name: "b.test.", Qtype: dns.TypeA, Qclass: dns.ClassINET})
	notify := new(dns.Msg).SetQuestion("a.test.", dns.TypeSOA)
	notify.Opcode = dns.OpcodeNotify
	badVers := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	badVers.SetEdns0(1232, false)
	badVers.IsEdns0().SetVersion(1)
	twoOPT := new(dns.Msg).SetQuestion("a.test.", dns.TypeA)
	twoOPT.SetEdns0(1232, false)
	twoOPT.Extra = append(twoOPT.Extra, twoOPT.Extra[0])
	axfr := new(dns.Msg).SetQuestion("a.test.", dns.TypeAXFR)
	packed := func(m *dns.Msg) []byte {
		m.Id = 0xabcd
		b, err := m.Pack()
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	tests := []struct {
		name  string
		query []byte
		rcode int // -1: no reply
	}{
		{"empty", nil, -1},
		{"short", []byte{0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0}, -1},
		{"response", append([]byte{0xab, 0xcd, 0x81, 0x80}, packed(new(dns.Msg).SetQuestion("a.test.", dns.TypeA))[4:]...), -1},
		{"question missing", []byte{0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}, dns.RcodeFormatError},
		{"garbage after header", append([]byte{0xab, 0xcd, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0}, 0xc0, 0xff, 0xff, 0x00, 0x55), dns.RcodeFormatError},
		{"no question", []byte{0xab, 0xcd, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0}, dns.RcodeFormatError},
		{"two questions", packed(twoQuestions), dns.RcodeFormatError},
		{"two OPT", packed(twoOPT), dns.RcodeFormatError},
		{"notify", packed(notify), dns.RcodeNotImplemented},
		{"EDNS version 1", packed(badVers), dns.RcodeBadVers},
		{"AXFR", packed(axfr), dns.RcodeRefused},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, tcp := range []bool{false, true} {
				r := s.Answer(t.Context(), tt.query, tcp)
				if tt.rcode < 0 {
					if r != nil {
						t.Fatalf("reply %x, want none", r)
					}
					continue
				}
				m := new(dns.Msg)
				if err := m.Unpack(r); err != nil {
					t.Fatalf("reply %x does not parse: %v", r, err)
				}
				if m.Id != 0xabcd || !m.Response || m.Rcode != tt.rcode {
					t.Errorf("reply id %#x response %v rcode %s; want id 0xabcd, rcode %s",
						m.Id, m.Response, dns.RcodeToString[m.Rcode], dns.RcodeToString[tt.rcode])
				}
			}
		})
	}
}

func TestAnswerOff(t *testing.T) {
	s := newServer(t, Config{})
	if s.Mode() != ModeOff {
		t.Errorf("zero Config gives mode %v", s.Mode())
	}
	q := query(t, 1, "a.test", dns.TypeA, 0)
	if r := s.Answer(t.Context(), q, false); r != nil {
		t.Errorf("off mode answered %x", r)
	}
	if s.IsFake(netip.MustParseAddr("198.19.0.2")) {
		t.Error("off mode has fake addresses")
	}
	if err := s.ServeStream(t.Context(), nil); err == nil {
		t.Error("off mode served a stream")
	}
	s.Hold(netip.MustParseAddr("198.19.0.2"))()
}

func TestAnswerAfterClose(t *testing.T) {
	s := fakeServer(t, Config{})
	s.Close()
	s.Close()
	q := query(t, 1, "a.test", dns.TypeA, 0)
	if r := s.Answer(t.Context(), q, false); r != nil {
		t.Errorf("answered after Close: %x", r)
	}
}

func TestDirectSuffixRealResolver(t *testing.T) {
	d := startDnsmasq(t, "--address=/corp.test/192.0.2.20", "--address=/corp.test/2001:db8::20")
	res := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var nd net.Dialer
			return nd.DialContext(ctx, network, d.addr)
		},
	}
	s := fakeServer(t, Config{DirectSuffixes: []string{".Corp.Test."}, DirectResolver: res})
	tests := []struct {
		qname string
		qtype uint16
		want  string // "" = empty NOERROR
	}{
		{"corp.test", dns.TypeA, "192.0.2.20"},
		{"Host.CORP.test", dns.TypeA, "192.0.2.20"},
		{"host.corp.test", dns.TypeAAAA, "2001:db8::20"},
		{"host.corp.test", dns.TypeMX, ""},
		{"host.corp.test", dns.TypeHTTPS, ""},
	}
	for _, tt := range tests {
		t.Run(tt.qname+"/"+dns.TypeToString[tt.qtype], func(t *testing.T) {
			q := query(t, 0x5151, tt.qname, tt.qtype, 0)
			m := parse(t, q, s.Answer(t.Context(), q, false))
			if m.Rcode != dns.RcodeSuccess {
				t.Fatalf("rcode %s", dns.RcodeToString[m.Rcode])
			}
			if tt.want == "" {
				if len(m.Answer) != 0 {
					t.Errorf("answers %v, want none", m.Answer)
				}
				return
			}
			if len(m.Answer) != 1 || !strings.HasSuffix(m.Answer[0].String(), "\t"+tt.want) {
				t.Errorf("answers %v, want %s", m.Answer, tt.want)
			}
		})
	}
	// Not a direct name: a fake answer, even though dnsmasq knows it.
	q := query(t, 1, "notcorp.test", dns.TypeA, 0)
	m := parse(t, q, s.Answer(t.Context(), q, false))
	if len(m.Answer) != 1 || !s.IsFake(netip.MustParseAddr(m.Answer[0].(*dns.A).A.String())) {
		t.Errorf("notcorp.test answered %v, want a fake address", m.Answer)
	}
}

func TestDirectResolverOutcomes(t *testing.T) {
	tests := []struct {
		name   string
		fail   error
		qname  string
		qtype  uint16
		rcode  int
		answer string
	}{
		{"localhost A", nil, "localhost", dns.TypeA, dns.RcodeSuccess, "127.0.0.1"},
		{"localhost AAAA", nil, "LocalHost.", dns.TypeAAAA, dns.RcodeSuccess, "::1"},
		{"under localhost", nil, "app.localhost", dns.TypeA, dns.RcodeSuccess, "127.0.0.2"},
		{"not found is NODATA", nil, "missing.lan", dns.TypeA, dns.RcodeSuccess, ""},
		{"resolver error is SERVFAIL", errBroken, "x.lan", dns.TypeA, dns.RcodeServerFailure, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := &mapResolver{fail: tt.fail, addrs: map[string][]netip.Addr{
				"localhost.":     {netip.MustParseAddr("127.0.0.1"), netip.MustParseAddr("::1")},
				"app.localhost.": {netip.MustParseAddr("127.0.0.2")},
			}}
			s := fakeServer(t, Config{DirectSuffixes: []string{"lan"}, DirectResolver: r})
			q := query(t, 3, tt.qname, tt.qtype, 0)
			m := parse(t, q, s.Answer(t.Context(), q, false))
			if m.Rcode != tt.rcode {
				t.Fatalf("rcode %s, want %s", dns.RcodeToString[m.Rcode], dns.RcodeToString[tt.rcode])
			}
			switch {
			case tt.answer == "" && len(m.Answer) != 0:
				t.Errorf("answers %v, want none", m.Answer)
			case tt.answer != "" && (len(m.Answer) != 1 || !strings.HasSuffix(m.Answer[0].String(), "\t"+tt.answer)):
				t.Errorf("answers %v, want %s", m.Answer, tt.answer)
			}
			if len(r.lookups) != 1 || !strings.HasSuffix(r.lookups[0], ".") {
				t.Errorf("lookups %q, want one of an absolute name", r.lookups)
			}
		})
	}
}

// setClock makes c the clock of s and of its pool.
func setClock(s *Server, c *clock) {
	s.now = c.Now
	if s.pool != nil {
		s.pool.now = c.Now
	}
}

// fakeA asks name's A record of s and returns the reply.
func fakeA(t *testing.T, s *Server, id uint16, name string) *dns.Msg {
	t.Helper()
	q := query(t, id, name, dns.TypeA, 0)
	return parse(t, q, s.Answer(t.Context(), q, false))
}

// answerAddr returns the one address of an A or AAAA reply.
func answerAddr(t *testing.T, m *dns.Msg) netip.Addr {
	t.Helper()
	if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 {
		t.Fatalf("rcode %s, answers %v; want one address", dns.RcodeToString[m.Rcode], m.Answer)
	}
	var ip net.IP
	switch rr := m.Answer[0].(type) {
	case *dns.A:
		ip = rr.A
	case *dns.AAAA:
		ip = rr.AAAA
	}
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		t.Fatalf("answer %v holds no address", m.Answer[0])
	}
	return a.Unmap()
}

func TestPoolExhaustedServfail(t *testing.T) {
	logs := new(logRecorder)
	s := fakeServer(t, Config{
		FakeRanges: []netip.Prefix{netip.MustParsePrefix("198.19.0.0/30")}, // one address
		Logger:     slog.New(logs),
	})
	c := newClock()
	setClock(s, c)
	addr := answerAddr(t, fakeA(t, s, 1, "held.test"))
	release := s.Hold(addr)
	c.Advance(defaultFakeTTL + fakeReuseMargin)
	for i := range 3 {
		m := fakeA(t, s, uint16(10+i), "other.test")
		if m.Rcode != dns.RcodeServerFailure {
			t.Fatalf("rcode %s with the only address held, want SERVFAIL", dns.RcodeToString[m.Rcode])
		}
	}
	if n := logs.count(slog.LevelWarn); n != 1 {
		t.Errorf("%d warnings for three exhausted queries, want 1 (rate-limited)", n)
	}
	if n := s.Stats().PoolExhausted; n != 3 {
		t.Errorf("PoolExhausted() = %d after three refused queries, want 3", n)
	}
	if name, ok := s.Resolve(addr); !ok || name != "held.test" {
		t.Errorf("held mapping now %q, %v", name, ok)
	}
	release()
	if m := fakeA(t, s, 20, "other.test"); m.Rcode != dns.RcodeServerFailure {
		t.Errorf("right after the flow ended: rcode %s, want SERVFAIL", dns.RcodeToString[m.Rcode])
	}
	c.Advance(defaultFakeTTL + fakeReuseMargin)
	if a := answerAddr(t, fakeA(t, s, 21, "other.test")); a != addr {
		t.Errorf("after release and the reuse horizon: %v, want %v recycled", a, addr)
	}
	if n := s.Stats().PoolExhausted; n != 4 {
		t.Errorf("PoolExhausted() = %d, want 4", n)
	}
}

// TestFakeReuseHorizon: an address goes to another name only once the TTL
// of the last answer naming it plus the margin has passed (issue 19: a
// client that cached alpha.test reached another name through the proxy).
// Until then the pool answers SERVFAIL, and the name asked earlier keeps
// its address.
func TestFakeReuseHorizon(t *testing.T) {
	const ttl = 42 * time.Second
	horizon := ttl + fakeReuseMargin
	tests := []struct {
		name  string
		qtype uint16
		rng   string
	}{
		{"A", dns.TypeA, "198.19.0.0/30"},         // one address
		{"AAAA", dns.TypeAAAA, "fd00:1919::/125"}, // six
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pfx := netip.MustParsePrefix(tt.rng)
			s := fakeServer(t, Config{FakeTTL: ttl, FakeRanges: []netip.Prefix{pfx}})
			c := newClock()
			setClock(s, c)
			ask := func(id uint16, name string) *dns.Msg {
				q := query(t, id, name, tt.qtype, 0)
				return parse(t, q, s.Answer(t.Context(), q, false))
			}
			m := ask(1, "alpha.test")
			if got := m.Answer[0].Header().Ttl; got != uint32(ttl/time.Second) {
				t.Fatalf("answer TTL %d, want %v", got, ttl)
			}
			first := answerAddr(t, m)
			if !pfx.Contains(first) {
				t.Fatalf("alpha.test got %v, outside %v", first, pfx)
			}
			var others []netip.Addr
			for i := 0; ; i++ { // the rest of the range
				m := ask(uint16(100+i), fmt.Sprintf("fill%d.test", i))
				if m.Rcode != dns.RcodeSuccess {
					break
				}
				others = append(others, answerAddr(t, m))
			}
			exhausted := s.Stats().PoolExhausted
			if exhausted != 1 {
				t.Fatalf("PoolExhausted() = %d once the range is full, want 1", exhausted)
			}
			c.Advance(horizon / 2)
			if a := answerAddr(t, ask(2, "alpha.test")); a != first {
				t.Fatalf("alpha.test asked again got %v, want its %v", a, first)
			}
			c.Advance(horizon - horizon/2 - time.Second)
			if m := ask(3, "beta.test"); m.Rcode != dns.RcodeServerFailure {
				t.Fatalf("a second before the horizon: %v, want SERVFAIL", m.Answer)
			}
			c.Advance(time.Second)
			// The fill names' answers have expired; alpha.test's, given
			// again, has not.
			for i := range others {
				if a := answerAddr(t, ask(uint16(200+i), fmt.Sprintf("new%d.test", i))); a == first {
					t.Fatalf("new%d.test got alpha.test's %v", i, a)
				}
			}
			if m := ask(4, "beta.test"); m.Rcode != dns.RcodeServerFailure {
				t.Fatalf("within alpha.test's refreshed horizon: %v, want SERVFAIL", m.Answer)
			}
			// Not Resolve here: a reverse lookup is a use, and would
			// refresh alpha.test's mapping.
			c.Advance(horizon / 2)
			if a := answerAddr(t, ask(5, "beta.test")); a != first {
				t.Errorf("beta.test after alpha.test's horizon got %v, want %v", a, first)
			}
			if name, _ := s.Resolve(first); name != "beta.test" {
				t.Errorf("Resolve(%v) = %q, want beta.test", first, name)
			}
			if n := s.Stats().PoolExhausted; n != exhausted+2 {
				t.Errorf("PoolExhausted() = %d, want %d", n, exhausted+2)
			}
		})
	}
}

func TestIsFakeUnmapped(t *testing.T) {
	s := fakeServer(t, Config{})
	for _, tt := range []struct {
		addr       string
		fake, name bool
	}{
		{"198.19.200.7", true, false},
		{"198.19.0.0", true, false},
		{"fd00:1919::99", true, false},
		{"198.18.0.1", false, false},
		{"192.0.2.1", false, false},
	} {
		a := netip.MustParseAddr(tt.addr)
		if got := s.IsFake(a); got != tt.fake {
			t.Errorf("IsFake(%v) = %v", a, got)
		}
		if _, ok := s.Resolve(a); ok != tt.name {
			t.Errorf("Resolve(%v) ok = %v", a, ok)
		}
	}
}

func TestNewErrors(t *testing.T) {
	up := "127.0.0.1:53"
	tests := []struct {
		name string
		cfg  Config
	}{
		{"unknown mode", Config{Mode: Mode(7), Upstream: up}},
		{"bad range", Config{Mode: ModeFakeIP, Upstream: up, FakeRanges: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/32")}}},
		{"negative ttl", Config{Mode: ModeFakeIP, Upstream: up, FakeTTL: -time.Second}},
		{"empty suffix", Config{Mode: ModeFakeIP, Upstream: up, DirectSuffixes: []string{"."}}},
		{"bad upstream", Config{Mode: ModeRemote, Upstream: "dns.example:"}},
		{"negative cache", Config{Mode: ModeRemote, Upstream: up, CacheSize: -1}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if s, err := New(tt.cfg); err == nil {
				s.Close()
				t.Errorf("New(%+v) succeeded", tt.cfg)
			}
		})
	}
}

func TestUpstreamAddr(t *testing.T) {
	dir := t.TempDir()
	conf := filepath.Join(dir, "resolv.conf")
	os.WriteFile(conf, []byte("search example\nnameserver 2001:db8::53\nnameserver 192.0.2.53\n"), 0o644)
	empty := filepath.Join(dir, "empty.conf")
	os.WriteFile(empty, []byte("search example\n"), 0o644)
	tests := []struct {
		in, conf, want string // want "" = error
	}{
		{"192.0.2.1:5353", conf, "192.0.2.1:5353"},
		{"192.0.2.1", conf, "192.0.2.1:53"},
		{"2001:db8::1", conf, "[2001:db8::1]:53"},
		{"[2001:db8::1]:853", conf, "[2001:db8::1]:853"},
		{"dns.example", conf, "dns.example:53"},
		{"dns.example:", conf, ""},
		{":53", conf, ""},
		{"", conf, "[2001:db8::53]:53"},
		{"", empty, ""},
		{"", filepath.Join(dir, "missing"), ""},
	}
	for _, tt := range tests {
		got, err := upstreamAddr(tt.in, tt.conf)
		if tt.want == "" && err == nil || tt.want != "" && got != tt.want {
			t.Errorf("upstreamAddr(%q, %s) = %q, %v; want %q", tt.in, filepath.Base(tt.conf), got, err, tt.want)
		}
	}
}

func TestParseMode(t *testing.T) {
	for _, m := range []Mode{ModeOff, ModeFakeIP, ModeRemote} {
		got, err := ParseMode(m.String())
		if err != nil || got != m {
			t.Errorf("ParseMode(%q) = %v, %v", m.String(), got, err)
		}
	}
	for _, s := range []string{"", "fakeip", "Remote", "on"} {
		if _, err := ParseMode(s); err == nil {
			t.Errorf("ParseMode(%q) succeeded", s)
		}
	}
}

func TestRawReply(t *testing.T) {
	// Opcode and RD are echoed, every count is zero.
	q := []byte{0x12, 0x34, 0x29, 0x10, 0, 1, 0, 0, 0, 0, 0, 0}
	r := rawReply(q, dns.RcodeFormatError)
	if binary.BigEndian.Uint16(r) != 0x1234 || r[2] != 0x80|0x28|0x01 || r[3] != 0x81 || len(r) != headerLen {
		t.Errorf("rawReply = %x", r)
	}
}

// Issue 17: the routing rules' verdict on a name alone shapes its answer:
// a rejected name gets an empty answer at once (no fake address handed
// out, nothing forwarded), a direct one its real addresses from a real
// resolver, any other its fake address.
func TestPolicyShapesAnswers(t *testing.T) {
	d := startDnsmasq(t, "--address=/direct.test/192.0.2.30", "--address=/blocked.test/192.0.2.31", "--address=/other.test/192.0.2.32")
	res := &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var nd net.Dialer
			return nd.DialContext(ctx, network, d.addr)
		},
	}
	policy := func(name string) NameAction {
		switch {
		case strings.HasSuffix(name, "blocked.test"):
			return NameReject
		case name == "direct.test":
			return NameDirect
		}
		return NameDefault
	}
	s := fakeServer(t, Config{DirectResolver: res, Policy: policy})
	for _, tt := range []struct {
		qname string
		want  string // "" = empty NOERROR; "fake" = inside the fake range
	}{
		{"ads.blocked.test", ""},
		{"direct.test", "192.0.2.30"},
		{"other.test", "fake"},
	} {
		q := query(t, 7, tt.qname, dns.TypeA, 0)
		m := parse(t, q, s.Answer(t.Context(), q, false))
		if m.Rcode != dns.RcodeSuccess {
			t.Fatalf("%s: rcode %s", tt.qname, dns.RcodeToString[m.Rcode])
		}
		switch tt.want {
		case "":
			if len(m.Answer) != 0 {
				t.Errorf("%s: answers %v, want none", tt.qname, m.Answer)
			}
		case "fake":
			if len(m.Answer) != 1 || !strings.Contains(m.Answer[0].String(), "\t198.19.") {
				t.Errorf("%s: answers %v, want a fake address", tt.qname, m.Answer)
			}
		default:
			if len(m.Answer) != 1 || !strings.HasSuffix(m.Answer[0].String(), "\t"+tt.want) {
				t.Errorf("%s: answers %v, want %s", tt.qname, m.Answer, tt.want)
			}
		}
	}
	if st := s.Stats(); st.Rejected != 1 || st.Direct != 1 || st.Fake != 1 {
		t.Fatalf("stats %+v, want one of each", st)
	}
}
