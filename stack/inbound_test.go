package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

func TestServeInbound(t *testing.T) {
	gw := netip.MustParseAddr("198.18.0.2")
	p := newPeer(t, Config{Gateway4: gw})
	// A server behind the TUN: on the client stack.
	ln, err := gonet.ListenTCP(p.client, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1}), Port: 8000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peerSeen := make(chan net.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		peerSeen <- c.RemoteAddr()
		io.Copy(c, c)
		c.(*gonet.TCPConn).CloseWrite()
	}()

	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8000"))

	msg := bytes.Repeat([]byte("published "), 5000)
	go func() {
		outside.Write(msg)
		outside.CloseWrite()
	}()
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(outside)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes came back as %d", len(msg), len(got))
	}
	if a := (<-peerSeen).(*net.TCPAddr).AddrPort().Addr(); a != gw {
		t.Errorf("server saw the connection from %v, want the gateway %v", a, gw)
	}
}

func TestServeInboundRefused(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8001")) // nothing listens
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.ReadAll(outside)
	if err == nil {
		t.Fatal("got EOF, want a reset for a port nobody listens on")
	}
}

// insideUDP is a UDP server behind the TUN (on the client stack) that echoes
// every datagram to its source and reports each source.
type insideUDP struct {
	addr    netip.AddrPort
	sources chan netip.AddrPort
}

// serveInsideUDP echoes on at, on the client stack, until the test ends.
func (p *peer) serveInsideUDP(t *testing.T, at netip.AddrPort) *insideUDP {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if at.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	c, err := gonet.DialUDP(p.client, &tcpip.FullAddress{NIC: 1, Addr: packet.TCPIPAddr(at.Addr()), Port: at.Port()}, nil, proto)
	if err != nil {
		t.Fatalf("listen inside on %v: %v", at, err)
	}
	s := &insideUDP{addr: at, sources: make(chan netip.AddrPort, 4096)}
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			src := from.(*net.UDPAddr).AddrPort()
			select {
			case s.sources <- netip.AddrPortFrom(src.Addr().Unmap(), src.Port()):
			default:
			}
			c.WriteTo(buf[:n], from)
		}
	})
	return s
}

// lastSource drains the sources seen so far and returns the last one.
func (s *insideUDP) lastSource(t *testing.T) netip.AddrPort {
	t.Helper()
	var last netip.AddrPort
	for {
		select {
		case last = <-s.sources:
		default:
			if !last.IsValid() {
				t.Fatal("the server inside saw no datagram")
			}
			return last
		}
	}
}

