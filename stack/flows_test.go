package stack

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// findFlow returns the live flow from client, if any.
func findFlow(st *Stack, proto string, client netip.AddrPort) (FlowInfo, bool) {
	for _, f := range st.Flows(0) {
		if f.Proto == proto && f.Client == client {
			return f, true
		}
	}
	return FlowInfo{}, false
}

// waitFlow polls Flows until cond holds for the flow from client (or, with
// gone, until it is gone), for up to 10s.
func waitFlow(t *testing.T, st *Stack, proto string, client netip.AddrPort, what string, cond func(FlowInfo, bool) bool) FlowInfo {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		f, ok := findFlow(st, proto, client)
		if cond(f, ok) {
			return f
		}
		if time.Now().After(deadline) {
			t.Fatalf("flow from %s: %s: last seen %+v (listed: %v)", client, what, f, ok)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestFlowsTCP: a relayed flow is listed with its addresses and live byte
// counts that grow while data moves, and leaves the list when it ends.
func TestFlowsTCP(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, echo)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
	c, err := p.dial(t, dst)
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	buf := make([]byte, 1000)
	var prev FlowInfo
	for round := 1; round <= 3; round++ {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("write: %v", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("read echo: %v", err)
		}
		want := uint64(round * len(buf))
		f := waitFlow(t, p.st, "tcp", client, "counts", func(f FlowInfo, ok bool) bool {
			return ok && f.Up == want && f.Down == want
		})
		if f.ID == 0 || f.Destination != dst || f.Upstream != net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))) ||
			f.Inbound || f.Name != "" || f.Age <= 0 || f.Age < prev.Age {
			t.Fatalf("flow listed as %+v", f)
		}
		if prev.ID != 0 && f.ID != prev.ID {
			t.Fatalf("flow id changed from %d to %d", prev.ID, f.ID)
		}
		prev = f
	}
	c.Close()
	waitFlow(t, p.st, "tcp", client, "still listed after close", func(_ FlowInfo, ok bool) bool { return !ok })
}

// TestCloseFlowTCP: CloseFlow resets both sides of a live flow: the client
// sees a RST from the stack, the upstream a reset from our socket.
func TestCloseFlowTCP(t *testing.T) {
	for _, parkAfter := range []time.Duration{0, 30 * time.Millisecond} {
		name := "running"
		if parkAfter > 0 {
			name = "parked"
		}
		t.Run(name, func(t *testing.T) {
			p := newPeer(t, Config{parkAfter: parkAfter})
			upstreamErr := make(chan error, 1)
			port := listen(t, func(c *net.TCPConn) {
				c.Write([]byte("hi"))
				_, err := io.Copy(io.Discard, c)
				upstreamErr <- err
			})
			c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
				t.Fatalf("read greeting: %v", err)
			}
			client := c.LocalAddr().(*net.TCPAddr).AddrPort()
			f := waitFlow(t, p.st, "tcp", client, "listed", func(f FlowInfo, ok bool) bool {
				return ok && (parkAfter == 0 || f.State == "idle")
			})
			if !p.st.CloseFlow(f.ID) {
				t.Fatalf("CloseFlow(%d) = false for a live flow", f.ID)
			}
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, io.EOF) ||
				!strings.Contains(err.Error(), (&tcpip.ErrConnectionReset{}).String()) {
				t.Errorf("client read after CloseFlow: %v, want a reset", err)
			}
			select {
			case err := <-upstreamErr:
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Errorf("upstream read after CloseFlow: %v, want ECONNRESET", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("upstream still open after CloseFlow")
			}
			waitFlow(t, p.st, "tcp", client, "still listed after CloseFlow", func(_ FlowInfo, ok bool) bool { return !ok })
			if p.st.CloseFlow(f.ID) {
				t.Errorf("CloseFlow(%d) = true for a flow already closed", f.ID)
			}
		})
	}
}

// TestFlowsUDP: a UDP association is listed with its first destination and
// payload bytes each way, and CloseFlow ends it.
func TestFlowsUDP(t *testing.T) {
	p := newPeer(t, Config{UDP: &loopbackUDP{}})
	c := p.udpClient(t)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), udpEcho(t))
	msg := []byte("hello, association")
	roundTrip(t, c, dst, msg)
	client := c.LocalAddr().(*net.UDPAddr).AddrPort()
	f := waitFlow(t, p.st, "udp", client, "listed", func(f FlowInfo, ok bool) bool {
		return ok && f.Up >= uint64(len(msg)) && f.Down >= uint64(len(msg))
	})
	// roundTrip may have resent: counts are whole datagrams, up as down.
	if f.ID == 0 || f.Destination != dst || f.Up%uint64(len(msg)) != 0 || f.State != "open" {
		t.Fatalf("association listed as %+v", f)
	}
	if !p.st.CloseFlow(f.ID) {
		t.Fatalf("CloseFlow(%d) = false for a live association", f.ID)
	}
	if _, ok := findFlow(p.st, "udp", client); ok {
		t.Fatal("association still listed after CloseFlow")
	}
	if p.st.CloseFlow(f.ID) {
		t.Errorf("CloseFlow(%d) = true twice", f.ID)
	}
	// The next datagram opens a new association, with a new id.
	roundTrip(t, c, dst, msg)
	g := waitFlow(t, p.st, "udp", client, "listed again", func(_ FlowInfo, ok bool) bool { return ok })
	if g.ID == f.ID {
		t.Errorf("new association kept id %d", g.ID)
	}
}

