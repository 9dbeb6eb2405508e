package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// loopbackUDP opens real UDP sockets on loopback and rewrites the test
// network's server addresses (192.0.2.0/24, 2001:db8::/32) to 127.0.0.1 on
// the way out and back on the way in, so the stack sees the far end it was
// asked for while every datagram stays on this machine.
type loopbackUDP struct {
	opened atomic.Int32
	fail   error

	mu    sync.Mutex
	names []string // destinations given by name, as written
}

func (d *loopbackUDP) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	if d.fail != nil {
		return nil, d.fail
	}
	d.opened.Add(1)
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		return nil, err
	}
	return &rewriteConn{UDPConn: c, d: d}, nil
}

type rewriteConn struct {
	*net.UDPConn
	d     *loopbackUDP
	mu    sync.Mutex
	alias map[uint16]netip.Addr // loopback port → the address the client used
}

// nameHost is where a destination given by name is, as a proxy would
// resolve it.
var nameHost = netip.MustParseAddr("192.0.2.2")

func (c *rewriteConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	ua, ok := addr.(*net.UDPAddr)
	if !ok { // "name:port", as a proxy that resolves names takes it
		c.d.mu.Lock()
		c.d.names = append(c.d.names, addr.String())
		c.d.mu.Unlock()
		_, port, err := net.SplitHostPort(addr.String())
		p, perr := strconv.Atoi(port)
		if err != nil || perr != nil {
			return 0, fmt.Errorf("write to %s: not host:port", addr)
		}
		ua = net.UDPAddrFromAddrPort(netip.AddrPortFrom(nameHost, uint16(p)))
	}
	ap := ua.AddrPort()
	c.mu.Lock()
	if c.alias == nil {
		c.alias = make(map[uint16]netip.Addr)
	}
	c.alias[ap.Port()] = ap.Addr()
	c.mu.Unlock()
	return c.UDPConn.WriteToUDPAddrPort(b, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), ap.Port()))
}

func (c *rewriteConn) ReadFrom(b []byte) (int, net.Addr, error) {
	n, from, err := c.UDPConn.ReadFromUDPAddrPort(b)
	if err != nil {
		return n, nil, err
	}
	c.mu.Lock()
	a := c.alias[from.Port()]
	c.mu.Unlock()
	return n, net.UDPAddrFromAddrPort(netip.AddrPortFrom(a, from.Port())), nil
}

// udpEcho serves a UDP echo on loopback and returns its port.
func udpEcho(t *testing.T) uint16 {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			c.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	return uint16(c.LocalAddr().(*net.UDPAddr).Port)
}

// udpClient opens an unconnected UDP socket on the client stack.
func (p *peer) udpClient(t *testing.T) *gonet.UDPConn {
	t.Helper()
	c, err := gonet.DialUDP(p.client, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1})}, nil, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatalf("client udp: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func roundTrip(t *testing.T, c *gonet.UDPConn, dst netip.AddrPort, msg []byte) netip.AddrPort {
	t.Helper()
	buf := make([]byte, 2048)
	for attempt := range 5 {
		if _, err := c.WriteTo(msg, net.UDPAddrFromAddrPort(dst)); err != nil {
			t.Fatalf("send: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(time.Second << attempt))
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue // UDP may drop; the test bounds the retries
			}
			t.Fatalf("receive: %v", err)
		}
		if !bytes.Equal(buf[:n], msg) {
			t.Fatalf("echo of %d bytes differs (got %d)", len(msg), n)
		}
		return from.(*net.UDPAddr).AddrPort()
	}
	t.Fatalf("no echo for %d bytes after 5 tries", len(msg))
	return netip.AddrPort{}
}

func TestUDPEchoSizes(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d})
	c := p.udpClient(t)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	for size := 1; size <= 1400; size += 7 {
		msg := bytes.Repeat([]byte{byte(size)}, size)
		if from := roundTrip(t, c, dst, msg); from != dst {
			t.Fatalf("reply came from %v, want %v", from, dst)
		}
	}
	if n := d.opened.Load(); n != 1 {
		t.Errorf("opened %d upstream sockets for one client source, want 1", n)
	}
}

