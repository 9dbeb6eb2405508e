package stack

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// burstDevice is a Device over one end of a SOCK_SEQPACKET socketpair whose
// Read returns every packet already queued (up to the batch size), as
// tundev's does. The test holds gate while it writes a burst, so that the
// whole burst is one read.
type burstDevice struct {
	f      *os.File
	rc     syscall.RawConn
	gate   sync.Mutex
	closed atomic.Bool
	mtu    int
}

func (d *burstDevice) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	count := 0
	var rerr error
	err := d.rc.Read(func(fd uintptr) bool {
		d.gate.Lock()
		defer d.gate.Unlock()
		for count < len(bufs) {
			n, err := unix.Read(int(fd), bufs[count][offset:])
			if err == unix.EAGAIN {
				break
			}
			if err != nil {
				rerr = err
				return true
			}
			sizes[count] = n
			count++
		}
		return count > 0
	})
	if d.closed.Load() {
		return count, os.ErrClosed
	}
	if err == nil {
		err = rerr
	}
	return count, err
}

func (d *burstDevice) Write(bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if _, err := d.f.Write(b[offset:]); err != nil {
			return i, err
		}
	}
	return len(bufs), nil
}

func (d *burstDevice) BatchSize() int { return 128 }
func (d *burstDevice) MTU() int       { return d.mtu }
func (d *burstDevice) Close() error {
	d.closed.Store(true)
	return d.f.Close()
}

// kernelUDP opens plain kernel sockets on loopback: the direct fast path.
type kernelUDP struct{}

func (kernelUDP) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
}

// rawPeer is a Stack fed through a burstDevice; the test speaks raw IP
// packets on the other end of the socketpair.
type rawPeer struct {
	st  *Stack
	dev *burstDevice
	fd  int // the test's end
}