// publishUDP serves a published UDP socket on loopback for dst, and returns
// its address. The socket is closed, and ServeInboundUDP must have returned
// nil, by the end of the test.
func publishUDP(t *testing.T, st *Stack, dst netip.AddrPort) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { errc <- st.ServeInboundUDP(pc, dst) }()
	t.Cleanup(func() {
		pc.Close()
		select {
		case err := <-errc:
			if err != nil {
				t.Errorf("ServeInboundUDP: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("ServeInboundUDP still running 5s after its socket closed")
		}
	})
	return pc.LocalAddr().(*net.UDPAddr).AddrPort()
}

// outsideUDP opens a UDP socket on loopback: a source outside.
func outsideUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// outsideRoundTrip sends msg from c to the published socket at pub and wants
// it back intact from pub. A datagram lost on the way is sent again, a
// bounded number of times; a late echo of an earlier message fails the
// test only if it is not intact.
func outsideRoundTrip(t *testing.T, c *net.UDPConn, pub netip.AddrPort, msg []byte) {
	t.Helper()
	buf := make([]byte, 1<<16)
	for attempt := range 5 {
		if _, err := c.WriteToUDPAddrPort(msg, pub); err != nil {
			t.Fatalf("send: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second << attempt))
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if isTimeout(err) {
			continue
		}
		if err != nil {
			t.Fatalf("receive: %v", err)
		}
		if from != pub {
			t.Fatalf("reply came from %v, want the published socket %v", from, pub)
		}
		if !bytes.Equal(buf[:n], msg) {
			t.Fatalf("echo of %d bytes differs (got %d bytes)", len(msg), n)
		}
		return
	}
	t.Fatalf("no echo for %d bytes after 5 tries", len(msg))
}

func TestServeInboundUDP(t *testing.T) {
	for _, tc := range []struct {
		name string
		gw   netip.Addr
		dst  netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddr("198.18.0.2"), netip.MustParseAddrPort("198.18.0.1:9000")},
		{"ipv6", netip.MustParseAddr("fd00:1898::2"), netip.MustParseAddrPort("[fd00:1898::1]:9000")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2"), Gateway6: netip.MustParseAddr("fd00:1898::2")})
			inside := p.serveInsideUDP(t, tc.dst)
			pub := publishUDP(t, p.st, tc.dst)

			// Two outside sources get an association each: the server
			// inside sees both from the gateway, on different ports.
			a, b := outsideUDP(t), outsideUDP(t)
			outsideRoundTrip(t, a, pub, []byte("from a"))
			srcA := inside.lastSource(t)
			outsideRoundTrip(t, b, pub, []byte("from b"))
			srcB := inside.lastSource(t)
			for _, src := range []netip.AddrPort{srcA, srcB} {
				if src.Addr() != tc.gw {
					t.Errorf("the server inside saw a datagram from %v, want the gateway %v", src, tc.gw)
				}
			}
			if srcA == srcB {
				t.Fatalf("two outside sources reached the server from one source %v", srcA)
			}
			// Interleaved, each source gets its own replies only, and keeps
			// its association.
			for i := range 5 {
				outsideRoundTrip(t, a, pub, fmt.Appendf(nil, "a %d", i))
				if src := inside.lastSource(t); src != srcA {
					t.Fatalf("source a moved from %v to %v", srcA, src)
				}
				outsideRoundTrip(t, b, pub, fmt.Appendf(nil, "b %d", i))
				if src := inside.lastSource(t); src != srcB {
					t.Fatalf("source b moved from %v to %v", srcB, src)
				}
			}
			if n := p.st.inboundUDPFlows(); n != 2 {
				t.Errorf("%d inbound associations, want 2", n)
			}

			// Every size that fits the link comes back intact.
			for size := 1; size <= 1400; size++ {
				msg := make([]byte, size)
				for k := range msg {
					msg[k] = byte(size*7 + k*13)
				}
				outsideRoundTrip(t, a, pub, msg)
			}
			// Larger ones go in as IP fragments, and their echoes come
			// back as fragments too (issue 15), up to the largest
			// datagram the outside socket sends.
			for _, size := range []int{1500, 9000, 65507} {
				msg := make([]byte, size)
				for k := range msg {
					msg[k] = byte(size*7 + k*13)
				}
				outsideRoundTrip(t, a, pub, msg)
			}
			if n := p.st.inUDP.Stats().DroppedBig; n != 0 {
				t.Errorf("%d datagrams dropped as too big, want none", n)
			}
		})
	}
}

func TestServeInboundUDPIdleTimeout(t *testing.T) {
	gw := netip.MustParseAddr("198.18.0.2")
	p := newPeer(t, Config{Gateway4: gw, UDPTimeout: 200 * time.Millisecond})
	dst := netip.MustParseAddrPort("198.18.0.1:9000")
	inside := p.serveInsideUDP(t, dst)
	pub := publishUDP(t, p.st, dst)
	c := outsideUDP(t)
	outsideRoundTrip(t, c, pub, []byte("one"))
	first := inside.lastSource(t)
	deadline := time.Now().Add(10 * time.Second)
	for p.st.inboundUDPFlows() != 0 {
		if time.Now().After(deadline) {
			t.Fatal("inbound association still open long after its idle timeout")
		}
		time.Sleep(20 * time.Millisecond) // polling a state with no signal to wait on
	}
	outsideRoundTrip(t, c, pub, []byte("two"))
	if second := inside.lastSource(t); second == first {
		t.Errorf("after the idle timeout the source kept gateway port %v, want a new association", first)
	}
}

func TestServeInboundUDPBounded(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2"), MaxUDPFlows: 4})
	dst := netip.MustParseAddrPort("198.18.0.1:9000")
	p.serveInsideUDP(t, dst)
	pub := publishUDP(t, p.st, dst)
	for i := range 12 {
		outsideRoundTrip(t, outsideUDP(t), pub, fmt.Appendf(nil, "source %d", i))
		if n := p.st.inboundUDPFlows(); n > 4 {
			t.Fatalf("%d inbound associations, want at most 4", n)
		}
	}
	if n := p.st.inUDP.Stats().Evicted; n != 8 {
		t.Errorf("%d associations evicted, want 8", n)
	}
}

// TestServeInboundUDPStackClose checks that closing the stack ends
// ServeInboundUDP although its socket stays open.
func TestServeInboundUDPStackClose(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	dst := netip.MustParseAddrPort("198.18.0.1:9000")
	p.serveInsideUDP(t, dst)
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	errc := make(chan error, 1)
	go func() { errc <- p.st.ServeInboundUDP(pc, dst) }()
	outsideRoundTrip(t, outsideUDP(t), pc.LocalAddr().(*net.UDPAddr).AddrPort(), []byte("hello"))
	p.st.Close()
	select {
	case err := <-errc:
		if err != nil {
			t.Errorf("ServeInboundUDP after Close: %v, want nil", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ServeInboundUDP still running 5s after the stack closed")
	}
	if err := p.st.ServeInboundUDP(pc, dst); !errors.Is(err, net.ErrClosed) {
		t.Errorf("ServeInboundUDP on a closed stack: %v, want net.ErrClosed", err)
	}
}

func TestServeInboundUDPNoGateway(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	pc := outsideUDP(t)
	if err := p.st.ServeInboundUDP(pc, netip.MustParseAddrPort("[fd00:1898::1]:9000")); err == nil {
		t.Fatal("ServeInboundUDP to IPv6 with no IPv6 gateway succeeded")
	}
}

// TestServeInboundUDPNothingInside: datagrams to a published port nobody
// listens on behind the TUN are refused there with ICMP, which the stack
// takes (and counts) rather than handing it to gVisor.
func TestServeInboundUDPNothingInside(t *testing.T) {
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.18.0.1:9001"), netip.MustParseAddrPort("[fd00:1898::1]:9001")} {
		t.Run(dst.Addr().String(), func(t *testing.T) {
			p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2"), Gateway6: netip.MustParseAddr("fd00:1898::2")})
			pub := publishUDP(t, p.st, dst)
			c := outsideUDP(t)
			deadline := time.Now().Add(10 * time.Second)
			for p.st.inUDP.Stats().InsideRefusals == 0 {
				if time.Now().After(deadline) {
					t.Fatal("no ICMP port unreachable from inside reached the stack")
				}
				c.WriteToUDPAddrPort([]byte("anyone?"), pub)
				time.Sleep(50 * time.Millisecond) // polling a counter with no signal to wait on
			}
		})
	}
}

// fixedDNS answers every query with the query after "answer:".
type fixedDNS struct{}

func (fixedDNS) Answer(_ context.Context, q []byte, _ bool) []byte {
	return append([]byte("answer:"), q...)
}
func (fixedDNS) ServeStream(context.Context, net.Conn) error { return nil }

// TestGatewayUDPIsNotOutbound: a datagram from inside to a gateway port that
// no inbound association holds is refused with ICMP port unreachable and
// never opens an outbound association; DNS on the gateway is still
// answered.
func TestGatewayUDPIsNotOutbound(t *testing.T) {
	d := &loopbackUDP{}
	gw := netip.MustParseAddr("198.18.0.2")
	p := newPeer(t, Config{Gateway4: gw, UDP: d, DNS: fixedDNS{}})

	if ok, rerr := udpRefused(t, p, netip.AddrPortFrom(gw, 50000)); !ok {
		t.Errorf("UDP to an unused gateway port: %v, want connection refused", rerr)
	}
	if n := d.opened.Load(); n != 0 {
		t.Errorf("opened %d outbound associations for datagrams to the gateway, want 0", n)
	}

	dnsc := p.udpClient(t)
	q := []byte("query")
	dnsc.WriteTo(q, net.UDPAddrFromAddrPort(netip.AddrPortFrom(gw, 53)))
	dnsc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 100)
	n, _, err := dnsc.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "answer:query" {
		t.Errorf("DNS on the gateway: %q, %v; want %q", buf[:n], err, "answer:query")
	}
}
