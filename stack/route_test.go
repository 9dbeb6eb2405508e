package stack

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// namedDialer is a second upstream for routing tests: it dials loopback as
// the peer's dialer does, counts its dials and names itself as a failover
// group's member would (UpstreamDialer).
type namedDialer struct {
	redirectDialer
	name  string
	dials atomic.Int32
}

func (d *namedDialer) DialUpstream(ctx context.Context, network, address string) (net.Conn, string, error) {
	d.dials.Add(1)
	c, err := d.DialContext(ctx, network, address)
	return c, d.name, err
}

// routeLog records the flows Config.Route was asked about, in order, and
// answers with decide.
type routeLog struct {
	mu     sync.Mutex
	flows  []Flow
	decide func(Flow) Decision
}

func (l *routeLog) route(f Flow) Decision {
	l.mu.Lock()
	l.flows = append(l.flows, f)
	l.mu.Unlock()
	return l.decide(f)
}

func (l *routeLog) asked() []Flow {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.flows)
}

// flowByID finds a live flow in the stack's view.
func flowByID(st *Stack, match func(FlowInfo) bool) (FlowInfo, bool) {
	for _, f := range st.Flows(0) {
		if match(f) {
			return f, true
		}
	}
	return FlowInfo{}, false
}

// Issue 17: a rule's decision is carried out per flow: another upstream
// (named in the flow view), a reset at once, or silence.
func TestRouteTCPActions(t *testing.T) {
	other := &namedDialer{name: "b"}
	echoPort := listen(t, echo)
	rejectPort, dropPort := echoPort+1, echoPort+2 // never dialed: nothing need listen
	route := func(f Flow) Decision {
		switch {
		case f.Proto != "tcp":
			return Decision{}
		case f.Dst.Addr() == netip.MustParseAddr("192.0.2.20"):
			return Decision{Dialer: other, Rule: `rule 2 "cidr:192.0.2.20=proxy:b"`}
		case f.Dst.Port() == rejectPort:
			return Decision{Action: Reject, Rule: "rule 3"}
		case f.Dst.Port() == dropPort:
			return Decision{Action: Drop, Rule: "rule 4"}
		}
		return Decision{Via: "default"}
	}
	p := newPeer(t, Config{Route: route})

	start := time.Now()
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), rejectPort))
	if err == nil {
		c.Close()
		t.Fatal("connect to a rejected port succeeded")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("rejected connect: %v, want ECONNREFUSED", err)
	}
	t.Logf("rejected in %v", time.Since(start))

	if c, err := p.dialFrom(t, 0, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), dropPort), 1500*time.Millisecond); err == nil {
		c.Close()
		t.Fatal("connect to a dropped port succeeded")
	} else if !strings.Contains(err.Error(), "timed out") {
		t.Fatalf("dropped connect: %v, want a timeout (no reply at all)", err)
	}

	if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), echoPort), 1, 5000); err != nil {
		t.Fatalf("default route: %v", err)
	}
	if other.dials.Load() != 0 {
		t.Fatalf("the other upstream was dialed %d times for the default route", other.dials.Load())
	}
	c, err = p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.20"), echoPort))
	if err != nil {
		t.Fatalf("connect routed to b: %v", err)
	}
	defer c.Close()
	if other.dials.Load() != 1 {
		t.Fatalf("upstream b dialed %d times, want 1", other.dials.Load())
	}
	// An echo through it: the flow is relayed, so it is in the view.
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatalf("echo via b: %v", err)
	}
	f, ok := flowByID(p.st, func(f FlowInfo) bool { return f.Proto == "tcp" && f.Via == "b" })
	if !ok || !strings.Contains(f.Rule, "proxy:b") {
		t.Fatalf("flow view %+v: want the flow via b with its rule", p.st.Flows(0))
	}
	p.dialer.mu.Lock()
	defer p.dialer.mu.Unlock()
	for _, d := range p.dialer.dsts {
		if a, _ := netip.ParseAddrPort(d); a.Port() == rejectPort || a.Port() == dropPort {
			t.Fatalf("dialed %s, a refused destination", d)
		}
	}
	if s := p.st.Stats(); s.Rejected != 1 || s.Dropped < 1 {
		t.Fatalf("stats rejected=%d dropped=%d, want 1 and at least 1", s.Rejected, s.Dropped)
	}

	// The upstream dies: its flows end with a reset, not a hang.
	if n := p.st.CloseFlowsVia("b"); n != 1 {
		t.Fatalf("CloseFlowsVia closed %d flows, want 1", n)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) || isTimeout(err) {
		t.Fatalf("read after the upstream's flows were closed: %v, want a reset", err)
	}
}

