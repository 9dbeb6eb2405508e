package stack

import (
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// forgedSYN is an IPv4 TCP SYN from src to dst, as hping3 -S --rand-source
// sends: no client stands behind src to answer the SYN-ACK.
func forgedSYN(src, dst netip.AddrPort) []byte {
	const tcpLen = header.TCPMinimumSize
	b := make([]byte, header.IPv4MinimumSize+tcpLen)
	ip := header.IPv4(b)
	ip.Encode(&header.IPv4Fields{
		TotalLength: uint16(len(b)),
		TTL:         64,
		Protocol:    uint8(header.TCPProtocolNumber),
		SrcAddr:     tcpip.AddrFrom4(src.Addr().As4()),
		DstAddr:     tcpip.AddrFrom4(dst.Addr().As4()),
	})
	ip.SetChecksum(^ip.CalculateChecksum())
	tcp := header.TCP(b[header.IPv4MinimumSize:])
	tcp.Encode(&header.TCPFields{
		SrcPort:    src.Port(),
		DstPort:    dst.Port(),
		SeqNum:     rand.Uint32(),
		DataOffset: tcpLen,
		Flags:      header.TCPFlagSyn,
		WindowSize: 64240,
	})
	xsum := header.PseudoHeaderChecksum(header.TCPProtocolNumber, ip.SourceAddress(), ip.DestinationAddress(), tcpLen)
	tcp.SetChecksum(^checksum.Checksum(tcp, xsum))
	return b
}

// randomSource is a source address no client stands behind: 10.0.0.0/8,
// which the client stack of a peer does not hold.
func randomSource() netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom4([4]byte{10, byte(rand.N(256)), byte(rand.N(256)), byte(1 + rand.N(254))}), uint16(1024+rand.N(60000)))
}

// flood writes a SYN from each source toward dst into the stack's device,
// as a client behind the TUN would.
func (p *peer) flood(t *testing.T, sources []netip.AddrPort, dst netip.AddrPort) {
	t.Helper()
	for _, src := range sources {
		if _, err := unix.Write(p.dev.far[0], forgedSYN(src, dst)); err != nil {
			t.Fatalf("write forged SYN: %v", err)
		}
	}
}

// countingServer is the upstream of a flood test: it counts the connections
// it accepted and how each one ended.
type countingServer struct {
	port             uint16
	accepted, resets atomic.Int64
	ended            chan struct{} // one value per ended connection
}

func newCountingServer(t *testing.T) *countingServer {
	s := &countingServer{ended: make(chan struct{}, 1<<12)}
	s.port = listen(t, func(c *net.TCPConn) {
		s.accepted.Add(1)
		_, err := io.Copy(io.Discard, c)
		if errors.Is(err, syscall.ECONNRESET) {
			s.resets.Add(1)
		}
		s.ended <- struct{}{}
	})
	return s
}

// waitEnded waits for n connections to end, or fails after d.
func (s *countingServer) waitEnded(t *testing.T, n int, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for i := range n {
		select {
		case <-s.ended:
		case <-deadline:
			t.Fatalf("%d of %d upstream connections ended within %v", i, n, d)
		}
	}
}

// Issue 19: about 1,100 SYNs from forged random sources made dial-first open
// an upstream connection for each handshake slot and hold it, with the slot,
// for gVisor's 127 s of SYN-ACK retries, so no new connection got through
// for two minutes. Now the upstream sees at most MaxInFlight connections,
// each reset once the handshake times out, and a real client gets through
// within seconds of the flood.
func TestSYNFloodForgedSources(t *testing.T) {
	for _, acceptFirst := range []bool{false, true} {
		t.Run(handshakeOrder(acceptFirst), func(t *testing.T) { testSYNFloodForgedSources(t, acceptFirst) })
	}
}

func testSYNFloodForgedSources(t *testing.T, acceptFirst bool) {
	const maxInFlight = 32
	p := newPeer(t, Config{MaxInFlight: maxInFlight, AcceptFirst: acceptFirst})
	srv := newCountingServer(t)
	// Before the server's cleanup, which waits for its connections to end.
	t.Cleanup(func() { p.st.Close() })
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), srv.port)

	sources := make([]netip.AddrPort, 1100)
	for i := range sources {
		sources[i] = randomSource()
	}
	p.flood(t, sources, dst)

	start := time.Now()
	c, err := p.dialFrom(t, 0, dst, 10*time.Second)
	if err != nil {
		t.Fatalf("a real client after the flood: %v (after %v)", err, time.Since(start))
	}
	took := time.Since(start)
	c.Close()
	t.Logf("a real client connected %v after 1,100 forged SYNs; the upstream accepted %d connections", took, srv.accepted.Load())
	// The default HandshakeTimeout frees the table 3 s after the flood;
	// the client's SYN retransmission at 3 s (or 7 s) then finds room.
	if took > 8*time.Second {
		t.Errorf("a real client waited %v to connect after the flood", took)
	}
	// The real client's own connection is one of them.
	if got := srv.accepted.Load(); got > maxInFlight+1 {
		t.Errorf("the upstream accepted %d connections for forged sources, want at most MaxInFlight %d", got-1, maxInFlight)
	}
	// Every connection opened for a forged source was reset, none left open.
	forged := int(srv.accepted.Load()) - 1
	srv.waitEnded(t, forged+1, 5*time.Second)
	if got := srv.resets.Load(); got < int64(forged) {
		t.Errorf("%d upstream connections reset, want the %d opened for forged sources", got, forged)
	}
	if got := p.st.handshakeTimeouts.Load(); got < uint64(forged) {
		t.Errorf("%d handshakes timed out, want at least %d", got, forged)
	}
}

