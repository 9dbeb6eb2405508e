package udpnat

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func patterned(flow, i, size int) []byte {
	b := make([]byte, size)
	for k := range b {
		b[k] = byte(flow*31 + i*7 + k)
	}
	copy(b, fmt.Sprintf("%d/%d", flow, i))
	return b
}

// TestRecvmmsgBatch checks one batch read against the socket: datagrams of
// two sources, in order, a too-long one marked truncated, and the rest left
// for the next call.
func TestRecvmmsgBatch(t *testing.T) {
	tbl := &Table{cfg: Config{Writer: &discardWriter{}}}
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
	const big = 20 // this one is longer than any link's MTU: it must not be truncated
	size := func(i int) int {
		if i == big {
			return 60000
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
			if !whole || !bytes.Equal(p, patterned(i%2, i, size(i))) {
				t.Errorf("datagram %d: %d bytes, truncated, damaged or out of order", i, len(p))
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

// discardWriter takes every packet written to the link and counts the
// datagrams.
type discardWriter struct{ written atomic.Int64 }

func (w *discardWriter) WriteRaw([]byte) { w.written.Add(1) }
func (w *discardWriter) WriteDatagrams(_, _ netip.AddrPort, payloads [][]byte) int {
	w.written.Add(int64(len(payloads)))
	return 0
}
func (w *discardWriter) MTU() uint32 { return 1500 }

// kernelUDP opens plain kernel sockets on loopback: the direct fast path.
type kernelUDP struct{}

func (kernelUDP) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
}

// newBareAssoc is a direct association on a loopback kernel socket, without
// its goroutine, for driving the batch paths by hand.
func newBareAssoc(t testing.TB) (*udpAssoc, *discardWriter) {
	t.Helper()
	w := &discardWriter{}
	log := slog.New(slog.DiscardHandler)
	tbl := New(t.Context(), Config{
		Dialer: kernelUDP{}, Writer: w, Timeout: time.Minute, Max: 16, DialTimeout: time.Second,
		Log: log, NextFlowID: func() uint64 { return 1 },
	})
	t.Cleanup(tbl.Close)
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
	return a, w
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
			a.t.Flush()
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
				a.t.Flush()
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
