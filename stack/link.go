package stack

import (
	"errors"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// Device is the packet device the stack is fed by: whole IP packets, read and
// written in batches. The shape is wireguard-go's tun.Device, so a device
// that splits GSO segments can return many packets from one read; offset is
// head-room the device may use in front of each packet. *tundev.Device
// satisfies it.
type Device interface {
	Read(bufs [][]byte, sizes []int, offset int) (int, error)
	Write(bufs [][]byte, offset int) (int, error)
	BatchSize() int
	MTU() int
	Close() error
}

// offloadDevice is a Device opened with a virtio_net_hdr in front of every
// packet (IFF_VNET_HDR), so that one read or write can carry a TCP segment
// of up to 64 KiB. *tundev.Device satisfies it.
type offloadDevice interface {
	// VnetHdrLen is the header length in front of every packet read and
	// written; 0 means none.
	VnetHdrLen() int
	// TSO reports whether the kernel takes and gives TCP segments longer
	// than the MTU.
	TSO() bool
}

// multiQueueDevice is a Device of several queues, such as a multi-queue TUN
// (IFF_MULTI_QUEUE): the kernel spreads flows over the queues, and the link
// reads each queue with a dispatcher goroutine of its own. Read and Write
// of the Device are then queue 0's. *tundev.Device satisfies it.
type multiQueueDevice interface {
	// NumQueues is the number of queues; 1 means Read and Write are all.
	NumQueues() int
	// ReadQueue is Read on queue q. Queues are read concurrently, each by
	// one goroutine.
	ReadQueue(q int, bufs [][]byte, sizes []int, offset int) (int, error)
	// WriteQueue is Write on queue q.
	WriteQueue(q int, bufs [][]byte, offset int) (int, error)
}

// vectorDevice is a Device that writes a packet from the pieces it is made
// of (writev), so the link need not copy gVisor's header and payload views
// into one buffer. Packets are as for Write: a vnet header first when the
// device has one. *tundev.Device satisfies it.
type vectorDevice interface {
	WriteVectored(pkts [][][]byte) (int, error)
}

// vectorQueueDevice is a multiQueueDevice that also writes vectors to each
// queue. *tundev.Device satisfies it.
type vectorQueueDevice interface {
	WriteQueueVectored(q int, pkts [][][]byte) (int, error)
}

// maxPacket is the largest IP packet a read may return; reading into anything
// smaller would truncate a packet silently.
const maxPacket = 1 << 16

// linkEndpoint is the gVisor NIC backed by a Device. Inbound packets are read
// by one dispatcher goroutine per device queue, which it owns; outbound
// packets are queued by WritePackets for one writer goroutine, which it owns
// too (linkout.go).
type linkEndpoint struct {
	dev Device
	mq  multiQueueDevice // dev, when it has more than one queue; else nil
	// vec is dev when it writes vectors (and, with several queues, so does
	// vecQueues); else nil, and outbound packets are copied whole.
	vec       vectorDevice
	vecQueues vectorQueueDevice
	queues    int // device queues, each with a dispatcher: 1 or more
	log       *slog.Logger
	mtu       uint32
	offset    int
	vnet      bool // packets carry a vnet header (vnetHdrLen bytes)
	tso       bool // gVisor may hand us TCP segments of up to gsoMaxSize
	uso       bool // datagrams of one flow may go out as one packet

	droppedVnet atomic.Uint64 // inbound packets whose vnet header made no sense
	// queueReads counts the packets read from each queue, so tests and
	// operators can see how the kernel spread the flows.
	queueReads []queueCounter

	// intercept, when set before start, sees every inbound packet first and
	// reports whether it took it (echo requests sent on for real).
	// verified says the packet's checksums were already checked (a device
	// with a vnet header: by the kernel, or by deliverFrame).
	intercept func(pkt []byte, verified bool) bool
	// endBatch, when set before start, is called after the packets of one
	// device read have been delivered, so that what they queued (datagrams
	// for one upstream socket) can leave in one system call. With several
	// queues, every dispatcher calls it, concurrently with the others and
	// with their deliveries: it must take a lock of its own (udpTx.mu).
	endBatch func()

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	wg sync.WaitGroup // the inbound dispatchers and the outbound writer

	out     outQueue   // packets from gVisor for the writer (linkout.go)
	writeMu sync.Mutex // guards scratch
	scratch []outPacket
	rawBufs sync.Pool // *[]byte for writeRaw behind a vnet header
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

func newLinkEndpoint(dev Device, log *slog.Logger) *linkEndpoint {
	e := &linkEndpoint{dev: dev, log: log, mtu: uint32(dev.MTU()), queues: 1}
	e.out.wake = make(chan struct{}, 1)
	if mq, ok := dev.(multiQueueDevice); ok && mq.NumQueues() > 1 {
		e.mq, e.queues = mq, mq.NumQueues()
	}
	e.queueReads = make([]queueCounter, e.queues)
	if v, ok := dev.(vectorDevice); ok {
		e.vec = v
		if e.mq != nil {
			if vq, ok := dev.(vectorQueueDevice); ok {
				e.vecQueues = vq
			} else {
				e.vec = nil
			}
		}
	}
	if od, ok := dev.(offloadDevice); ok {
		switch n := od.VnetHdrLen(); n {
		case 0:
		case vnetHdrLen:
			e.vnet = true
			e.tso = od.TSO()
			if u, ok := dev.(interface{ USO() bool }); ok {
				e.uso = u.USO()
			}
		default:
			// Only the 10-byte form exists on a TUN we open; a longer
			// one would shift every packet.
			log.Warn("device vnet header length not understood; offloads off", "len", n)
		}
	}
	return e
}

// start begins delivering packets read from the device, one dispatcher per
// queue. It returns at once; the dispatchers stop when the device is closed.
func (e *linkEndpoint) start() {
	for q := range e.queues {
		d := &queueDispatcher{e: e, q: q}
		e.wg.Go(d.readInbound)
	}
	e.wg.Go(e.writeOutbound)
}

// queueCounter is a counter of one dispatcher's, alone on its cache line
// (64 bytes on the CPUs we run on), so that dispatchers on different CPUs
// counting at once do not take the line from each other.
type queueCounter struct {
	atomic.Uint64
	_ [56]byte
}

// queueDispatcher reads one queue of the device and delivers what it reads
// to gVisor or to the stack's shorter paths (intercept). Its buffers are its
// own, so dispatchers of different queues run in parallel: gVisor's NIC
// takes packets from many goroutines at once (its fdbased endpoint runs one
// dispatcher per fd the same way), and what the shorter paths share they
// guard with locks of their own. A flow's packets all arrive on one queue,
// so a flow is still delivered in order.
type queueDispatcher struct {
	e        *linkEndpoint
	q        int
	splitBuf []byte // for datagrams cut from a USO packet
}

// read reads one batch from the dispatcher's queue.
func (d *queueDispatcher) read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if d.e.mq != nil {
		return d.e.mq.ReadQueue(d.q, bufs, sizes, offset)
	}
	return d.e.dev.Read(bufs, sizes, offset)
}

func (d *queueDispatcher) readInbound() {
	e := d.e
	n := max(e.dev.BatchSize(), 1)
	bufs := make([][]byte, n)
	sizes := make([]int, n)
	room := maxPacket
	if e.vnet {
		room += vnetHdrLen
	}
	for i := range bufs {
		bufs[i] = make([]byte, e.offset+room)
	}
	reads := &e.queueReads[d.q]
	for {
		count, err := d.read(bufs, sizes, e.offset)
		for i := range count {
			d.deliverFrame(bufs[i][e.offset : e.offset+sizes[i]])
		}
		if count > 0 {
			reads.Add(uint64(count))
			if e.endBatch != nil {
				e.endBatch()
			}
		}
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				e.log.Error("read from device stopped", "queue", d.q, "err", err)
			}
			return
		}
	}
}