// A rejected UDP destination is answered with port unreachable, and its
// association opens no upstream socket; another goes through.
func TestRouteUDPReject(t *testing.T) {
	d := &loopbackUDP{}
	port := udpEcho(t)
	route := func(f Flow) Decision {
		if f.Proto == "udp" && f.Dst.Port() == 9 {
			return Decision{Action: Reject, Rule: "port:9=reject"}
		}
		return Decision{Via: "direct"}
	}
	p := newPeer(t, Config{UDP: d, Route: route})
	if ok, err := udpRefused(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), 9)); !ok {
		t.Fatalf("read gave %v, want connection refused from ICMP port unreachable", err)
	}
	if n := d.opened.Load(); n != 0 {
		t.Fatalf("%d upstream sockets opened for a rejected association", n)
	}
	u := p.udpClient(t)
	roundTrip(t, u, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port), []byte("hello"))
	f, ok := flowByID(p.st, func(f FlowInfo) bool { return f.Proto == "udp" && f.Destination.Port() == port })
	if !ok || f.Via != "direct" {
		t.Fatalf("udp flow view %+v: want the association via direct", p.st.Flows(0))
	}
	// Its upstream dies: the association ends with it.
	if n := p.st.CloseFlowsVia("direct"); n != 1 {
		t.Fatalf("CloseFlowsVia closed %d flows, want the association", n)
	}
	if _, ok := flowByID(p.st, func(f FlowInfo) bool { return f.Proto == "udp" && f.Destination.Port() == port }); ok {
		t.Fatalf("udp flow view %+v: the association outlived its upstream", p.st.Flows(0))
	}
}

// A flow whose route needs a name is read for one: the HTTP Host header
// of a client that connected by address routes it, and with DialName the
// upstream is asked for the name. The bytes read reach the server intact.
func TestRouteSniffedHTTPHost(t *testing.T) {
	got := make(chan string, 1)
	port := listen(t, func(c *net.TCPConn) {
		buf := make([]byte, 4096)
		n, _ := io.ReadAtLeast(c, buf, len("GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"))
		got <- string(buf[:n])
		c.Write([]byte("HTTP/1.1 204 No Content\r\n\r\n"))
	})
	log := &routeLog{decide: func(f Flow) Decision {
		if f.Name == "" {
			return Decision{Sniff: true}
		}
		if f.Name == "example.test" {
			return Decision{Via: "sniffed-ok", Rule: "domain:example.test=proxy", DialName: true}
		}
		return Decision{Action: Reject}
	}}
	p := newPeer(t, Config{Route: log.route})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer c.Close()
	req := "GET / HTTP/1.1\r\nHost: example.test\r\n\r\n"
	if _, err := c.Write([]byte(req)); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	reply := make([]byte, 64)
	n, err := c.Read(reply)
	if err != nil || !strings.HasPrefix(string(reply[:n]), "HTTP/1.1 204") {
		t.Fatalf("reply %q, %v", reply[:n], err)
	}
	if s := <-got; s != req {
		t.Fatalf("server got %q, want the request intact", s)
	}
	asked := log.asked()
	p.dialer.mu.Lock()
	defer p.dialer.mu.Unlock()
	if len(asked) != 2 || asked[1].Name != "example.test" || asked[1].NameFrom != NameFromSniffed {
		t.Fatalf("route asked %+v, want twice, the second with the sniffed name", asked)
	}
	if len(p.dialer.dsts) != 1 || p.dialer.dsts[0] != hostPort("example.test", port) {
		t.Fatalf("dialed %v, want the sniffed name", p.dialer.dsts)
	}
	f, ok := flowByID(p.st, func(f FlowInfo) bool { return f.Proto == "tcp" })
	if !ok || f.Name != "example.test" || f.NameFrom != NameFromSniffed || f.Via != "sniffed-ok" {
		t.Fatalf("flow view %+v", p.st.Flows(0))
	}
}