// TestFlowsMax: Flows returns at most max flows, the lowest ids, sorted.
func TestFlowsMax(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, echo)
	const n = 6
	dialMany(t, p, port, n)
	var all []FlowInfo
	for deadline := time.Now().Add(10 * time.Second); len(all) < n; all = p.st.Flows(0) {
		if time.Now().After(deadline) {
			t.Fatalf("%d flows listed, want %d", len(all), n)
		}
		time.Sleep(5 * time.Millisecond)
	}
	for i := 1; i < len(all); i++ {
		if all[i].ID <= all[i-1].ID {
			t.Fatalf("flows not sorted by id: %d then %d", all[i-1].ID, all[i].ID)
		}
	}
	got := p.st.Flows(3)
	if len(got) != 3 {
		t.Fatalf("Flows(3) gave %d flows", len(got))
	}
	for i := range got {
		if got[i].ID != all[i].ID {
			t.Errorf("Flows(3)[%d] is flow %d, want %d", i, got[i].ID, all[i].ID)
		}
	}
	if p.st.CloseFlow(all[n-1].ID + 1000) {
		t.Error("CloseFlow of an unknown id = true")
	}
}

// oneName is a fake-address table of one entry: the smallest FakeNames.
type oneName struct {
	fake netip.Addr
	name string
}

func (n oneName) IsFake(a netip.Addr) bool { return a == n.fake }
func (n oneName) Hold(netip.Addr) func()   { return func() {} }
func (n oneName) Resolve(a netip.Addr) (string, bool) {
	return n.name, a == n.fake
}

// TestFlowsFakeName: a flow to a fake address is listed with the name it
// stands for, which is what it dialed.
func TestFlowsFakeName(t *testing.T) {
	fake := netip.MustParseAddr("198.19.0.5")
	p := newPeer(t, Config{Names: oneName{fake: fake, name: "example.test"}})
	port := listen(t, echo)
	c, err := p.dial(t, netip.AddrPortFrom(fake, port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	client := c.LocalAddr().(*net.TCPAddr).AddrPort()
	f := waitFlow(t, p.st, "tcp", client, "listed", func(_ FlowInfo, ok bool) bool { return ok })
	if f.Name != "example.test" || f.Destination != netip.AddrPortFrom(fake, port) {
		t.Fatalf("flow to a fake address listed as %+v", f)
	}
	if want := net.JoinHostPort("example.test", strconv.Itoa(int(port))); p.dialer.dsts[0] != want {
		t.Fatalf("dialed %q, want %q", p.dialer.dsts[0], want)
	}
}

// TestFlowsInbound: a flow to a published port is listed as inbound, from
// the outside client to the port behind the TUN, with its bytes counted
// from the client's side.
func TestFlowsInbound(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	ln, err := gonet.ListenTCP(p.client, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1}), Port: 8002}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		c.Write([]byte("welcome")) // 7 bytes down, then echo
		io.Copy(c, c)
	}()
	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8002"))
	if _, err := outside.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadFull(outside, make([]byte, 9)); err != nil {
		t.Fatalf("read: %v", err)
	}
	client := outside.LocalAddr().(*net.TCPAddr).AddrPort()
	f := waitFlow(t, p.st, "tcp", client, "counted", func(f FlowInfo, ok bool) bool { return ok && f.Up == 2 && f.Down == 9 })
	if !f.Inbound || f.Destination != netip.MustParseAddrPort("198.18.0.1:8002") || f.Upstream != "" {
		t.Fatalf("published flow listed as %+v", f)
	}
	if !p.st.CloseFlow(f.ID) {
		t.Fatalf("CloseFlow(%d) = false", f.ID)
	}
	if _, err := io.ReadAll(outside); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("outside client after CloseFlow: %v, want ECONNRESET", err)
	}
}

// TestFlowsInboundUDP: an association with a published UDP port is listed
// as inbound, from its outside source, and CloseFlow ends it.
func TestFlowsInboundUDP(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	inside := p.serveInsideUDP(t, netip.MustParseAddrPort("198.18.0.1:5300"))
	pub := publishUDP(t, p.st, inside.addr)
	c := outsideUDP(t)
	msg := []byte("published datagram")
	outsideRoundTrip(t, c, pub, msg)
	client := c.LocalAddr().(*net.UDPAddr).AddrPort()
	f := waitFlow(t, p.st, "udp", client, "counted", func(f FlowInfo, ok bool) bool {
		return ok && f.Up >= uint64(len(msg)) && f.Down >= uint64(len(msg))
	})
	if !f.Inbound || f.Destination != inside.addr || f.Up%uint64(len(msg)) != 0 || f.State != "open" {
		t.Fatalf("published association listed as %+v", f)
	}
	if !p.st.CloseFlow(f.ID) {
		t.Fatalf("CloseFlow(%d) = false", f.ID)
	}
	if _, ok := findFlow(p.st, "udp", client); ok {
		t.Fatal("association still listed after CloseFlow")
	}
	outsideRoundTrip(t, c, pub, msg)
	if g := waitFlow(t, p.st, "udp", client, "listed again", func(_ FlowInfo, ok bool) bool { return ok }); g.ID == f.ID {
		t.Errorf("new association kept id %d", g.ID)
	}
}