func newRawPeer(t *testing.T) *rawPeer {
	t.Helper()
	fds := packetPair(t)
	f := os.NewFile(uintptr(fds[0]), "stack-side")
	rc, err := f.SyscallConn()
	if err != nil {
		t.Fatalf("syscall conn: %v", err)
	}
	p := &rawPeer{dev: &burstDevice{f: f, rc: rc, mtu: 1500}, fd: fds[1]}
	cfg := Config{Device: p.dev, Dialer: &redirectDialer{}, UDP: kernelUDP{}}
	if testing.Verbose() {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	if p.st, err = New(cfg); err != nil {
		t.Fatalf("new stack: %v", err)
	}
	t.Cleanup(func() {
		p.st.Close()
		unix.Close(fds[1])
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
		if _, err := unix.Write(p.fd, buildUDP(buf, src, dst, pl)); err != nil {
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
		if !u.IsChecksumValid(tcpipAddr(s), tcpipAddr(d), checksum.Checksum(u.Payload(), 0)) {
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
			for deadline := time.Now().Add(5 * time.Second); p.st.udp.sent.Load() != uint64(tc.flows); {
				if time.Now().After(deadline) {
					t.Fatalf("sent counter %d after %d datagrams", p.st.udp.sent.Load(), tc.flows)
				}
				time.Sleep(time.Millisecond)
			}
			calls, sent := p.st.udp.sendCalls.Load(), p.st.udp.sent.Load()

			// One burst, the flows' datagrams interleaved.
			p.dev.gate.Lock()
			buf := make([]byte, 2048)
			for i := range burst {
				f := i % tc.flows
				pkt := buildUDP(buf, clients[f], sink.addr, patterned(f, i, tc.size(i)))
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
			for deadline := time.Now().Add(5 * time.Second); p.st.udp.sent.Load()-sent < burst && time.Now().Before(deadline); {
				time.Sleep(time.Millisecond)
			}
			if n := p.st.udp.sent.Load() - sent; n != burst {
				t.Errorf("sent counter moved by %d, want %d", n, burst)
			}
			// One call per association; without batching it was one
			// per datagram.
			if n := p.st.udp.sendCalls.Load() - calls; n > uint64(tc.flows) {
				t.Errorf("%d datagrams of one device read took %d sendmmsg calls, want at most %d (one per association)", burst, n, tc.flows)
			}
			if n := p.st.udp.droppedSend.Load(); n != 0 {
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
	if got := p.st.udp.received.Load(); got != burst {
		t.Errorf("received counter %d, want %d", got, burst)
	}
	t.Logf("%d datagrams in %d recvmmsg calls", burst, p.st.udp.recvCalls.Load())
	if n := p.st.udpFlows(); n != 1 {
		t.Fatalf("%d associations, want 1", n)
	}
	// The batch goes back to the pool once written; poll briefly for the
	// association's goroutine to get there.
	for p.st.udp.rxHeld.Load() != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("an idle association holds %d receive batches", p.st.udp.rxHeld.Load())
		}
		time.Sleep(time.Millisecond)
	}
}

// TestRecvmmsgBatch checks one batch read against the socket: datagrams of
// two sources, in order, a too-long one marked truncated, and the rest left
// for the next call.
func TestRecvmmsgBatch(t *testing.T) {
	tbl := &udpTable{st: &Stack{link: &linkEndpoint{mtu: 1500}}}
	rx, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	_ = rx.SetReadBuffer(1 << 20)
	var senders [2]*net.UDPConn
	for i := range senders {
		if senders[i], err = net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)}); err != nil {
			t.Fatal(err)
		}
		defer senders[i].Close()
	}
	to := rx.LocalAddr().(*net.UDPAddr).AddrPort()
	const count = udpRxBatchMax + 9
	const big = 20 // this one is longer than the slot
	size := func(i int) int {
		if i == big {
			return 2000
		}
		return i * 35
	}
	for i := range count {
		if _, err := senders[i%2].WriteToUDPAddrPort(patterned(i%2, i, size(i)), to); err != nil {
			t.Fatal(err)
		}
	}
	rc, err := rx.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	b := tbl.getRxBatch()
	defer tbl.putRxBatch(b)
	i := 0
	for _, want := range []int{udpRxBatchMax, count - udpRxBatchMax} {
		var n int
		var errno unix.Errno
		rc.Control(func(fd uintptr) { n, errno = b.recv(fd) })
		if errno != 0 || n != want {
			t.Fatalf("recvmmsg returned %d (%v), want %d", n, errno, want)
		}
		for k := range n {
			p, whole := b.datagram(k)
			if from := b.source(k); from != senders[i%2].LocalAddr().(*net.UDPAddr).AddrPort() {
				t.Errorf("datagram %d from %v, want %v", i, from, senders[i%2].LocalAddr())
			}
			switch {
			case i == big && whole:
				t.Errorf("datagram %d of %d bytes not marked truncated", i, size(i))
			case i != big && !bytes.Equal(p, patterned(i%2, i, size(i))):
				t.Errorf("datagram %d: %d bytes, damaged or out of order", i, len(p))
			}
			i++
		}
	}
	var errno unix.Errno
	rc.Control(func(fd uintptr) { _, errno = b.recv(fd) })
	if errno != unix.EAGAIN {
		t.Errorf("an empty socket gave %v, want EAGAIN", errno)
	}
}

// discardDevice takes every packet written and counts them.
type discardDevice struct{ written atomic.Int64 }

func (d *discardDevice) Read([][]byte, []int, int) (int, error) { return 0, os.ErrClosed }
func (d *discardDevice) Write(bufs [][]byte, _ int) (int, error) {
	d.written.Add(int64(len(bufs)))
	return len(bufs), nil
}
func (d *discardDevice) BatchSize() int { return 1 }
func (d *discardDevice) MTU() int       { return 1500 }
func (d *discardDevice) Close() error   { return nil }

// newBareAssoc is a direct association on a loopback kernel socket, without
// its goroutine, for driving the batch paths by hand.
func newBareAssoc(t testing.TB) (*udpAssoc, *discardDevice) {
	t.Helper()
	dev := &discardDevice{}
	log := slog.New(slog.DiscardHandler)
	st := &Stack{log: log, link: newLinkEndpoint(dev, log)}
	tbl := newUDPTable(st, kernelUDP{}, time.Minute, 16)
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	a := &udpAssoc{t: tbl, client: netip.MustParseAddrPort("198.18.0.1:6000"), log: log, ctx: context.Background(),
		conn: c, udpConn: c}
	if err := a.openKernelSocket(); err != nil {
		t.Fatal(err)
	}
	return a, dev
}

// TestUDPBatchAllocs checks that the batch paths allocate nothing per
// datagram (nor per batch) once warm.
func TestUDPBatchAllocs(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector makes sync.Pool drop items at random")
	}
	a, dev := newBareAssoc(t)
	sink := newDiscardSink(t)
	payload := make([]byte, 1200)
	t.Run("send", func(t *testing.T) {
		allocs := testing.AllocsPerRun(100, func() {
			a.t.tx.mu.Lock()
			for range 16 {
				a.t.tx.add(a, sink, payload)
			}
			a.t.tx.mu.Unlock()
			a.t.flush()
		})
		if allocs != 0 {
			t.Errorf("%v allocations for a batch of 16 datagrams, want 0", allocs)
		}
	})
	t.Run("receive", func(t *testing.T) {
		from, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			t.Fatal(err)
		}
		defer from.Close()
		to := a.udpConn.LocalAddr().(*net.UDPAddr).AddrPort()
		r := newUDPReceiver(a)
		before := dev.written.Load()
		allocs := testing.AllocsPerRun(100, func() {
			for range 8 {
				from.WriteToUDPAddrPort(payload, to)
			}
			for got := 0; got < 8; got += r.n {
				if err := r.receive(); err != nil {
					t.Fatal(err)
				}
			}
		})
		if allocs != 0 {
			t.Errorf("%v allocations for a batch of 8 datagrams, want 0", allocs)
		}
		if dev.written.Load() == before {
			t.Errorf("nothing reached the device")
		}
	})
}

