package stack

import (
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// BenchmarkTCPRelay measures bytes moved from a client stack through the
// Stack and its relay to a loopback sink: the link endpoint, gVisor's TCP and
// the relay, without a TUN.
func BenchmarkTCPRelay(b *testing.B) {
	b.Run("mtu=1500", func(b *testing.B) { benchTCPRelay(b, 1500) })
	// Packets as long as TSO segments: the path of a TUN with offloads.
	b.Run("mtu=65000", func(b *testing.B) { benchTCPRelay(b, 65000) })
}

func benchTCPRelay(b *testing.B, mtu int) {
	p := newPeerMTU(b, Config{}, mtu)
	port := listen(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	c, err := p.dial(b, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
}

// BenchmarkIdleFlows reports the heap each idle relayed TCP flow costs (both
// the client's gVisor endpoint and the relay), the figure that decides how
// many idle connections fit in the memory target.
func BenchmarkIdleFlows(b *testing.B) {
	const flows = 1000
	p := newPeer(b, Config{})
	var arrived atomic.Int64
	port := listen(b, func(c *net.TCPConn) {
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err == nil {
			arrived.Add(1)
		}
		io.Copy(io.Discard, c)
	})
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
	for b.Loop() {
		arrived.Store(0)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		conns := make([]*clientConn, 0, flows)
		for range flows {
			c, err := p.dial(b, dst)
			if err != nil {
				b.Fatalf("dial: %v", err)
			}
			conns = append(conns, c)
			c.Write([]byte{1})
		}
		// Once every flow's first byte reached the upstream, every relay
		// is running and idle.
		for deadline := time.Now().Add(30 * time.Second); arrived.Load() < flows; {
			if time.Now().After(deadline) {
				b.Fatalf("only %d of %d flows relayed their first byte", arrived.Load(), flows)
			}
			time.Sleep(10 * time.Millisecond)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		b.ReportMetric(float64(after.HeapInuse-before.HeapInuse)/flows, "heap-B/flow")
		b.ReportMetric(float64(after.StackInuse-before.StackInuse)/flows, "stack-B/flow")
		for _, c := range conns {
			c.Close()
		}
	}
}

// BenchmarkFlows measures one snapshot of the live view (Flows) with ten
// thousand idle TCP flows open: what an operator's GET /flows costs the
// stack. The upstreams are connections left in the accept queues of
// listeners that never accept, so that each flow costs one descriptor here
// (the limit may be 20000 and not ours to raise); the queues' bound
// (net.core.somaxconn, often 4096) makes it several listeners.
func BenchmarkFlows(b *testing.B) {
	const flows, perListener = 10000, 2000
	p := newPeer(b, Config{})
	var dsts []netip.AddrPort
	for range flows / perListener {
		ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			b.Fatalf("listen: %v", err)
		}
		b.Cleanup(func() { ln.Close() })
		dsts = append(dsts, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), uint16(ln.Addr().(*net.TCPAddr).Port)))
	}
	for i := range flows {
		c, err := p.dial(b, dsts[i/perListener])
		if err != nil {
			b.Fatalf("dial %d: %v", i, err)
		}
		b.Cleanup(func() { c.Close() })
	}
	for deadline := time.Now().Add(60 * time.Second); len(p.st.Flows(0)) < flows; {
		if time.Now().After(deadline) {
			b.Fatalf("only %d of %d flows relayed", len(p.st.Flows(0)), flows)
		}
		time.Sleep(10 * time.Millisecond)
	}
	b.ReportAllocs()
	for b.Loop() {
		if got := p.st.Flows(flows); len(got) != flows {
			b.Fatalf("Flows listed %d, want %d", len(got), flows)
		}
	}
}

// BenchmarkShortFlow measures one short connection through the Stack, as
// bench/connrate makes them: the client's handshake (dial-first: the
// upstream is dialed before the SYN-ACK), a request, a 128-byte reply, the
// server closing first, the client closing. What it allocates per flow is
// what the stack and the relay allocate for one (plus the client stack's
// own endpoint).
func BenchmarkShortFlow(b *testing.B) {
	p := newPeer(b, Config{})
	reply := make([]byte, 128)
	port := listen(b, func(c *net.TCPConn) {
		var req [64]byte
		if _, err := c.Read(req[:]); err != nil {
			return
		}
		c.Write(reply)
	})
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
	request := []byte("GET / HTTP/1.0\r\n\r\n")
	// The client's ports go round a range far larger than the flows in
	// TIME_WAIT: a random port that met one of them would have its SYN
	// dropped and the flow wait a second for the retransmission.
	port0 := uint16(10000)
	b.ReportAllocs()
	for b.Loop() {
		port0++
		if port0 > 60000 {
			port0 = 10000
		}
		c, err := p.dialFrom(b, port0, dst, 10*time.Second)
		if err != nil {
			b.Fatalf("dial: %v", err)
		}
		if _, err := c.Write(request); err != nil {
			b.Fatalf("write: %v", err)
		}
		n, err := io.Copy(io.Discard, c)
		if err != nil || n != int64(len(reply)) {
			b.Fatalf("read: %d bytes, %v", n, err)
		}
		c.Close()
	}
}

// BenchmarkRoundTrip measures a small request and its echo on one open
// flow: client stack, link, the Stack's gVisor endpoint, the relay, the
// upstream socket and back. It is the path of an RPC or an interactive
// session, where latency, not throughput, is what counts.
func BenchmarkRoundTrip(b *testing.B) {
	p := newPeer(b, Config{})
	port := listen(b, echo)
	c, err := p.dial(b, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	defer c.Close()
	req := make([]byte, 64)
	resp := make([]byte, 64)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(req); err != nil {
			b.Fatalf("write: %v", err)
		}
		if _, err := io.ReadFull(c, resp); err != nil {
			b.Fatalf("read: %v", err)
		}
	}
}
