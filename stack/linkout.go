package stack

import (
	"encoding/binary"
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
	pending  []outPacket     // packets, in order
	bytes    int             // their total length
	flushers []chan struct{} // closed once everything queued before them is written
	stopped  bool
	wake     chan struct{} // capacity 1: the writer has something to do

	dropped atomic.Uint64
}

// outPacket is one packet waiting for the writer: copied into a pooled
// buffer, or, on a device that writes vectors and for a packet too long to
// copy cheaply, gVisor's packet itself, held by a reference until written.
type outPacket struct {
	buf  *[]byte             // the packet after e.offset, vnet header first; nil when pkt is set
	pkt  *stack.PacketBuffer // held: IncRef'd by WritePackets, DecRef'd once written or dropped
	hdr  [vnetHdrLen]byte    // the vnet header, when the device has one
	size int                 // bytes it puts on the device
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

// heldMin is the size from which a packet goes to a vector device as
// gVisor's own views instead of a copy: below it the copy into a pooled
// buffer costs less than holding the packet and gathering its pieces.
const heldMin = 2048

// WritePackets queues packets from the stack for the writer, in one batch.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	q := &e.out
	list := pkts.AsSlice()
	batch := e.writeScratch(len(list))
	for i, pkt := range list {
		op := &batch[i]
		op.size = pkt.Size()
		if e.vnet {
			op.size += vnetHdrLen
			outboundVnetHdr(pkt).encode(op.hdr[:])
		}
		if e.vec != nil && pkt.Size() >= heldMin {
			// Avoids the copy: the writer writes the views themselves
			// (writev). A ref keeps them until then.
			op.pkt = pkt.IncRef()
			continue
		}
		bp := getOutBuf(e.offset + op.size)
		b := (*bp)[:e.offset]
		if e.vnet {
			b = append(b, op.hdr[:]...)
		}
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
	accepted := 0
	for i := range batch {
		if q.bytes+batch[i].size > outQueueMaxBytes {
			batch[i].release()
			q.dropped.Add(1)
			continue
		}
		q.pending = append(q.pending, batch[i])
		q.bytes += batch[i].size
		accepted++
	}
	q.mu.Unlock()
	e.writeScratchDone(batch)
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
func (e *linkEndpoint) writeScratch(n int) []outPacket {
	e.writeMu.Lock()
	s := e.scratch
	e.scratch = nil
	e.writeMu.Unlock()
	if cap(s) < n {
		s = make([]outPacket, n)
	}
	return s[:n]
}

func (e *linkEndpoint) writeScratchDone(s []outPacket) {
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
	var sc outScratch
	for {
		<-e.out.wake
		if e.drainOutbound(&sc) {
			return
		}
	}
}

// outScratch is what one drain of the queue works in.
type outScratch struct {
	batch  []outPacket
	bufs   [][]byte   // for Device.Write: each packet whole
	vecs   [][][]byte // for a vector device: each packet's pieces
	pieces [][]byte   // what vecs' packets are sliced from
}

// drainOutbound writes what is queued until the queue is empty, and
// reports whether the queue has been stopped.
func (e *linkEndpoint) drainOutbound(sc *outScratch) (stopped bool) {
	q := &e.out
	for {
		q.mu.Lock()
		sc.batch, q.pending = q.pending, sc.batch[:0]
		q.bytes = 0
		flushers := q.flushers
		q.flushers = nil
		stopped = q.stopped
		q.mu.Unlock()
		if len(sc.batch) > 0 {
			if e.vec != nil {
				e.writeAllVectored(sc)
			} else {
				sc.bufs = sc.bufs[:0]
				for _, op := range sc.batch {
					sc.bufs = append(sc.bufs, *op.buf)
				}
				e.writeAll(sc.bufs)
				clear(sc.bufs)
			}
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

// writeAll writes packets, going past one the kernel refuses.
func (e *linkEndpoint) writeAll(bufs [][]byte) {
	writePast(e, bufs, func(b [][]byte) (int, error) { return e.writeDevice(b, e.offset) })
}

// writePast writes pkts with write, which returns how many it wrote before
// an error; a packet the kernel refuses is skipped and the rest written.
func writePast[P any](e *linkEndpoint, pkts []P, write func([]P) (int, error)) {
	for len(pkts) > 0 {
		n, err := write(pkts)
		if err == nil || errors.Is(err, os.ErrClosed) {
			return
		}
		e.log.Debug("write to device failed", "err", err, "written", n, "batch", len(pkts))
		pkts = pkts[min(n+1, len(pkts)):]
	}
}

// writeAllVectored is writeAll for a vector device: each packet goes out
// as its pieces, a vnet header first when the device has one.
func (e *linkEndpoint) writeAllVectored(sc *outScratch) {
	sc.vecs, sc.pieces = sc.vecs[:0], sc.pieces[:0]
	for i := range sc.batch {
		op := &sc.batch[i]
		start := len(sc.pieces)
		if op.pkt == nil {
			b := (*op.buf)[e.offset:]
			if e.vnet {
				sc.pieces = append(sc.pieces, b[:vnetHdrLen], b[vnetHdrLen:])
			} else {
				sc.pieces = append(sc.pieces, b)
			}
		} else {
			if e.vnet {
				sc.pieces = append(sc.pieces, op.hdr[:])
			}
			sc.pieces = append(sc.pieces, op.pkt.AsSlices()...)
		}
		sc.vecs = append(sc.vecs, sc.pieces[start:len(sc.pieces):len(sc.pieces)])
	}
	writePast(e, sc.vecs, e.writeDeviceVectored)
	clear(sc.vecs)
	clear(sc.pieces)
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

// writeDevice writes packets, each bufs[i][offset:] behind a vnet header
// when the device has one, and returns how many were written, as
// Device.Write does.
//
// On a multi-queue device every packet goes to the queue of its flow
// (flowQueue), in runs of consecutive packets for one queue. It is not for
// the kernel's sake, which takes any packet on any queue, but for our
// readers': a multi-queue TUN hands a flow's packets to the queue that last
// wrote one of that flow (tun_flow_update, tun_automq_select_queue in
// drivers/net/tun.c), so writing everything to queue 0 would pull every
// answered flow onto queue 0 and leave the other dispatchers idle. Keeping
// a flow on one queue also keeps its packets in order: one writer writes
// them in sequence, and one dispatcher reads the flow's replies.
func (e *linkEndpoint) writeDevice(bufs [][]byte, offset int) (int, error) {
	if e.mq == nil {
		return e.dev.Write(bufs, offset)
	}
	hdr := offset
	if e.vnet {
		hdr += vnetHdrLen
	}
	return writeByQueue(bufs,
		func(b []byte) int { return flowQueue(b[hdr:], e.queues) },
		func(q int, run [][]byte) (int, error) { return e.mq.WriteQueue(q, run, offset) })
}

// writeDeviceVectored is writeDevice for packets in pieces. A packet's IP
// header starts its first piece after the vnet header, which is a piece of
// its own.
func (e *linkEndpoint) writeDeviceVectored(pkts [][][]byte) (int, error) {
	if e.mq == nil {
		return e.vec.WriteVectored(pkts)
	}
	ip := 0
	if e.vnet {
		ip = 1
	}
	// The hash must see what a whole packet shows (addresses and ports),
	// whichever way gVisor split its headers, so that a flow keeps one
	// queue whether its packets were copied or not.
	var head [60 + 4]byte // the longest IPv4 header, then the ports
	return writeByQueue(pkts,
		func(p [][]byte) int {
			n := 0
			for _, piece := range p[min(ip, len(p)):] {
				n += copy(head[n:], piece)
				if n == len(head) {
					break
				}
			}
			return flowQueue(head[:n], e.queues)
		},
		e.vecQueues.WriteQueueVectored)
}

// writeByQueue writes pkts in runs of consecutive packets for one queue,
// and returns how many were written, as Device.Write does.
func writeByQueue[P any](pkts []P, queueOf func(P) int, write func(q int, run []P) (int, error)) (int, error) {
	written := 0
	for len(pkts) > 0 {
		q := queueOf(pkts[0])
		n := 1
		for n < len(pkts) && queueOf(pkts[n]) == q {
			n++
		}
		w, err := write(q, pkts[:n])
		written += w
		if err != nil {
			return written, err
		}
		pkts = pkts[n:]
	}
	return written, nil
}

// flowQueue picks one of n queues for the flow of an IP packet: a hash of
// its protocol, addresses and, for TCP and UDP, ports. Packets without
// ports (ICMP, IP fragments after the first) hash their addresses alone. A
// packet too short to read goes to queue 0.
func flowQueue(pkt []byte, n int) int {
	if n <= 1 || len(pkt) < 1 {
		return 0
	}
	var h uint64
	var l4 []byte
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < ipv4HeaderLen {
			return 0
		}
		proto := pkt[9]
		h = uint64(binary.BigEndian.Uint32(pkt[12:]))<<32 | uint64(binary.BigEndian.Uint32(pkt[16:]))
		h ^= uint64(proto)
		ihl := int(pkt[0]&0xf) * 4
		// Only an unfragmented packet or a first fragment has ports.
		if (proto == 6 || proto == 17) && binary.BigEndian.Uint16(pkt[6:])&0x1fff == 0 && ihl >= ipv4HeaderLen && len(pkt) >= ihl+4 {
			l4 = pkt[ihl:]
		}
	case 6:
		if len(pkt) < ipv6HeaderLen {
			return 0
		}
		proto := pkt[6]
		for i := 8; i < 40; i += 8 {
			h = mix64(h ^ binary.BigEndian.Uint64(pkt[i:]))
		}
		h ^= uint64(proto)
		if (proto == 6 || proto == 17) && len(pkt) >= ipv6HeaderLen+4 {
			l4 = pkt[ipv6HeaderLen:]
		}
	default:
		return 0
	}
	if l4 != nil {
		h ^= uint64(binary.BigEndian.Uint32(l4)) << 8
	}
	// The high bits of a well-mixed hash, scaled to n without a division.
	return int((mix64(h) >> 32) * uint64(n) >> 32)
}

// mix64 is the finalizer of MurmurHash3 (fmix64): every input bit flips
// about half of the output bits, so nearby addresses and ports spread.
func mix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}