// A server-first protocol gives no name: the flow is routed without one
// once SniffTimeout passes, and the server's greeting reaches the client.
func TestRouteSniffServerFirst(t *testing.T) {
	port := listen(t, func(c *net.TCPConn) {
		c.Write([]byte("220 smtp.test ready\r\n"))
		io.Copy(io.Discard, c)
	})
	route := func(f Flow) Decision {
		if f.Name == "" {
			return Decision{Sniff: true, Via: "no-name"}
		}
		return Decision{Action: Reject}
	}
	p := newPeer(t, Config{Route: route, SniffTimeout: 100 * time.Millisecond})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("connect: %v", err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, err := c.Read(buf)
	if err != nil || !strings.HasPrefix(string(buf[:n]), "220 ") {
		t.Fatalf("greeting %q, %v", buf[:n], err)
	}
}

// A UDP association whose route needs a name is routed by the server name
// in the client's QUIC Initial packets: a rejected name opens no upstream
// socket and shows in the flow view as rejected, by its sniffed name; an
// accepted one is relayed.
func TestRouteSniffedQUIC(t *testing.T) {
	d := &loopbackUDP{}
	route := func(f Flow) Decision {
		switch {
		case f.Proto != "udp":
			return Decision{}
		case f.Name == "":
			return Decision{Sniff: true, Via: "no-name"}
		case f.Name == "blocked.test":
			return Decision{Action: Reject, Rule: "domain:blocked.test=reject"}
		}
		return Decision{Via: "named", Rule: "domain:ok.test=proxy", DialName: true}
	}
	p := newPeer(t, Config{UDP: d, Route: route})
	port := udpEcho(t)
	for _, tc := range []struct {
		name     string
		rejected bool
	}{{"blocked.test", true}, {"ok.test", false}} {
		u := p.udpClient(t)
		dst := net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
		for _, g := range netnstest.QUICFirstFlight(t, tc.name, func(g [][]byte) bool { return len(g) == 2 }) {
			if _, err := u.WriteTo(g, dst); err != nil {
				t.Fatal(err)
			}
		}
		var got FlowInfo
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		for ctx.Err() == nil {
			var ok bool
			if got, ok = flowByID(p.st, func(f FlowInfo) bool { return f.Proto == "udp" && f.Name == tc.name }); ok && got.State != "opening" && (tc.rejected || got.Down > 0) {
				break
			}
			time.Sleep(10 * time.Millisecond) // the association has no readiness signal of its own
		}
		cancel()
		if got.NameFrom != NameFromSniffed {
			t.Fatalf("%s: flow view %+v, want the association named by its sniffed name", tc.name, p.st.Flows(0))
		}
		if tc.rejected && (got.State != "rejected" || d.opened.Load() != 0) {
			t.Fatalf("%s: state %q with %d upstream sockets, want rejected and none", tc.name, got.State, d.opened.Load())
		}
		if !tc.rejected && (got.Via != "named" || d.opened.Load() != 1) {
			t.Fatalf("%s: via %q with %d upstream sockets, want named and one", tc.name, got.Via, d.opened.Load())
		}
		if !tc.rejected {
			// DialName: the datagrams went to the name, as a proxy would
			// be asked, and the echo came back to the client from the
			// address it sent to.
			d.mu.Lock()
			names := slices.Clone(d.names)
			d.mu.Unlock()
			if want := hostPort(tc.name, port); len(names) < 2 || names[0] != want {
				t.Fatalf("%s: datagrams written to %q, want them sent to %s", tc.name, names, want)
			}
			if got.Down == 0 {
				t.Fatalf("%s: no echo reached the client: %+v", tc.name, got)
			}
		}
	}
}

// blockingDialer never connects: a dial ends when its context does.
type blockingDialer struct{}

func (blockingDialer) DialContext(ctx context.Context, _, _ string) (net.Conn, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

// Issue 16: a reload's new dial timeout applies to the next flow: a
// client that waited the long one is refused after the short one.
func TestSetTimeoutsDial(t *testing.T) {
	p := newPeer(t, Config{Dialer: blockingDialer{}, DialTimeout: time.Minute})
	p.st.SetTimeouts(Timeouts{Dial: 200 * time.Millisecond})
	if got := p.st.Timeouts(); got.Dial != 200*time.Millisecond || got.Handshake != defaultHandshakeTimeout || got.Sniff != defaultSniffTimeout {
		t.Fatalf("timeouts %+v: want the dial changed and the rest kept", got)
	}
	start := time.Now()
	c, err := p.dialFrom(t, 0, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), 80), 20*time.Second)
	if err == nil {
		c.Close()
		t.Fatal("connect through a dialer that never connects succeeded")
	}
	if took := time.Since(start); !errors.Is(err, syscall.ECONNREFUSED) || took > 5*time.Second {
		t.Fatalf("connect: %v after %v, want refused after the new 200ms dial timeout", err, took)
	}
}

// A flow to a real address our DNS gave for a name is routed by that name
// (NameFromDNS), without sniffing, and shows it; an address no answer gave
// is routed without one.
func TestRouteDNSName(t *testing.T) {
	port := listen(t, echo)
	log := &routeLog{decide: func(f Flow) Decision {
		if f.Name == "named.test" {
			return Decision{Via: "by-name", Rule: "domain:named.test=direct"}
		}
		return Decision{}
	}}
	names := func(a netip.Addr) (string, bool) {
		if a == netip.MustParseAddr("192.0.2.2") {
			return "named.test", true
		}
		return "", false
	}
	p := newPeer(t, Config{Route: log.route, AddrNames: names})
	if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port), 1, 100); err != nil {
		t.Fatal(err)
	}
	if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.3"), port), 2, 100); err != nil {
		t.Fatal(err)
	}
	if asked := log.asked(); len(asked) != 2 || asked[0].Name != "named.test" || asked[0].NameFrom != NameFromDNS || asked[1].Name != "" {
		t.Fatalf("route asked %+v: want the first flow by its DNS name, the second without one", log.asked())
	}
}
