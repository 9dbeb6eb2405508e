package link

import (
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netstackd/netstackd/internal/device"
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
	outLargeBufs = sync.Pool{New: func() any { b := make([]byte, 0, GSOMaxSize); return &b }}
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
	pending  []outPacket     // packets, in order
	bytes    int             // their total length
	flushers []chan struct{} // closed once everything queued before them is written
	stopped  bool
	wake     chan struct{} // capacity 1: the writer has something to do

	// Pure ACKs wait for a packet that carries them (acks.go): the writer
	// also takes from ackTimer's channel, so that it writes them after
	// ackHold when none comes. A channel timer, not AfterFunc: firing it
	// costs no goroutine.
	ackTimer *time.Timer
	ackArmed bool // ackTimer is to fire for ACKs queued since the last drain

	dropped   atomic.Uint64
	coalesced atomic.Uint64 // pure ACKs not written: a later packet carried them
}

// outPacket is one packet waiting for the writer: copied into a pooled
// buffer, or, for a packet too long to copy cheaply, gVisor's packet
// itself, held by a reference until written.
type outPacket struct {
	buf  *[]byte             // the packet; nil when pkt is set
	pkt  *stack.PacketBuffer // held: IncRef'd by WritePackets, DecRef'd once written or dropped
	meta device.Meta
	size int // bytes it puts on the device
	ack  ackInfo
}

// release gives back what p holds.
func (p *outPacket) release() {
	if p.pkt != nil {
		p.pkt.DecRef()
	} else if p.buf != nil {
		putOutBuf(p.buf)
	}
	*p = outPacket{}
}

// heldMin is the size from which a packet goes to the device as gVisor's
// own views instead of a copy: below it the copy into a pooled
// buffer costs less than holding the packet and gathering its pieces.
const heldMin = 2048

// WritePackets queues packets from the stack for the writer, in one batch.
func (e *Endpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	q := &e.out
	list := pkts.AsSlice()
	batch := e.writeScratch(len(list))
	for i, pkt := range list {
		op := &batch[i]
		op.size = pkt.Size()
		op.meta = outboundMeta(pkt)
		op.ack = classifyAck(pkt)
		if op.size >= heldMin {
			// Avoids the copy: the writer writes the views themselves
			// (writev). A ref keeps them until then.
			op.pkt = pkt.IncRef()
			continue
		}
		bp := getOutBuf(op.size)
		b := (*bp)[:0]
		for _, s := range pkt.AsSlices() {
			b = append(b, s...)
		}
		*bp = b
		op.buf = bp
	}
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		for i := range batch {
			batch[i].release()
		}
		e.writeScratchDone(batch)
		return 0, &tcpip.ErrClosedForSend{}
	}
	accepted, onlyAcks := 0, true
	for i := range batch {
		if q.bytes+batch[i].size > outQueueMaxBytes {
			batch[i].release()
			q.dropped.Add(1)
			continue
		}
		onlyAcks = onlyAcks && batch[i].ack.kind == ackPure
		q.pending = append(q.pending, batch[i])
		q.bytes += batch[i].size
		accepted++
	}
	hold := onlyAcks && accepted > 0
	if hold && !q.ackArmed {
		q.ackArmed = true
		q.ackTimer.Reset(ackHold)
	}
	q.mu.Unlock()
	e.writeScratchDone(batch)
	if !hold {
		q.wakeWriter()
	}
	if accepted < len(list) {
		return accepted, &tcpip.ErrNoBufferSpace{}
	}
	return accepted, nil
}

