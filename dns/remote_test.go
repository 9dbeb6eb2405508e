package dns

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// txtArgs returns a dnsmasq TXT record for name of n strings of 200 bytes.
func txtArgs(name string, n int) string {
	parts := []string{name}
	for range n {
		parts = append(parts, strings.Repeat("x", 200))
	}
	return "--txt-record=" + strings.Join(parts, ",")
}

// startRecursive runs dnsmasq with local data, as a recursive resolver
// would answer: positive answers with TTL 300 and NXDOMAIN without SOA.
func startRecursive(t *testing.T) *dnsmasq {
	return startDnsmasq(t,
		"--local-ttl=300",
		"--address=/example.test/192.0.2.10",
		"--host-record=h.test,192.0.2.20,120",
		"--address=/nx.test/", // NXDOMAIN, no SOA
		txtArgs("big.test", 8),
		txtArgs("medium.test", 4),
	)
}

func remoteServer(t *testing.T, upstream string, dialer Dialer) (*Server, *clock) {
	t.Helper()
	s := newServer(t, Config{Mode: ModeRemote, Upstream: upstream, Dialer: dialer, Logger: debugLogger()})
	c := newClock()
	s.now = c.Now
	return s, c
}

func TestRemote(t *testing.T) {
	d := startRecursive(t)
	dialer := new(countingDialer)
	s, _ := remoteServer(t, d.addr, dialer)
	tests := []struct {
		qname  string
		qtype  uint16
		rcode  int
		answer string
	}{
		{"example.test", dns.TypeA, dns.RcodeSuccess, "example.test.\t300\tIN\tA\t192.0.2.10"},
		{"WWW.Example.Test", dns.TypeA, dns.RcodeSuccess, "WWW.Example.Test.\t300\tIN\tA\t192.0.2.10"},
		{"h.test", dns.TypeA, dns.RcodeSuccess, "h.test.\t120\tIN\tA\t192.0.2.20"},
		{"a.nx.test", dns.TypeA, dns.RcodeNameError, ""},
		{"EXAMPLE.test", dns.TypeA, dns.RcodeSuccess, "example.test.\t300\tIN\tA\t192.0.2.10"}, // cached
	}
	for i, tt := range tests {
		t.Run(tt.qname, func(t *testing.T) {
			q := query(t, uint16(0x4000+i), tt.qname, tt.qtype, 0)
			m := parse(t, q, s.Answer(t.Context(), q, false))
			if m.Rcode != tt.rcode || m.Authoritative || !m.RecursionAvailable {
				t.Fatalf("header %v", m.MsgHdr)
			}
			var got string
			if len(m.Answer) > 0 {
				got = m.Answer[0].String()
			}
			if !strings.EqualFold(got, tt.answer) || len(m.Answer) > 1 {
				t.Errorf("answer %v, want %q", m.Answer, tt.answer)
			}
		})
	}
	if n := dialer.count(); n != len(tests)-1 { // EXAMPLE.test came from the cache
		t.Errorf("%d dials, want %d", n, len(tests)-1)
	}
	for _, dial := range dialer.dials {
		if dial != "tcp "+d.addr {
			t.Errorf("dialed %q, want only tcp %s", dial, d.addr)
		}
	}
}

func TestRemoteCache(t *testing.T) {
	d := startRecursive(t)
	s, clk := remoteServer(t, d.addr, nil)
	q := query(t, 1, "example.test", dns.TypeA, 0)
	if m := parse(t, q, s.Answer(t.Context(), q, false)); len(m.Answer) != 1 {
		t.Fatalf("first answer %v", m)
	}
	d.stop()

	tests := []struct {
		advance time.Duration
		ttl     uint32 // 0: expired, SERVFAIL with the upstream gone
	}{
		{0, 300},
		{100*time.Second + 500*time.Millisecond, 200},
		{199 * time.Second, 1},
		{time.Second, 0},
	}
	for i, tt := range tests {
		clk.Advance(tt.advance)
		q := query(t, uint16(100+i), "Example.TEST", dns.TypeA, 1232)
		m := parse(t, q, s.Answer(t.Context(), q, false))
		if tt.ttl == 0 {
			if m.Rcode != dns.RcodeServerFailure {
				t.Errorf("step %d: rcode %s after the TTL, want SERVFAIL", i, dns.RcodeToString[m.Rcode])
			}
			continue
		}
		if m.Rcode != dns.RcodeSuccess || len(m.Answer) != 1 || m.Answer[0].Header().Ttl != tt.ttl {
			t.Fatalf("step %d: %v; want the cached answer with TTL %d", i, m, tt.ttl)
		}
		if m.IsEdns0() == nil {
			t.Errorf("step %d: no OPT in the reply to an EDNS query", i)
		}
	}
}

