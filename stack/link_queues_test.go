package stack

import (
	"bytes"
	"encoding/binary"
	"log/slog"
	"net/netip"
	"os"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// queuesDevice is a multiQueueDevice over n SOCK_SEQPACKET socketpairs, one
// per queue: real kernel objects that keep packet boundaries, as the queues
// of a multi-queue TUN do. far holds the other ends, for the test's client.
type queuesDevice struct {
	files  []*os.File
	far    []int
	writes []atomic.Int64 // packets written to each queue
	mtu    int
}

var _ multiQueueDevice = (*queuesDevice)(nil)

func newQueuesDevice(t testing.TB, n int) *queuesDevice {
	t.Helper()
	d := &queuesDevice{writes: make([]atomic.Int64, n), mtu: 1500}
	for range n {
		fds := packetPair(t)
		d.files = append(d.files, os.NewFile(uintptr(fds[0]), "stack-side"))
		d.far = append(d.far, fds[1])
	}
	t.Cleanup(func() {
		for _, fd := range d.far {
			unix.Close(fd)
		}
	})
	return d
}

func (d *queuesDevice) NumQueues() int { return len(d.files) }

func (d *queuesDevice) ReadQueue(q int, bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := d.files[q].Read(bufs[0][offset:])
	if err != nil {
		return 0, err
	}
	sizes[0] = n
	return 1, nil
}

func (d *queuesDevice) WriteQueue(q int, bufs [][]byte, offset int) (int, error) {
	for i, b := range bufs {
		if _, err := d.files[q].Write(b[offset:]); err != nil {
			return i, err
		}
		d.writes[q].Add(1)
	}
	return len(bufs), nil
}

func (d *queuesDevice) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	return d.ReadQueue(0, bufs, sizes, offset)
}

func (d *queuesDevice) Write(bufs [][]byte, offset int) (int, error) {
	return d.WriteQueue(0, bufs, offset)
}

func (d *queuesDevice) BatchSize() int { return 1 }
func (d *queuesDevice) MTU() int       { return d.mtu }

func (d *queuesDevice) Close() error {
	for _, f := range d.files {
		f.Close()
	}
	return nil
}

// newQueuesPeer is newPeer over a queuesDevice: the client is a gVisor stack
// whose fdbased endpoint has one fd per queue and spreads its flows over
// them by hash, as a kernel spreads them over a multi-queue TUN.
func newQueuesPeer(t testing.TB, n int, cfg Config) (*peer, *queuesDevice) {
	t.Helper()
	dev := newQueuesDevice(t, n)
	p := &peer{dialer: &redirectDialer{}}
	p.st = newTestStack(t, cfg, dev, p.dialer)
	p.client = newClientStack(t, dev.far)
	// Registered after newQueuesDevice's cleanup, so this runs first: the
	// far ends close only once both stacks are done with them.
	t.Cleanup(func() {
		p.st.Close()
		p.client.Close()
		p.client.Wait()
	})
	return p, dev
}

// dispatchers counts the goroutines running a queue dispatcher.
func dispatchers() int {
	var b strings.Builder
	_ = pprof.Lookup("goroutine").WriteTo(&b, 2) // one entry per goroutine
	return strings.Count(b.String(), "(*queueDispatcher).readInbound")
}

// waitDispatchers waits until want dispatcher goroutines run, and reports
// how many do in the end: a goroutine just started by WaitGroup.Go shows
// the WaitGroup's wrapper until it is first scheduled.
func waitDispatchers(want int) int {
	deadline := time.Now().Add(5 * time.Second)
	for {
		n := dispatchers()
		if n == want || time.Now().After(deadline) {
			return n
		}
		time.Sleep(time.Millisecond)
	}
}