// wakeWriter tells the writer there is something to write.
func (q *outQueue) wakeWriter() {
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// writeScratch lends the slice WritePackets fills; gVisor may call
// WritePackets from many goroutines at once.
func (e *Endpoint) writeScratch(n int) []outPacket {
	e.writeMu.Lock()
	s := e.scratch
	e.scratch = nil
	e.writeMu.Unlock()
	if cap(s) < n {
		s = make([]outPacket, n)
	}
	return s[:n]
}

func (e *Endpoint) writeScratchDone(s []outPacket) {
	clear(s)
	e.writeMu.Lock()
	if e.scratch == nil {
		e.scratch = s[:0]
	}
	e.writeMu.Unlock()
}

// writeOutbound is the writer goroutine: it takes everything queued and
// writes it in one Device.Write, until StopOutbound.
func (e *Endpoint) writeOutbound() {
	var sc outScratch
	for {
		select {
		case <-e.out.wake:
		case <-e.out.ackTimer.C:
		}
		if e.drainOutbound(&sc) {
			return
		}
	}
}

// outScratch is what one drain of the queue works in.
type outScratch struct {
	batch  []outPacket
	vecs   [][][]byte // each packet's pieces
	pieces [][]byte   // what vecs' packets are sliced from
	metas  []device.Meta
}

// drainOutbound writes what is queued until the queue is empty, and
// reports whether the queue has been stopped.
func (e *Endpoint) drainOutbound(sc *outScratch) (stopped bool) {
	q := &e.out
	for {
		q.mu.Lock()
		sc.batch, q.pending = q.pending, sc.batch[:0]
		q.bytes = 0
		flushers := q.flushers
		q.flushers = nil
		stopped = q.stopped
		if q.ackArmed {
			// What the timer was for is in this batch. (Since Go 1.23
			// a stopped timer's channel holds no stale tick.)
			q.ackTimer.Stop()
			q.ackArmed = false
		}
		q.mu.Unlock()
		if len(sc.batch) > 0 {
			var n int
			sc.batch, n = coalesceAcks(sc.batch)
			if n > 0 {
				q.coalesced.Add(uint64(n))
			}
			e.writeAll(sc)
			for i := range sc.batch {
				sc.batch[i].release()
			}
		}
		for _, f := range flushers {
			close(f)
		}
		if len(sc.batch) == 0 {
			return stopped
		}
	}
}

// writeAll writes a drained batch, each packet as its pieces, going past
// one the device refuses.
func (e *Endpoint) writeAll(sc *outScratch) {
	sc.vecs, sc.pieces, sc.metas = sc.vecs[:0], sc.pieces[:0], sc.metas[:0]
	for i := range sc.batch {
		op := &sc.batch[i]
		start := len(sc.pieces)
		if op.pkt == nil {
			sc.pieces = append(sc.pieces, *op.buf)
		} else {
			sc.pieces = append(sc.pieces, op.pkt.AsSlices()...)
		}
		sc.vecs = append(sc.vecs, sc.pieces[start:len(sc.pieces):len(sc.pieces)])
		sc.metas = append(sc.metas, op.meta)
	}
	e.writePast(sc.vecs, sc.metas)
	clear(sc.vecs)
	clear(sc.pieces)
}

// writePast writes pkts, going past a packet the device refuses: it is
// dropped, as a NIC drops a malformed frame, and the rest are written.
func (e *Endpoint) writePast(pkts [][][]byte, metas []device.Meta) {
	for len(pkts) > 0 {
		n, err := e.dev.Write(pkts, metas)
		if err == nil || errors.Is(err, os.ErrClosed) {
			return
		}
		e.log.Debug("write to device failed", "err", err, "written", n, "batch", len(pkts))
		skip := min(n+1, len(pkts))
		pkts, metas = pkts[skip:], metas[skip:]
	}
}

// outboundMeta describes a packet gVisor built for a link with host GSO:
// every segment of a TCP endpoint carries only the pseudo-header sum in its
// checksum field (CHECKSUM_PARTIAL), and one longer than the MSS is to be
// cut by the device. Packets gVisor built without GSO (a forwarder's RST)
// are complete.
func outboundMeta(pkt *stack.PacketBuffer) device.Meta {
	g := pkt.GSOOptions
	var m device.Meta
	if g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6 {
		return m
	}
	if g.NeedsCsum {
		m.NeedsCsum = true
		m.CsumStart = g.L3HdrLen
		m.CsumOffset = g.CsumOffset
	}
	if pkt.Data().Size() > int(g.MSS) {
		m.GSO = device.GSOTCPv4
		if g.Type == stack.GSOTCPv6 {
			m.GSO = device.GSOTCPv6
		}
		m.GSOSize = g.MSS
		m.HdrLen = uint16(pkt.HeaderSize())
	}
	return m
}

// CoalescedAcks is the number of pure ACKs toward the device that were not
// written because a later packet of their flow carried them.
func (e *Endpoint) CoalescedAcks() uint64 { return e.out.coalesced.Load() }

// DroppedOutbound is the number of packets toward the device dropped by a
// full outbound queue.
func (e *Endpoint) DroppedOutbound() uint64 { return e.out.dropped.Load() }

// FlushOutbound waits, at most limit, until what is queued now has been
// written: Stack.Close uses it so the resets of the flows it ends reach the
// clients before the device closes.
func (e *Endpoint) FlushOutbound(limit time.Duration) {
	q := &e.out
	done := make(chan struct{})
	q.mu.Lock()
	if q.stopped {
		q.mu.Unlock()
		return
	}
	q.flushers = append(q.flushers, done)
	q.mu.Unlock()
	q.wakeWriter()
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
}

// StopOutbound makes the writer write what is queued and return; later
// packets are refused.
func (e *Endpoint) StopOutbound() {
	q := &e.out
	q.mu.Lock()
	q.stopped = true
	q.mu.Unlock()
	q.wakeWriter()
}