func TestRemoteNegativeCache(t *testing.T) {
	// An authoritative dnsmasq answers NXDOMAIN and NODATA with an SOA
	// whose TTL and MINIMUM are 600s: cached, but only for 60s.
	d := startDnsmasq(t,
		"--auth-zone=neg.test", "--auth-server=ns.neg.test,127.0.0.1", "--auth-ttl=600",
		"--host-record=www.neg.test,192.0.2.30",
	)
	s, clk := remoteServer(t, d.addr, nil)
	queries := []struct {
		qname string
		qtype uint16
		rcode int
	}{
		{"nope.neg.test", dns.TypeA, dns.RcodeNameError},
		{"www.neg.test", dns.TypeAAAA, dns.RcodeSuccess}, // NODATA
	}
	check := func(step string, wantCached bool) {
		t.Helper()
		for i, tt := range queries {
			q := query(t, uint16(i+1), tt.qname, tt.qtype, 0)
			m := parse(t, q, s.Answer(t.Context(), q, false))
			switch {
			case !wantCached && m.Rcode != dns.RcodeServerFailure:
				t.Errorf("%s: %s %s: rcode %s, want SERVFAIL (expired, upstream gone)", step, tt.qname,
					dns.TypeToString[tt.qtype], dns.RcodeToString[m.Rcode])
			case wantCached && (m.Rcode != tt.rcode || len(m.Answer) != 0 || findSOA(m.Ns) == nil):
				t.Errorf("%s: %s %s: %v; want rcode %s with the SOA", step, tt.qname,
					dns.TypeToString[tt.qtype], m, dns.RcodeToString[tt.rcode])
			}
		}
	}
	check("fresh", true)
	d.stop()
	check("upstream gone", true)
	clk.Advance(59 * time.Second)
	check("59s later", true)
	clk.Advance(time.Second)
	check("60s later", false)
}

func TestRemoteNegativeWithoutSOANotCached(t *testing.T) {
	d := startRecursive(t)
	s, _ := remoteServer(t, d.addr, nil)
	q := query(t, 1, "a.nx.test", dns.TypeA, 0)
	if m := parse(t, q, s.Answer(t.Context(), q, false)); m.Rcode != dns.RcodeNameError {
		t.Fatalf("rcode %s, want NXDOMAIN", dns.RcodeToString[m.Rcode])
	}
	d.stop()
	if m := parse(t, q, s.Answer(t.Context(), q, false)); m.Rcode != dns.RcodeServerFailure {
		t.Errorf("rcode %s, want SERVFAIL: NXDOMAIN without SOA is not cached", dns.RcodeToString[m.Rcode])
	}
}

func TestRemoteTruncation(t *testing.T) {
	d := startRecursive(t)
	// The TXT types are forwarded in fake-ip mode too: test both modes.
	for _, mode := range []Mode{ModeRemote, ModeFakeIP} {
		s := newServer(t, Config{Mode: mode, Upstream: d.addr})
		tests := []struct {
			name    string
			qname   string
			edns    int
			tcp     bool
			limit   int
			records int // TXT records expected whole
			tc      bool
		}{
			{"medium, no EDNS", "medium.test", 0, false, 512, 0, true},
			{"medium, EDNS 1232", "medium.test", 1232, false, 1232, 1, false},
			{"medium, EDNS 4096 capped at 1232", "medium.test", 4096, false, 1232, 1, false},
			{"medium, EDNS 100 means 512", "medium.test", 100, false, 512, 0, true},
			{"big, no EDNS", "big.test", 0, false, 512, 0, true},
			{"big, EDNS 1232", "big.test", 1232, false, 1232, 0, true},
			{"big over TCP", "big.test", 0, true, 65535, 1, false},
		}
		for i, tt := range tests {
			t.Run(mode.String()+"/"+tt.name, func(t *testing.T) {
				q := query(t, uint16(0x7700+i), tt.qname, dns.TypeTXT, tt.edns)
				r := s.Answer(t.Context(), q, tt.tcp)
				m := parse(t, q, r)
				if len(r) > tt.limit {
					t.Errorf("reply of %d bytes, limit %d", len(r), tt.limit)
				}
				if m.Truncated != tt.tc || len(m.Answer) != tt.records || m.Rcode != dns.RcodeSuccess {
					t.Errorf("TC %v, %d answers, rcode %s; want TC %v, %d answers",
						m.Truncated, len(m.Answer), dns.RcodeToString[m.Rcode], tt.tc, tt.records)
				}
				if tt.edns > 0 && m.IsEdns0() == nil {
					t.Error("reply to an EDNS query without OPT")
				}
			})
		}
	}
}

