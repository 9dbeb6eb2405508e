// Package link is the stack's gVisor NIC: a link endpoint backed by a
// device.Device. Inbound, it runs one dispatcher goroutine per device queue,
// which verifies what the device did not vouch for, reassembles IP
// fragments (fragments.go), offers each packet to
// a Handler (the stack's paths that bypass gVisor: UDP NAT, ping, published
// ports) and hands the rest to gVisor. Outbound, it queues gVisor's packets
// for one writer goroutine (out.go) and writes the packets the stack builds
// itself (WriteRaw, WriteDatagrams), cut into fragments when longer than
// the MTU. It owns its goroutines: Wait joins them.
package link

import (
	"errors"
	"log/slog"
	"math/rand/v2"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/frag"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// Handler takes the inbound packets that do not need gVisor.
type Handler interface {
	// HandlePacket sees each inbound packet before gVisor does, but TCP
	// segments longer than one MSS, with its checksums verified and, if
	// it came in fragments, whole; it reports whether it took the packet.
	// It runs on a dispatcher and must not block; pkt is valid only
	// during the call.
	HandlePacket(pkt []byte) bool
	// EndBatch is called after the packets of one device read have been
	// delivered, so that what they queued (datagrams for one upstream
	// socket) can leave in one system call. With several queues, the
	// dispatchers call it concurrently.
	EndBatch()
}

// GSOMaxSize is the largest segment handed to the device: the most an IPv4
// total length can say. gVisor keeps a segment's payload below it minus the
// largest TCP/IP header.
const GSOMaxSize = 1 << 16

// Endpoint is the gVisor link endpoint backed by a device.
type Endpoint struct {
	dev  device.Device
	h    Handler
	log  *slog.Logger
	caps device.Capabilities
	mtu  atomic.Uint32

	droppedChecksum atomic.Uint64 // inbound packets with bad checksums
	// frag reassembles inbound fragments; fragID numbers the IPv6
	// packets cut into fragments; droppedBig counts packets too large to
	// send even so (fragments.go).
	frag       *frag.Reassembler
	fragID     atomic.Uint32
	droppedBig atomic.Uint64
	// queueReads counts the packets read from each queue, so that tests
	// and operators can see how the kernel spread the flows.
	queueReads []queueCounter

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	wg sync.WaitGroup // the inbound dispatchers and the outbound writer

	out     outQueue   // packets from gVisor for the writer (out.go)
	writeMu sync.Mutex // guards scratch
	scratch []outPacket
}

var (
	_ stack.LinkEndpoint = (*Endpoint)(nil)
	_ stack.GSOEndpoint  = (*Endpoint)(nil)
)

// New makes the endpoint of dev, whose inbound packets h sees first.
// Nothing runs until Start.
func New(dev device.Device, h Handler, log *slog.Logger) *Endpoint {
	e := &Endpoint{dev: dev, h: h, log: log, caps: dev.Capabilities(), frag: frag.New(frag.Config{})}
	// RFC 7739: identifications should not be predictable from outside.
	e.fragID.Store(rand.Uint32())
	e.mtu.Store(uint32(dev.MTU()))
	e.out.wake = make(chan struct{}, 1)
	e.out.ackTimer = time.NewTimer(time.Hour)
	e.out.ackTimer.Stop()
	e.queueReads = make([]queueCounter, max(dev.Queues(), 1))
	return e
}

// Start begins delivering packets read from the device, one dispatcher per
// queue, and writing what gVisor sends. It returns at once; the dispatchers
// stop when the device is closed or fails, the writer with StopOutbound.
func (e *Endpoint) Start() {
	for q := range e.queueReads {
		d := &dispatcher{e: e, q: q}
		e.wg.Go(d.readInbound)
	}
	e.wg.Go(e.writeOutbound)
}

// queueCounter is the counters of one dispatcher's, alone on their cache
// line (64 bytes on the CPUs we run on), so that dispatchers on different
// CPUs counting at once do not take the line from each other: the packets
// read, and the reads that returned any (their ratio is the mean batch).
type queueCounter struct {
	packets, batches atomic.Uint64
	_                [48]byte
}

// QueueReads is the number of packets read from each queue so far.
func (e *Endpoint) QueueReads() []uint64 {
	n := make([]uint64, len(e.queueReads))
	for i := range e.queueReads {
		n[i] = e.queueReads[i].packets.Load()
	}
	return n
}

// QueueBatches is the number of reads that returned packets, per queue.
func (e *Endpoint) QueueBatches() []uint64 {
	n := make([]uint64, len(e.queueReads))
	for i := range e.queueReads {
		n[i] = e.queueReads[i].batches.Load()
	}
	return n
}

// dispatcher reads one queue of the device and delivers what it reads. Its
// buffers are its own, so dispatchers of different queues run in parallel:
// gVisor's NIC takes packets from many goroutines at once (its fdbased
// endpoint runs one dispatcher per fd the same way), and what the handler's
// paths share they guard with locks of their own. A flow's packets all
// arrive on one queue, so a flow is still delivered in order.
type dispatcher struct {
	e    *Endpoint
	q    int
	frag fragScratch
}

func (d *dispatcher) readInbound() {
	e := d.e
	n := max(e.dev.BatchSize(), 1)
	bufs := make([][]byte, n)
	sizes := make([]int, n)
	metas := make([]device.Meta, n)
	for i := range bufs {
		bufs[i] = make([]byte, device.ReadOffset+device.MaxPacket)
	}
	reads := &e.queueReads[d.q]
	for {
		count, err := e.dev.Read(d.q, bufs, sizes, metas, device.ReadOffset)
		for i := range count {
			e.deliver(bufs[i][device.ReadOffset:device.ReadOffset+sizes[i]], metas[i], &d.frag)
		}
		if count > 0 {
			reads.packets.Add(uint64(count))
			reads.batches.Add(1)
			e.h.EndBatch()
		}
		if err != nil {
			// The device reports why it ended (its Events); here it
			// is only the end of this queue.
			if !errors.Is(err, os.ErrClosed) {
				e.log.Debug("read from device stopped", "queue", d.q, "err", err)
			}
			return
		}
	}
}

func (e *Endpoint) deliver(pkt []byte, m device.Meta, fs *fragScratch) {
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return // not IP: a TUN in IFF_NO_PI mode carries nothing else we serve
	}
	// A long TCP segment is for gVisor alone, and its checksum field holds
	// only the pseudo-header sum: the device vouches for it.
	if m.GSO == device.GSONone {
		// gVisor trusts every packet of a link that offloads checksums
		// (the NIC, not the packet, says so), so one that nobody
		// vouched for is verified here, once, for every path.
		if !m.Verified && !packet.ChecksumsValid(pkt) {
			e.droppedChecksum.Add(1)
			return
		}
		if isFragment(pkt) {
			whole, res := e.frag.Process(pkt, fs.get())
			switch res {
			case frag.Held, frag.Dropped:
				return
			case frag.Reassembled:
				// The transport checksum could not be verified on
				// the fragments.
				if !packet.ChecksumsValid(whole) {
					e.droppedChecksum.Add(1)
					return
				}
				pkt = whole
			}
		}
		if e.h.HandlePacket(pkt) {
			return
		}
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

// rawWrite is what WriteRaw hands the device, pooled so that a write
// allocates nothing.
type rawWrite struct {
	pieces [1][]byte
	pkts   [1][][]byte
	metas  [1]device.Meta
}

var rawWrites = sync.Pool{New: func() any { return new(rawWrite) }}

// WriteRaw writes one complete packet built outside gVisor (UDP and ICMP
// replies), as fragments if it is longer than the MTU. It may be called
// from any goroutine.
func (e *Endpoint) WriteRaw(pkt []byte) {
	if len(pkt) > int(e.MTU()) {
		e.writeFragments(pkt)
		return
	}
	w := rawWrites.Get().(*rawWrite)
	w.pieces[0] = pkt
	w.pkts[0] = w.pieces[:]
	if _, err := e.dev.Write(w.pkts[:], w.metas[:]); err != nil && !errors.Is(err, os.ErrClosed) {
		e.log.Debug("write to device failed", "err", err)
	}
	w.pieces[0] = nil
	rawWrites.Put(w)
}

// SetDeviceMTU records a change of the device's MTU: packets built outside
// gVisor are sized to it from now on.
func (e *Endpoint) SetDeviceMTU(mtu int) { e.mtu.Store(uint32(mtu)) }

// DroppedChecksum counts inbound packets dropped for bad checksums.
func (e *Endpoint) DroppedChecksum() uint64 { return e.droppedChecksum.Load() }

func (e *Endpoint) MTU() uint32                             { return e.mtu.Load() }
func (e *Endpoint) SetMTU(mtu uint32)                       { e.mtu.Store(mtu) }
func (e *Endpoint) MaxHeaderLength() uint16                 { return 0 }
func (e *Endpoint) LinkAddress() tcpip.LinkAddress          { return "" }
func (e *Endpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (e *Endpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (e *Endpoint) AddHeader(*stack.PacketBuffer)           {}
func (e *Endpoint) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (e *Endpoint) SetOnCloseAction(func())                 {}
func (e *Endpoint) Close()                                  {}

// Capabilities claims checksum offload on receive: deliver has verified
// every checksum that the device did not vouch for, and a long segment
// could not be verified by gVisor in any case, since its checksum field
// holds only the pseudo-header sum.
func (e *Endpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityRXChecksumOffload
}

// SupportedGSO lets gVisor's TCP build segments of up to GSOMaxSize with
// partial checksums, for the kernel to cut (and usually to hand to the
// client's socket whole), on a device that takes them.
func (e *Endpoint) SupportedGSO() stack.SupportedGSO {
	if e.caps.TSO {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

func (e *Endpoint) GSOMaxSize() uint32 {
	if e.caps.TSO {
		return GSOMaxSize
	}
	return 0
}

func (e *Endpoint) Attach(d stack.NetworkDispatcher) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.dispatcher = d
}

func (e *Endpoint) IsAttached() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return e.dispatcher != nil
}

// Wait waits for the inbound dispatchers, which end when the device is
// closed, and for the outbound writer, which ends with StopOutbound; then
// it lets go of the fragments held for reassembly.
func (e *Endpoint) Wait() {
	e.wg.Wait()
	e.frag.Close()
}
