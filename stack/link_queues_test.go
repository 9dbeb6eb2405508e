package stack

import (
	"encoding/binary"
	"net/netip"
	"runtime/pprof"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// newQueuesDevice is a seqpacketDevice of n queues, each one packet a read,
// whose far ends the test's cleanup closes.
func newQueuesDevice(t testing.TB, n int) *seqpacketDevice {
	t.Helper()
	d := newSeqpacketDevice(t, n, 1, 1500)
	t.Cleanup(func() {
		for _, fd := range d.far {
			unix.Close(fd)
		}
	})
	return d
}

// newQueuesPeer is newPeer over a device of n queues: the client is a gVisor stack
// whose fdbased endpoint has one fd per queue and spreads its flows over
// them by hash, as a kernel spreads them over a multi-queue TUN.
func newQueuesPeer(t testing.TB, n int, cfg Config) (*peer, *seqpacketDevice) {
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
	return strings.Count(b.String(), "link.(*dispatcher).readInbound")
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
		r, w := p.st.link.QueueReads()[q], dev.writes[q].Load()
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
		pkt := packet.BuildUDP(make([]byte, packet.IPv4HeaderLen+packet.UDPHeaderLen+len(payload)), netip.AddrPortFrom(client, flowPort(q, f)), sink.addr, payload[:])
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
	for q, n := range p.st.link.QueueReads() {
		if n < flowsPerQueue*count {
			t.Errorf("queue %d: %d packets read, want at least the %d sent into it", q, n, flowsPerQueue*count)
		}
	}
}