// deliverFrame takes what one read returned: a packet, behind a vnet header
// when the device has one.
func (d *queueDispatcher) deliverFrame(frame []byte) {
	e := d.e
	if !e.vnet {
		e.deliver(frame, inboundPlain)
		return
	}
	h, ok := decodeVnetHdr(frame)
	if !ok {
		e.droppedVnet.Add(1)
		return
	}
	pkt := frame[vnetHdrLen:]
	kind := prepareInbound(h, pkt)
	switch kind {
	case inboundDrop:
		e.droppedVnet.Add(1)
		return
	case inboundDatagrams:
		if d.splitBuf == nil {
			d.splitBuf = make([]byte, maxPacket)
		}
		if !splitDatagrams(pkt, int(h.gsoSize), d.splitBuf, e.deliverValidated) {
			e.droppedVnet.Add(1)
		}
		return
	}
	e.deliver(pkt, kind)
}

func (e *linkEndpoint) deliverValidated(pkt []byte) { e.deliver(pkt, inboundValidated) }

func (e *linkEndpoint) deliver(pkt []byte, kind inboundKind) {
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return // not IP: a TUN in IFF_NO_PI mode carries nothing else we serve
	}
	// A long TCP segment is for gVisor alone; the shorter paths take
	// single datagrams and echo requests.
	if kind != inboundSegment && e.intercept != nil && e.intercept(pkt, e.vnet) {
		return
	}
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: inboundPayload(pkt)})
	d.DeliverNetworkPacket(proto, pb)
	pb.DecRef()
}

