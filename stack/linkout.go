package stack

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gVisor calls WritePackets with the endpoint's lock held: a SYN-ACK, a
// data segment, an ACK. Writing to the TUN there means the lock is held
// across a system call in which the kernel may run the client's whole
// receive path, wake the client, and queue its answer for our reader; on a
// two-core machine the thread holding the lock is then often not running
// while gVisor's segment processor spins on that very lock (its TryLock
// fails, the endpoint is requeued at once). Measured with short
// connections: the processor's requeue loop took two thirds of the CPU. So
// WritePackets only copies packets into an outbound queue, and one writer
// goroutine, owned by the link endpoint, makes the system calls.

// outQueueMaxBytes bounds what waits for the writer. Beyond it packets are
// dropped, as a full NIC queue drops them; TCP sends them again.
const outQueueMaxBytes = 8 << 20

// Outbound packet buffers: MTU-sized ones and GSO-sized ones.
var (
	outSmallBufs = sync.Pool{New: func() any { b := make([]byte, 0, 2048); return &b }}
	outLargeBufs = sync.Pool{New: func() any { b := make([]byte, 0, vnetHdrLen+gsoMaxSize); return &b }}
)

func getOutBuf(n int) *[]byte {
	if n <= 2048 {
		return outSmallBufs.Get().(*[]byte)
	}
	bp := outLargeBufs.Get().(*[]byte)
	if cap(*bp) < n {
		*bp = make([]byte, 0, n)
	}
	return bp
}

func putOutBuf(bp *[]byte) {
	if cap(*bp) <= 2048 {
		outSmallBufs.Put(bp)
	} else {
		outLargeBufs.Put(bp)
	}
}

// outQueue is what the writer goroutine takes from.
type outQueue struct {
	mu       sync.Mutex
	pending  []*[]byte       // packets, in order
	bytes    int             // their total length
	flushers []chan struct{} // closed once everything queued before them is written
	stopped  bool
	wake     chan struct{} // capacity 1: the writer has something to do

	dropped atomic.Uint64
}

// WritePackets queues packets from the stack for the writer, in one batch.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	q := &e.out
	list := pkts.AsSlice()
	bufs := e.writeScratch(len(list))
	for i, pkt := range list {
		n := e.offset + pkt.Size()
		if e.vnet {
			n += vnetHdrLen
		}
		bp := getOutBuf(n)
		b := (*bp)[:e.offset]
		if e.vnet {
			var h [vnetHdrLen]byte
			outboundVnetHdr(pkt).encode(h[:])
			b = append(b, h[:]...)
		}
		for _, s := range pkt.AsSlices() {
			b = append(b, s...)
		}
		*bp = b
		bufs[i] = bp
	}
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		for _, bp := range bufs {
			putOutBuf(bp)
		}
		return 0, &tcpip.ErrClosedForSend{}
	}
	accepted := 0
	for _, bp := range bufs {
		if q.bytes+len(*bp) > outQueueMaxBytes {
			putOutBuf(bp)
			q.dropped.Add(1)
			continue
		}
		q.pending = append(q.pending, bp)
		q.bytes += len(*bp)
		accepted++
	}
	q.mu.Unlock()
	e.writeScratchDone(bufs)
	select {
	case q.wake <- struct{}{}:
	default:
	}
	if accepted < len(list) {
		return accepted, &tcpip.ErrNoBufferSpace{}
	}
	return accepted, nil
}

// writeScratch lends the slice WritePackets fills; gVisor may call
// WritePackets from many goroutines at once.
func (e *linkEndpoint) writeScratch(n int) []*[]byte {
	e.writeMu.Lock()
	s := e.scratch
	e.scratch = nil
	e.writeMu.Unlock()
	if cap(s) < n {
		s = make([]*[]byte, n)
	}
	return s[:n]
}

func (e *linkEndpoint) writeScratchDone(s []*[]byte) {
	clear(s)
	e.writeMu.Lock()
	if e.scratch == nil {
		e.scratch = s[:0]
	}
	e.writeMu.Unlock()
}

// writeOutbound is the writer goroutine: it takes everything queued and
// writes it in one Device.Write, until stopOutbound.
func (e *linkEndpoint) writeOutbound() {
	q := &e.out
	var batch []*[]byte
	var bufs [][]byte
	for {
		<-q.wake
		for {
			q.mu.Lock()
			batch, q.pending = q.pending, batch[:0]
			q.bytes = 0
			flushers := q.flushers
			q.flushers = nil
			stopped := q.stopped
			q.mu.Unlock()
			if len(batch) == 0 {
				for _, f := range flushers {
					close(f)
				}
				if stopped {
					return
				}
				break
			}
			bufs = bufs[:0]
			for _, bp := range batch {
				bufs = append(bufs, *bp)
			}
			e.writeAll(bufs)
			for i, bp := range batch {
				putOutBuf(bp)
				batch[i] = nil
			}
			for _, f := range flushers {
				close(f)
			}
		}
	}
}

// writeAll writes packets, going past one the kernel refuses.
func (e *linkEndpoint) writeAll(bufs [][]byte) {
	for len(bufs) > 0 {
		n, err := e.dev.Write(bufs, e.offset)
		if err == nil {
			return
		}
		if errors.Is(err, os.ErrClosed) {
			return
		}
		e.log.Debug("write to device failed", "err", err, "written", n, "batch", len(bufs))
		bufs = bufs[min(n+1, len(bufs)):]
	}
}

// flushOutbound waits, at most limit, until what is queued now has been
// written: Stack.Close uses it so the resets of the flows it ends reach the
// clients before the device closes.
func (e *linkEndpoint) flushOutbound(limit time.Duration) {
	q := &e.out
	done := make(chan struct{})
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.flushers = append(q.flushers, done)
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// stopOutbound makes the writer write what is queued and return; later
// packets are refused.
func (e *linkEndpoint) stopOutbound() {
	q := &e.out
	q.mu.Lock()
	q.stopped = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}