// TestLinkQueues runs parallel TCP flows over a device of several queues:
// every flow's bytes come back intact, every queue is read and written,
// and Close stops every dispatcher.
func TestLinkQueues(t *testing.T) {
	// The client picks a queue per flow at random: with 64 flows, the chance
	// that one of 4 queues gets none is 4·(3/4)^64, about 4e-8 (it was 0.4 %
	// with 24, and showed up in runs).
	const queues, flows, size = 4, 64, 96 << 10
	before := dispatchers()
	p, dev := newQueuesPeer(t, queues, Config{})
	if got := waitDispatchers(before+queues) - before; got != queues {
		t.Fatalf("%d dispatcher goroutines running, want one per queue (%d)", got, queues)
	}
	port := listen(t, echo)
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for i := range flows {
		wg.Go(func() {
			dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
			if i%2 == 1 {
				dst = netip.AddrPortFrom(netip.MustParseAddr("2001:db8::2"), port)
			}
			errs <- echoFlow(t, p, dst, i, size)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for q := range queues {
		r, w := p.st.link.queueReads[q].Load(), dev.writes[q].Load()
		t.Logf("queue %d: %d packets read, %d written", q, r, w)
		if r == 0 {
			t.Errorf("queue %d: nothing read: its dispatcher delivered nothing", q)
		}
		if w == 0 {
			t.Errorf("queue %d: nothing written: flows are not spread over the queues", q)
		}
	}
	p.st.Close()
	if got := waitDispatchers(before) - before; got != 0 {
		t.Errorf("%d dispatcher goroutines still running after Close", got)
	}
}

// TestLinkQueuesUDP sends datagrams of many flows into every queue at once,
// so that the dispatchers queue for upstream sockets and flush (endBatch)
// concurrently: every datagram reaches the upstream, and each flow's in
// order. Under -race it checks the send queue's locking.
func TestLinkQueuesUDP(t *testing.T) {
	const queues, flowsPerQueue, count = 4, 4, 200
	p, dev := newQueuesPeer(t, queues, Config{UDP: kernelUDP{}})
	sink := newUDPSink(t)
	client := netip.MustParseAddr("198.18.0.1")
	flowPort := func(q, f int) uint16 { return uint16(20000 + q*100 + f) }
	send := func(q, f, i int) error {
		var payload [64]byte
		binary.BigEndian.PutUint16(payload[0:], uint16(q*flowsPerQueue+f))
		binary.BigEndian.PutUint32(payload[2:], uint32(i))
		pkt := buildUDP(make([]byte, ipv4HeaderLen+udpHeaderLen+len(payload)), netip.AddrPortFrom(client, flowPort(q, f)), sink.addr, payload[:])
		for {
			_, err := unix.Write(dev.far[q], pkt)
			if err != unix.EAGAIN && err != unix.ENOBUFS {
				return err
			}
			time.Sleep(time.Millisecond)
		}
	}
	// The first datagram of each flow opens its association; the rest
	// follow once it is open, so none waits in the association's small
	// queue for the socket.
	total := queues * flowsPerQueue
	for q := range queues {
		for f := range flowsPerQueue {
			if err := send(q, f, 0); err != nil {
				t.Fatalf("write: %v", err)
			}
		}
	}
	next := make([]uint32, total)
	for range total {
		d := sink.next(t)
		flow := binary.BigEndian.Uint16(d.payload)
		if int(flow) >= total || next[flow] != 0 {
			t.Fatalf("unexpected first datagram of flow %d", flow)
		}
		next[flow] = 1
	}
	var wg sync.WaitGroup
	for q := range queues {
		wg.Go(func() {
			for i := 1; i < count; i++ {
				for f := range flowsPerQueue {
					if err := send(q, f, i); err != nil {
						t.Errorf("queue %d: write: %v", q, err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	for range total * (count - 1) {
		d := sink.next(t)
		flow := binary.BigEndian.Uint16(d.payload)
		seq := binary.BigEndian.Uint32(d.payload[2:])
		if int(flow) >= total || seq != next[flow] {
			t.Fatalf("flow %d: datagram %d arrived, want %d (lost or reordered)", flow, seq, next[flow])
		}
		next[flow]++
	}
	for q := range queues {
		if p.st.link.queueReads[q].Load() < flowsPerQueue*count {
			t.Errorf("queue %d: %d packets read, want at least the %d sent into it", q, p.st.link.queueReads[q].Load(), flowsPerQueue*count)
		}
	}
}

// TestFlowQueue checks the queue choice for outbound packets: one flow, one
// queue, whatever else the packet says; flows spread over all queues.
func TestFlowQueue(t *testing.T) {
	src4, dst4 := netip.MustParseAddrPort("192.0.2.2:443"), netip.MustParseAddrPort("198.18.0.1:40000")
	src6, dst6 := netip.MustParseAddrPort("[2001:db8::2]:443"), netip.MustParseAddrPort("[fd00:1898::1]:40000")
	udp := func(src, dst netip.AddrPort, n int) []byte {
		hl := ipHeaderLen(dst.Addr())
		return buildUDP(make([]byte, hl+udpHeaderLen+n), src, dst, make([]byte, n))
	}
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
	}{
		{"ipv4", src4, dst4},
		{"ipv6", src6, dst6},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, n := range []int{2, 3, 4, 16} {
				// The same flow with any payload: the same queue.
				want := flowQueue(udp(tc.src, tc.dst, 10), n)
				for _, size := range []int{0, 1, 100, 1400} {
					if got := flowQueue(udp(tc.src, tc.dst, size), n); got != want {
						t.Errorf("n=%d: %d-byte datagram on queue %d, the flow's other packets on %d", n, size, got, want)
					}
				}
				// Flows differing only in the client port cover
				// every queue, each about evenly.
				hits := make([]int, n)
				const flows = 4096
				for p := range flows {
					dst := netip.AddrPortFrom(tc.dst.Addr(), uint16(30000+p))
					q := flowQueue(udp(tc.src, dst, 10), n)
					if q < 0 || q >= n {
						t.Fatalf("n=%d: queue %d out of range", n, q)
					}
					hits[q]++
				}
				for q, h := range hits {
					if h < flows/n/2 || h > flows/n*3/2 {
						t.Errorf("n=%d: queue %d got %d of %d flows: %v", n, q, h, flows, hits)
					}
				}
			}
		})
	}
	t.Run("short", func(t *testing.T) {
		for _, pkt := range [][]byte{nil, {0x45}, bytes.Repeat([]byte{0x60}, 39), {0x10, 0, 0}} {
			if got := flowQueue(pkt, 4); got != 0 {
				t.Errorf("flowQueue(% x) = %d, want 0 for a packet it cannot read", pkt, got)
			}
		}
	})
	t.Run("one queue", func(t *testing.T) {
		if got := flowQueue(udp(src4, dst4, 10), 1); got != 0 {
			t.Errorf("flowQueue with one queue = %d", got)
		}
	})
}

// TestWriteDeviceRuns checks that a batch of packets of several flows is
// written queue by queue with nothing lost or reordered within a queue.
func TestWriteDeviceRuns(t *testing.T) {
	const queues = 4
	dev := newQueuesDevice(t, queues)
	t.Cleanup(func() { dev.Close() })
	e := newLinkEndpoint(dev, slog.New(slog.DiscardHandler))
	if e.queues != queues || e.mq == nil {
		t.Fatalf("link sees %d queues, want %d", e.queues, queues)
	}
	var bufs [][]byte
	want := make([][][]byte, queues)
	for i := range 64 {
		src := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), 53)
		dst := netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), uint16(40000+i%7))
		payload := []byte{byte(i)}
		pkt := buildUDP(make([]byte, ipv4HeaderLen+udpHeaderLen+1), src, dst, payload)
		bufs = append(bufs, pkt)
		q := flowQueue(pkt, queues)
		want[q] = append(want[q], pkt)
	}
	n, err := e.writeDevice(bufs, 0)
	if err != nil || n != len(bufs) {
		t.Fatalf("writeDevice = %d, %v; want %d, nil", n, err, len(bufs))
	}
	buf := make([]byte, 2048)
	for q := range queues {
		for i, w := range want[q] {
			m, err := unix.Read(dev.far[q], buf)
			if err != nil {
				t.Fatalf("queue %d: read packet %d: %v", q, i, err)
			}
			if !bytes.Equal(buf[:m], w) {
				t.Fatalf("queue %d: packet %d differs", q, i)
			}
		}
		if _, _, err := unix.Recvfrom(dev.far[q], buf, unix.MSG_DONTWAIT); err != unix.EAGAIN {
			t.Errorf("queue %d: more packets than its flows sent (%v)", q, err)
		}
	}
}