// One source may hold MaxInFlightPerSource handshakes, not the whole table:
// a client at another address connects at once while they are held.
func TestSYNFloodOneSourceCapped(t *testing.T) {
	const maxInFlight, perSource = 64, 8
	p := newPeer(t, Config{MaxInFlight: maxInFlight, MaxInFlightPerSource: perSource, HandshakeTimeout: time.Minute})
	srv := newCountingServer(t)
	// Before the server's cleanup, which waits for its connections to end.
	t.Cleanup(func() { p.st.Close() })
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), srv.port)

	// An IPv4 address, every port: one source.
	sources := make([]netip.AddrPort, 200)
	for i := range sources {
		sources[i] = netip.AddrPortFrom(netip.MustParseAddr("10.1.2.3"), uint16(20000+i))
	}
	p.flood(t, sources, dst)
	// Wait until every SYN is accounted for: perSource handshakes half
	// open, the rest dropped by the cap or, arriving while the table was
	// full of requests whose handler had not yet run, by the forwarder.
	dropped := func() uint64 {
		return p.st.sources.dropped.Load() + p.st.s.Stats().TCP.ForwardMaxInFlightDrop.Value()
	}
	deadline := time.Now().Add(5 * time.Second)
	for (p.st.halfOpen.Load() < perSource || dropped() < uint64(len(sources)-perSource)) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}

	start := time.Now()
	c, err := p.dialFrom(t, 0, dst, 5*time.Second)
	if err != nil {
		t.Fatalf("a client at another address while one source floods: %v", err)
	}
	c.Close()
	if d := time.Since(start); d > time.Second {
		t.Errorf("a client at another address waited %v", d)
	}
	// The server's accept loop counts the client's connection soon after
	// the client's connect returned.
	for srv.accepted.Load() < perSource+1 && time.Since(start) < 5*time.Second {
		time.Sleep(10 * time.Millisecond)
	}
	if got := srv.accepted.Load(); got != perSource+1 {
		t.Errorf("the upstream accepted %d connections, want the %d of the flooding source's cap and the client's", got, perSource+1)
	}
	if want := uint64(len(sources) - perSource); dropped() < want {
		t.Errorf("%d SYNs dropped, want at least %d", dropped(), want)
	}
	// The held handshakes' upstreams end with the stack, before the server
	// waits for them.
	p.closeWithin(t, 2*time.Second, "handshakes half open")
}

func TestSourceOf(t *testing.T) {
	for _, tc := range []struct{ a, want string }{
		{"192.0.2.7", "192.0.2.7/32"},
		{"::ffff:192.0.2.7", "192.0.2.7/32"},
		{"2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"},
		{"2001:db8:1:2::99", "2001:db8:1:2::/64"},
	} {
		if got := sourceOf(netip.MustParseAddr(tc.a)); got.String() != tc.want {
			t.Errorf("sourceOf(%s) = %s, want %s", tc.a, got, tc.want)
		}
	}
}

// Close under a flood does not wait for half-open handshakes to time out:
// with a minute's HandshakeTimeout every slot is held when Close starts, and
// it returns within a second or two, resetting the upstream connections.
func TestCloseDuringSYNFlood(t *testing.T) {
	const maxInFlight = 64
	p := newPeer(t, Config{MaxInFlight: maxInFlight, HandshakeTimeout: time.Minute})
	srv := newCountingServer(t)
	// Before the server's cleanup, which waits for its connections to end.
	t.Cleanup(func() { p.st.Close() })
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), srv.port)
	sources := make([]netip.AddrPort, 1100)
	for i := range sources {
		sources[i] = randomSource()
	}
	p.flood(t, sources, dst)
	// Every slot's dial has returned and its handshake waits for an ACK
	// that will not come. (A dial Close cancels as it completes is closed
	// by Go with a FIN, not a reset.)
	deadline := time.Now().Add(5 * time.Second)
	for (p.st.halfOpen.Load() < maxInFlight || srv.accepted.Load() < maxInFlight) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := srv.accepted.Load(); got != maxInFlight || p.st.halfOpen.Load() != maxInFlight {
		t.Fatalf("%d upstream connections and %d handshakes half open before Close, want the %d of a full table", got, p.st.halfOpen.Load(), maxInFlight)
	}
	// More SYNs while Close runs: none may hold it up.
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 200 {
			if _, err := unix.Write(p.dev.far[0], forgedSYN(randomSource(), dst)); err != nil {
				return
			}
		}
	})
	start := time.Now()
	p.closeWithin(t, 2*time.Second, "handshakes half open")
	t.Logf("Close took %v with %d handshakes half open", time.Since(start), maxInFlight)
	wg.Wait()
	srv.waitEnded(t, int(srv.accepted.Load()), 5*time.Second)
	if got, want := srv.resets.Load(), srv.accepted.Load(); got != want {
		t.Errorf("%d of %d upstream connections reset by Close", got, want)
	}
}