func TestRemoteCacheBounded(t *testing.T) {
	d := startRecursive(t)
	s := newServer(t, Config{Mode: ModeRemote, Upstream: d.addr, CacheSize: 2})
	for i, name := range []string{"a.example.test", "b.example.test", "c.example.test", "h.test"} {
		q := query(t, uint16(i), name, dns.TypeA, 0)
		parse(t, q, s.Answer(t.Context(), q, false))
		if n := s.cache.len(); n > 2 {
			t.Fatalf("cache holds %d entries, bound 2", n)
		}
	}
	// The oldest was evicted: with the upstream gone it fails.
	d.stop()
	q := query(t, 9, "a.example.test", dns.TypeA, 0)
	if m := parse(t, q, s.Answer(t.Context(), q, false)); m.Rcode != dns.RcodeServerFailure {
		t.Errorf("evicted entry still answered: %v", m)
	}
	q = query(t, 10, "h.test", dns.TypeA, 0)
	if m := parse(t, q, s.Answer(t.Context(), q, false)); len(m.Answer) != 1 {
		t.Errorf("recent entry lost: %v", m)
	}
}

// silentUpstream accepts connections and never answers.
func silentUpstream(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	var mu sync.Mutex
	var conns []net.Conn
	wg.Go(func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	})
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
	return l.Addr().String()
}

func TestRemoteSilentUpstream(t *testing.T) {
	t.Parallel()
	s, _ := remoteServer(t, silentUpstream(t), nil)
	t.Run("caller deadline", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(t.Context(), 200*time.Millisecond)
		defer cancel()
		start := time.Now()
		q := query(t, 1, "a.test", dns.TypeA, 0)
		m := parse(t, q, s.Answer(ctx, q, false))
		if m.Rcode != dns.RcodeServerFailure || time.Since(start) > 3*time.Second {
			t.Errorf("rcode %s after %v; want SERVFAIL soon after 200ms", dns.RcodeToString[m.Rcode], time.Since(start))
		}
	})
	t.Run("own 5s bound", func(t *testing.T) {
		start := time.Now()
		q := query(t, 2, "b.test", dns.TypeA, 0)
		m := parse(t, q, s.Answer(t.Context(), q, false))
		if took := time.Since(start); m.Rcode != dns.RcodeServerFailure || took < upstreamTimeout-time.Second || took > upstreamTimeout+3*time.Second {
			t.Errorf("rcode %s after %v; want SERVFAIL after about %v", dns.RcodeToString[m.Rcode], took, upstreamTimeout)
		}
	})
	t.Run("close abandons", func(t *testing.T) {
		done := make(chan []byte)
		q := query(t, 3, "c.test", dns.TypeA, 0)
		go func() { done <- s.Answer(context.Background(), q, false) }()
		// Once the query holds an upstream slot, Close cuts it short and
		// waits for it.
		for deadline := time.Now().Add(5 * time.Second); len(s.sem) == 0; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatal("query never reached the upstream")
			}
		}
		start := time.Now()
		s.Close()
		m := parse(t, q, <-done)
		if m.Rcode != dns.RcodeServerFailure || time.Since(start) > 2*time.Second {
			t.Errorf("rcode %s, %v after Close", dns.RcodeToString[m.Rcode], time.Since(start))
		}
	})
}

// streamPair returns the two ends of a loopback TCP connection.
func streamPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	client, err = net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server, err = l.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

// serve runs ServeStream on c and returns a channel with its result.
func serve(t *testing.T, ctx context.Context, s *Server, c net.Conn) <-chan error {
	done := make(chan error, 1)
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		done <- s.ServeStream(ctx, c)
	}()
	t.Cleanup(func() {
		select {
		case <-finished:
		case <-time.After(10 * time.Second):
			t.Error("ServeStream did not return")
		}
	})
	return done
}

// pipelined writes queries for names in one write, then reads as many
// replies and returns them by ID.
func pipelined(t *testing.T, c net.Conn, names []string, qtype uint16) map[uint16]*dns.Msg {
	t.Helper()
	var out []byte
	queries := map[uint16][]byte{}
	for i, name := range names {
		q := query(t, uint16(0x100+i), name, qtype, 0)
		queries[uint16(0x100+i)] = q
		out = append(out, byte(len(q)>>8), byte(len(q)))
		out = append(out, q...)
	}
	c.SetDeadline(time.Now().Add(10 * time.Second))
	// Written while the replies are read: over net.Pipe a write waits for
	// its reader.
	var wg sync.WaitGroup
	var werr error
	wg.Go(func() { _, werr = c.Write(out) })
	defer func() {
		wg.Wait()
		if werr != nil {
			t.Errorf("write queries: %v", werr)
		}
	}()
	got := map[uint16]*dns.Msg{}
	for range names {
		r, err := readFrame(c)
		if err != nil {
			t.Fatalf("read reply: %v", err)
		}
		m := new(dns.Msg)
		if err := m.Unpack(r); err != nil {
			t.Fatal(err)
		}
		if _, dup := got[m.Id]; dup || queries[m.Id] == nil {
			t.Fatalf("reply id %#x unexpected or twice", m.Id)
		}
		parse(t, queries[m.Id], r)
		got[m.Id] = m
	}
	return got
}

