package stack

import (
	"errors"
	"net/netip"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// ownPrefix stands for netstackd's own addresses in these tests.
var ownPrefix = netip.MustParsePrefix("198.51.100.0/24")

func refuseOwn(a netip.Addr) bool { return ownPrefix.Contains(a) }

// Issue 19: a flow to netstackd's own addresses is reset without a dial,
// and flows elsewhere keep working right after, however many came before.
func TestRefusedTCPNotDialed(t *testing.T) {
	p := newPeer(t, Config{Refuse: refuseOwn})
	port := listen(t, echo)
	for i := range 20 {
		start := time.Now()
		c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), port))
		if err == nil {
			c.Close()
			t.Fatal("dial to a refused address succeeded")
		}
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial error %v, want ECONNREFUSED (a RST in reply to the SYN)", err)
		}
		if d := time.Since(start); d > 3*time.Second {
			t.Fatalf("refusal took %v", d)
		}
		if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port), i, 1000); err != nil {
			t.Fatalf("flow after refusal %d: %v", i, err)
		}
	}
	p.dialer.mu.Lock()
	defer p.dialer.mu.Unlock()
	for _, d := range p.dialer.dsts {
		if a, err := netip.ParseAddrPort(d); err == nil && ownPrefix.Contains(a.Addr()) {
			t.Fatalf("dialed %s, a refused address", d)
		}
	}
	if len(p.dialer.dsts) != 20 {
		t.Fatalf("%d dials, want the 20 allowed flows'", len(p.dialer.dsts))
	}
}

// A datagram to a refused address is answered with port unreachable, and
// opens no association.
func TestRefusedUDPNotSent(t *testing.T) {
	d := &loopbackUDP{}
	p := newPeer(t, Config{UDP: d, Refuse: refuseOwn})
	dst := netip.AddrPortFrom(netip.MustParseAddr("198.51.100.7"), udpEcho(t))
	if ok, rerr := udpRefused(t, p, dst); !ok {
		t.Fatalf("read gave %v, want ECONNREFUSED from an ICMP port unreachable", rerr)
	}
	if n := d.opened.Load(); n != 0 {
		t.Fatalf("%d upstream sockets opened for a refused destination", n)
	}
	// Elsewhere still works, from a fresh client socket.
	roundTrip(t, p.udpClient(t), netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), dst.Port()), []byte("fine"))
	if n := d.opened.Load(); n != 1 {
		t.Fatalf("%d upstream sockets, want 1", n)
	}
}

// TestRefuseNotAskedForFakeAddresses: a datagram to a fake address is
// relayed under its name, so Config.Refuse, which counts and logs what it
// refuses, is never asked about it, though the fake range is netstackd's
// own; an address of the range that is not fake is.
func TestRefuseNotAskedForFakeAddresses(t *testing.T) {
	fake := netip.MustParseAddr("198.51.100.9")
	var asked atomic.Int32
	p := newPeer(t, Config{
		UDP:    &loopbackUDP{fail: errors.New("no upstream in this test")},
		Names:  oneName{fake: fake, name: "example.test"},
		Refuse: func(a netip.Addr) bool { asked.Add(1); return refuseOwn(a) },
	})
	client := netip.MustParseAddrPort("198.18.0.5:4000")
	quote := func() []byte { return make([]byte, 28) }
	for range 5 {
		p.st.routeUDP(client, netip.AddrPortFrom(fake, 443), []byte("quic"), quote, false)
	}
	if n := asked.Load(); n != 0 {
		t.Fatalf("Refuse asked %d times about a fake address", n)
	}
	p.st.routeUDP(client, netip.MustParseAddrPort("198.51.100.7:443"), []byte("loop?"), quote, false)
	if n := asked.Load(); n != 1 {
		t.Fatalf("Refuse asked %d times about an own address that is not fake, want 1", n)
	}
}
