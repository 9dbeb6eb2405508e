package stack

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// kernelUDP opens plain kernel sockets on loopback: the direct fast path.
type kernelUDP struct{}

func (kernelUDP) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
}

// rawPeer is a Stack fed through a seqpacketDevice whose reads take up to
// 128 packets, as tundev's do; the test speaks raw IP packets on the other
// end of the socketpair, holding the device's gate while it writes a burst
// so that the whole burst is one read.
type rawPeer struct {
	st  *Stack
	dev *seqpacketDevice
	fd  int // the test's end
}

func newRawPeer(t *testing.T) *rawPeer {
	t.Helper()
	dev := newSeqpacketDevice(t, 1, 128, 1500)
	p := &rawPeer{dev: dev, fd: dev.far[0]}
	p.st = newTestStack(t, Config{UDP: kernelUDP{}}, dev, &redirectDialer{})
	t.Cleanup(func() {
		p.st.Close()
		unix.Close(p.fd)
	})
	return p
}

// send writes datagrams from src to dst as one burst: one device read.
func (p *rawPeer) send(t *testing.T, src, dst netip.AddrPort, payloads ...[]byte) {
	t.Helper()
	p.dev.gate.Lock()
	defer p.dev.gate.Unlock()
	buf := make([]byte, 2048)
	for _, pl := range payloads {
		if _, err := unix.Write(p.fd, packet.BuildUDP(buf, src, dst, pl)); err != nil {
			t.Fatalf("write packet: %v", err)
		}
	}
}

// receive reads the next datagram the stack wrote to the client, checking
// its headers.
func (p *rawPeer) receive(t *testing.T, deadline time.Time) (src, dst netip.AddrPort, payload []byte) {
	t.Helper()
	buf := make([]byte, 65536)
	for {
		tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
		_ = unix.SetsockoptTimeval(p.fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		n, err := unix.Read(p.fd, buf)
		if err != nil {
			t.Fatalf("read from stack: %v", err)
		}
		ip := header.IPv4(buf[:n])
		if !ip.IsValid(n) || ip.Protocol() != uint8(header.UDPProtocolNumber) {
			continue // not a UDP datagram (gVisor's own traffic)
		}
		if ip.CalculateChecksum() != 0xffff {
			t.Fatalf("packet with a bad IPv4 header checksum")
		}
		u := header.UDP(ip.Payload())
		s, d := netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4())
		if !u.IsChecksumValid(packet.TCPIPAddr(s), packet.TCPIPAddr(d), checksum.Checksum(u.Payload(), 0)) {
			t.Fatalf("datagram with a bad UDP checksum")
		}
		return netip.AddrPortFrom(s, u.SourcePort()), netip.AddrPortFrom(d, u.DestinationPort()), append([]byte(nil), u.Payload()...)
	}
}

// udpSink is a UDP server on loopback that records what it receives.
type udpSink struct {
	c    *net.UDPConn
	got  chan sinkDatagram
	addr netip.AddrPort
}

type sinkDatagram struct {
	from    netip.AddrPort
	payload []byte
}

func newUDPSink(t *testing.T) *udpSink {
	t.Helper()
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadBuffer(4 << 20)
	s := &udpSink{c: c, got: make(chan sinkDatagram, 4096), addr: c.LocalAddr().(*net.UDPAddr).AddrPort()}
	var wg sync.WaitGroup
	t.Cleanup(func() { c.Close(); wg.Wait() })
	wg.Go(func() {
		buf := make([]byte, 65536)
		for {
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			s.got <- sinkDatagram{from: from, payload: append([]byte(nil), buf[:n]...)}
		}
	})
	return s
}

func (s *udpSink) next(t *testing.T) sinkDatagram {
	t.Helper()
	select {
	case d := <-s.got:
		return d
	case <-time.After(5 * time.Second):
		t.Fatalf("no datagram reached the upstream server")
		return sinkDatagram{}
	}
}

func patterned(flow, i, size int) []byte {
	b := make([]byte, size)
	for k := range b {
		b[k] = byte(flow*31 + i*7 + k)
	}
	copy(b, fmt.Sprintf("%d/%d", flow, i))
	return b
}