func TestServeStreamRemote(t *testing.T) {
	d := startRecursive(t)
	s, _ := remoteServer(t, d.addr, nil)
	client, server := streamPair(t)
	done := serve(t, t.Context(), s, server)
	names := []string{"example.test", "a.example.test", "h.test", "a.nx.test", "b.example.test", "example.test"}
	got := pipelined(t, client, names, dns.TypeA)
	for id, m := range got {
		name := names[id-0x100]
		wantRcode := dns.RcodeSuccess
		if name == "a.nx.test" {
			wantRcode = dns.RcodeNameError
		}
		if m.Rcode != wantRcode {
			t.Errorf("%s: rcode %s", name, dns.RcodeToString[m.Rcode])
		}
	}
	// A second batch on the same connection, then the client half-closes:
	// ServeStream answers and returns nil.
	pipelined(t, client, []string{"big.test"}, dns.TypeTXT)
	client.(*net.TCPConn).CloseWrite()
	if err := <-done; err != nil {
		t.Errorf("ServeStream after EOF: %v", err)
	}
}

func TestServeStreamPipe(t *testing.T) {
	s := fakeServer(t, Config{})
	client, server := net.Pipe()
	defer client.Close()
	defer server.Close()
	done := serve(t, t.Context(), s, server)
	var names []string
	for i := range 40 { // more than maxStreamInFlight
		names = append(names, "host"+string(rune('a'+i%26))+".test")
	}
	got := pipelined(t, client, names, dns.TypeA)
	if len(got) != len(names) {
		t.Fatalf("%d replies", len(got))
	}
	client.Close()
	if err := <-done; err != nil {
		t.Errorf("ServeStream after close of the client: %v", err)
	}
}

func TestServeStreamEnds(t *testing.T) {
	tests := []struct {
		name string
		end  func(s *Server, cancel context.CancelFunc, client net.Conn)
		want error
	}{
		{"context cancelled", func(_ *Server, cancel context.CancelFunc, _ net.Conn) { cancel() }, context.Canceled},
		{"server closed", func(s *Server, _ context.CancelFunc, _ net.Conn) { s.Close() }, net.ErrClosed},
		{"short message then EOF", func(_ *Server, _ context.CancelFunc, c net.Conn) {
			c.Write([]byte{0, 40, 1, 2, 3})
			c.(*net.TCPConn).CloseWrite()
		}, io.ErrUnexpectedEOF},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := fakeServer(t, Config{})
			client, server := streamPair(t)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			done := serve(t, ctx, s, server)
			// One exchange first, so that ServeStream is surely reading.
			pipelined(t, client, []string{"a.test"}, dns.TypeA)
			tt.end(s, cancel, client)
			select {
			case err := <-done:
				if !errors.Is(err, tt.want) {
					t.Errorf("ServeStream = %v, want %v", err, tt.want)
				}
			case <-time.After(5 * time.Second):
				t.Fatal("ServeStream did not return")
			}
		})
	}
}

// TestSetUpstream: after SetUpstream the next query goes to the new
// resolver, and nothing cached from the old one is answered; a bad
// upstream is refused and changes nothing.
func TestSetUpstream(t *testing.T) {
	old := startDnsmasq(t, "--address=/moved.test/192.0.2.10")
	next := startDnsmasq(t, "--address=/moved.test/192.0.2.20")
	s, _ := remoteServer(t, old.addr, nil)
	ask := func(id uint16) string {
		t.Helper()
		q := query(t, id, "moved.test", dns.TypeA, 0)
		m := parse(t, q, s.Answer(t.Context(), q, false))
		if len(m.Answer) != 1 {
			t.Fatalf("answer %v", m)
		}
		return m.Answer[0].(*dns.A).A.String()
	}
	if got := ask(1); got != "192.0.2.10" {
		t.Fatalf("from the first upstream: %s", got)
	}
	if err := s.SetUpstream("nonsense:port:x"); err == nil || s.Upstream() != old.addr {
		t.Fatalf("SetUpstream(bad): %v, upstream now %s", err, s.Upstream())
	}
	if got := ask(2); got != "192.0.2.10" {
		t.Fatalf("after a refused SetUpstream: %s, want the first upstream's (cached)", got)
	}
	if err := s.SetUpstream(next.addr); err != nil || s.Upstream() != next.addr {
		t.Fatalf("SetUpstream(%s): %v, upstream now %s", next.addr, err, s.Upstream())
	}
	if got := ask(3); got != "192.0.2.20" {
		t.Errorf("after SetUpstream: %s, want the new upstream's 192.0.2.20 (not the old cached answer)", got)
	}
}