// TestUDPEndpointIndependentMapping checks that one client socket talking to
// two destinations keeps one upstream socket, as QUIC and STUN need.
func TestUDPEndpointIndependentMapping(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d})
	c := p.udpClient(t)
	a := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	b := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.3"), udpEcho(t))
	for i := range 10 {
		for _, dst := range []netip.AddrPort{a, b} {
			msg := fmt.Appendf(nil, "to %v #%d", dst, i)
			if from := roundTrip(t, c, dst, msg); from != dst {
				t.Fatalf("reply came from %v, want %v", from, dst)
			}
		}
	}
	if n := d.opened.Load(); n != 1 {
		t.Errorf("opened %d upstream sockets, want 1 (endpoint-independent mapping)", n)
	}
}

func TestUDPIdleTimeout(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d, UDPTimeout: 200 * time.Millisecond})
	c := p.udpClient(t)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	roundTrip(t, c, dst, []byte("one"))
	deadline := time.Now().Add(10 * time.Second)
	for p.st.udpFlows() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("association still open long after its idle timeout")
		}
		time.Sleep(20 * time.Millisecond) // polling a state with no signal to wait on
	}
	roundTrip(t, c, dst, []byte("two"))
	if n := d.opened.Load(); n != 2 {
		t.Errorf("opened %d upstream sockets, want 2 (a new one after the idle timeout)", n)
	}
}

func TestUDPTableBounded(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d, MaxUDPFlows: 4, udpEvictIdle: -1}) // every newcomer evicts
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	for i := range 12 {
		c := p.udpClient(t)
		roundTrip(t, c, dst, fmt.Appendf(nil, "client %d", i))
		if n := p.st.udpFlows(); n > 4 {
			t.Fatalf("%d associations, want at most 4", n)
		}
	}
}

// TestUDPTableFullDropsNewSources is issue 19's flood in small: with the
// table full of associations active just now, a new source's datagrams
// are dropped (no association, no echo) and the established ones keep
// working.
func TestUDPTableFullDropsNewSources(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d, MaxUDPFlows: 4})
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	var clients []*gonet.UDPConn
	for i := range 4 {
		c := p.udpClient(t)
		roundTrip(t, c, dst, fmt.Appendf(nil, "client %d", i))
		clients = append(clients, c)
	}
	late := p.udpClient(t)
	for range 3 {
		if _, err := late.WriteTo([]byte("let me in"), net.UDPAddrFromAddrPort(dst)); err != nil {
			t.Fatal(err)
		}
	}
	late.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := late.ReadFrom(make([]byte, 100)); !isTimeout(err) {
		t.Fatalf("new source in a full table: read %d bytes, %v; want nothing", n, err)
	}
	for i, c := range clients {
		roundTrip(t, c, dst, fmt.Appendf(nil, "still here %d", i))
	}
	if n := p.st.udp.Stats().RefusedFull; n != 3 {
		t.Errorf("RefusedFull %d, want 3", n)
	}
	if n := p.st.udpFlows(); n != 4 {
		t.Errorf("%d associations, want 4", n)
	}
	if n := d.opened.Load(); n != 4 {
		t.Errorf("opened %d upstream sockets, want 4", n)
	}
}

func TestUDPRefusedUpstreamSendsICMP(t *testing.T) {
	d := &loopbackUDP{fail: errors.New("udp associate refused")}
	p := newPeer(t, Config{UDP: d})
	if ok, err := udpRefused(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), 9)); !ok {
		st := p.client.Stats()
		t.Fatalf("read gave %v, want an error from an ICMP unreachable (client got %d dst-unreachable, %d invalid ICMP; %d IP errors)", err,
			st.ICMP.V4.PacketsReceived.DstUnreachable.Value(), st.ICMP.V4.PacketsReceived.Invalid.Value(), st.IP.MalformedPacketsReceived.Value())
	}
}

func udpRefused(t *testing.T, p *peer, dst netip.AddrPort) (bool, error) {
	t.Helper()
	c, err := gonet.DialUDP(p.client, nil, &tcpip.FullAddress{NIC: 1, Addr: packet.TCPIPAddr(dst.Addr()), Port: dst.Port()}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rerr error
	for range 20 {
		if _, rerr = c.Write([]byte("anyone?")); rerr != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		_, rerr = c.Read(make([]byte, 100))
		if rerr != nil && !isTimeout(rerr) {
			break
		}
	}
	// gonet's UDP errors are gVisor's text, not errnos.
	refused := errors.Is(rerr, syscall.ECONNREFUSED) || rerr != nil && !isTimeout(rerr) && strings.Contains(rerr.Error(), "refused")
	return refused, rerr
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