// TestUDPSendBatched checks that the datagrams of one device read leave
// through one sendmmsg per association (fewer when GSO joins them), each
// intact and in order, the way issue 3's throughput item asks: before, each
// datagram cost the device reader a sendto of its own.
func TestUDPSendBatched(t *testing.T) {
	const burst = 48
	for _, tc := range []struct {
		name  string
		flows int
		size  func(i int) int
	}{
		{"one-flow-equal-sizes", 1, func(int) int { return 1000 }},
		{"one-flow-mixed-sizes", 1, func(i int) int { return 1 + i*29 }},
		{"two-flows-interleaved", 2, func(i int) int { return 600 + i%3 }},
		{"with-empty-datagrams", 1, func(i int) int { return (i % 2) * 300 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := newRawPeer(t)
			sink := newUDPSink(t)
			clients := make([]netip.AddrPort, tc.flows)
			upstream := make(map[netip.AddrPort]int) // association's socket → flow
			for f := range clients {
				clients[f] = netip.MustParseAddrPort(fmt.Sprintf("198.18.0.1:%d", 4000+f))
				// The first datagram opens the association.
				p.send(t, clients[f], sink.addr, []byte("open"))
				d := sink.next(t)
				upstream[d.from] = f
			}
			if len(upstream) != tc.flows {
				t.Fatalf("%d flows share %d upstream sockets", tc.flows, len(upstream))
			}
			// The counters move just after the kernel took the
			// datagrams: wait for the openers' to settle.
			for deadline := time.Now().Add(5 * time.Second); p.st.udp.Stats().Sent != uint64(tc.flows); {
				if time.Now().After(deadline) {
					t.Fatalf("sent counter %d after %d datagrams", p.st.udp.Stats().Sent, tc.flows)
				}
				time.Sleep(time.Millisecond)
			}
			calls, sent := p.st.udp.Stats().SendCalls, p.st.udp.Stats().Sent

			// One burst, the flows' datagrams interleaved.
			p.dev.gate.Lock()
			buf := make([]byte, 2048)
			for i := range burst {
				f := i % tc.flows
				pkt := packet.BuildUDP(buf, clients[f], sink.addr, patterned(f, i, tc.size(i)))
				if _, err := unix.Write(p.fd, pkt); err != nil {
					p.dev.gate.Unlock()
					t.Fatalf("write packet: %v", err)
				}
			}
			p.dev.gate.Unlock()

			next := make([]int, tc.flows) // the index each flow's next datagram must have
			for f := range next {
				next[f] = f
			}
			for range burst {
				d := sink.next(t)
				f, ok := upstream[d.from]
				if !ok {
					t.Fatalf("datagram from %v, an unknown upstream socket", d.from)
				}
				if want := patterned(f, next[f], tc.size(next[f])); !bytes.Equal(d.payload, want) {
					t.Fatalf("flow %d: got %d bytes %.12q, want datagram %d (%d bytes): lost, reordered or damaged",
						f, len(d.payload), d.payload, next[f], len(want))
				}
				next[f] += tc.flows
			}
			for deadline := time.Now().Add(5 * time.Second); p.st.udp.Stats().Sent-sent < burst && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if n := p.st.udp.Stats().Sent - sent; n != burst {
				t.Errorf("sent counter moved by %d, want %d", n, burst)
			}
			// One call per association; without batching it was one
			// per datagram.
			if n := p.st.udp.Stats().SendCalls - calls; n > uint64(tc.flows) {
				t.Errorf("%d datagrams of one device read took %d sendmmsg calls, want at most %d (one per association)", burst, n, tc.flows)
			}
			if n := p.st.udp.Stats().DroppedSend; n != 0 {
				t.Errorf("%d datagrams dropped on send", n)
			}
		})
	}
}

// TestUDPReceiveBatched checks the recvmmsg path: a burst from the upstream
// reaches the client whole, in order, from its true source, and once it has
// the idle association holds no receive buffer.
func TestUDPReceiveBatched(t *testing.T) {
	const burst = 200
	p := newRawPeer(t)
	sink := newUDPSink(t)
	client := netip.MustParseAddrPort("198.18.0.1:5000")
	p.send(t, client, sink.addr, []byte("open"))
	assoc := sink.next(t).from

	for i := range burst {
		if _, err := sink.c.WriteToUDPAddrPort(patterned(0, i, 1+i*7), assoc); err != nil {
			t.Fatalf("server send: %v", err)
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for i := range burst {
		src, dst, payload := p.receive(t, deadline)
		if src != sink.addr || dst != client {
			t.Fatalf("datagram %d: %v → %v, want %v → %v", i, src, dst, sink.addr, client)
		}
		if want := patterned(0, i, 1+i*7); !bytes.Equal(payload, want) {
			t.Fatalf("got %d bytes %.12q, want datagram %d (%d bytes): lost, reordered or damaged", len(payload), payload, i, len(want))
		}
	}
	if got := p.st.udp.Stats().Received; got != burst {
		t.Errorf("received counter %d, want %d", got, burst)
	}
	t.Logf("%d datagrams in %d recvmmsg calls", burst, p.st.udp.Stats().RecvCalls)
	if n := p.st.udpFlows(); n != 1 {
		t.Fatalf("%d associations, want 1", n)
	}
	// The batch goes back to the pool once written; poll briefly for the
	// association's goroutine to get there.
	for p.st.udp.Stats().RxBatchesBorrowed != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("an idle association holds %d receive batches", p.st.udp.Stats().RxBatchesBorrowed)
		}
		time.Sleep(time.Millisecond)
	}
}