// splitPayloadMin is the shortest IP payload given to gVisor in views of
// its own (inboundPayload).
const splitPayloadMin = 512

// inboundPayload copies an inbound packet into gVisor's buffers, with its IP
// header, and a TCP header, each in a view of its own, apart from the data.
// gVisor keeps references to parts of a packet while it parses more of it
// (the IP header's view; for IPv6, a clone of the payload to walk extension
// headers), and a view whose storage is shared is copied whole before it is
// read (buffer.PullUp). With the headers apart, those copies are of a
// header; with the whole packet in one view they were of the whole packet,
// up to 64 KiB, and cost as much as the copy made here (CPU profiles of one
// upload stream: 8.5 % of the daemon for IPv4, 4 % more for IPv6).
func inboundPayload(pkt []byte) buffer.Buffer {
	v4 := header.IPVersion(pkt) == header.IPv4Version
	hlen := header.IPv6MinimumSize
	if v4 {
		if hlen = int(pkt[0]&0xf) * 4; hlen < header.IPv4MinimumSize {
			return buffer.MakeWithData(pkt) // malformed: gVisor drops it
		}
	}
	if len(pkt)-hlen < splitPayloadMin {
		return buffer.MakeWithData(pkt)
	}
	// The packet is long enough to hold the fixed headers read here.
	proto := header.IPv6(pkt).NextHeader()
	if v4 {
		proto = header.IPv4(pkt).Protocol()
	}
	// Prepend, not Append: Append would fill a header's chunk with what
	// follows, and a header split across two views is merged by copying
	// both.
	thlen := 0
	if proto == uint8(header.TCPProtocolNumber) {
		if n := int(header.TCP(pkt[hlen:]).DataOffset()); n >= header.TCPMinimumSize && hlen+n <= len(pkt) {
			thlen = n
		}
	}
	b := buffer.MakeWithData(pkt[hlen+thlen:])
	if thlen > 0 {
		_ = b.Prepend(buffer.NewViewWithData(pkt[hlen : hlen+thlen])) // fails only on a shared chunk
	}
	_ = b.Prepend(buffer.NewViewWithData(pkt[:hlen]))
	return b
}

// writeRaw writes one complete packet built outside gVisor (UDP and ICMP
// replies).
func (e *linkEndpoint) writeRaw(pkt []byte) {
	out := pkt
	if e.vnet {
		// An empty header: checksums are complete, nothing to cut. The
		// copy costs far less than the write it goes with.
		bp, _ := e.rawBufs.Get().(*[]byte)
		if bp == nil {
			bp = new([]byte)
		}
		defer e.rawBufs.Put(bp)
		b := append((*bp)[:0], make([]byte, vnetHdrLen)...)
		b = append(b, pkt...)
		*bp = b
		out = b
	}
	if _, err := e.writeDevice([][]byte{out}, 0); err != nil && !errors.Is(err, os.ErrClosed) {
		e.log.Debug("write to device failed", "err", err)
	}
}

func (e *linkEndpoint) MTU() uint32                             { return e.mtu }
func (e *linkEndpoint) SetMTU(mtu uint32)                       { e.mtu = mtu }
func (e *linkEndpoint) MaxHeaderLength() uint16                 { return 0 }
func (e *linkEndpoint) LinkAddress() tcpip.LinkAddress          { return "" }
func (e *linkEndpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (e *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (e *linkEndpoint) AddHeader(*stack.PacketBuffer)           {}
func (e *linkEndpoint) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (e *linkEndpoint) SetOnCloseAction(func())                 {}
func (e *linkEndpoint) Close()                                  {}

// Capabilities claims checksum offload on receive for a device with a vnet
// header: deliverFrame has then completed or verified every checksum
// (prepareInbound), and a long segment could not be verified by gVisor in
// any case, since its checksum field holds only the pseudo-header sum.
func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	if e.vnet {
		return stack.CapabilityRXChecksumOffload
	}
	return stack.CapabilityNone
}

var _ stack.GSOEndpoint = (*linkEndpoint)(nil)

// SupportedGSO lets gVisor's TCP build segments of up to GSOMaxSize with
// partial checksums, for the kernel to cut (and usually to hand to the
// client's socket whole).
func (e *linkEndpoint) SupportedGSO() stack.SupportedGSO {
	if e.tso {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

func (e *linkEndpoint) GSOMaxSize() uint32 {
	if e.tso {
		return gsoMaxSize
	}
	return 0
}

func (e *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

func (e *linkEndpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait waits for the inbound dispatchers, which end when the device is
// closed, and for the outbound writer, which ends with stopOutbound.
func (e *linkEndpoint) Wait() { e.wg.Wait() }