// newDiscardSink is a loopback address whose socket takes datagrams and
// never reads them (the kernel drops what its buffer cannot hold).
func newDiscardSink(t testing.TB) netip.AddrPort {
	c, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c.LocalAddr().(*net.UDPAddr).AddrPort()
}

// BenchmarkUDPSend measures queueing and sending a device read's worth of
// datagrams (16 of 1200 bytes) on an association's kernel socket.
func BenchmarkUDPSend(b *testing.B) {
	for _, size := range []int{1200, 100} {
		b.Run(fmt.Sprint(size), func(b *testing.B) {
			a, _ := newBareAssoc(b)
			sink := newDiscardSink(b)
			payload := make([]byte, size)
			b.SetBytes(16 * int64(size))
			b.ReportAllocs()
			for b.Loop() {
				a.t.tx.mu.Lock()
				for range 16 {
					a.t.tx.add(a, sink, payload)
				}
				a.t.tx.mu.Unlock()
				a.t.flush()
			}
		})
	}
}

// BenchmarkUDPSendPerDatagram is the reference for BenchmarkUDPSend: the
// same 16 datagrams with a sendto each, as the device reader sent them
// before batching.
func BenchmarkUDPSendPerDatagram(b *testing.B) {
	a, _ := newBareAssoc(b)
	sink := newDiscardSink(b)
	payload := make([]byte, 1200)
	b.SetBytes(16 * int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		for range 16 {
			a.udpConn.WriteToUDPAddrPort(payload, sink)
		}
	}
}

// BenchmarkUDPReceive measures reading 16 datagrams of 1200 bytes from an
// association's kernel socket and writing them to the device.
func BenchmarkUDPReceive(b *testing.B) {
	a, _ := newBareAssoc(b)
	from, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		b.Fatal(err)
	}
	defer from.Close()
	to := a.udpConn.LocalAddr().(*net.UDPAddr).AddrPort()
	r := newUDPReceiver(a)
	payload := make([]byte, 1200)
	b.SetBytes(16 * int64(len(payload)))
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		for range 16 {
			from.WriteToUDPAddrPort(payload, to)
		}
		b.StartTimer()
		for got := 0; got < 16; got += r.n {
			if err := r.receive(); err != nil {
				b.Fatal(err)
			}
		}
	}
}
