package stack

import (
	"errors"
	"log/slog"
	"os"
	"sync"

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

// maxPacket is the largest IP packet a read may return; reading into anything
// smaller would truncate a packet silently.
const maxPacket = 1 << 16

// linkEndpoint is the gVisor NIC backed by a Device. Inbound packets are read
// by one goroutine that it owns; outbound packets are written synchronously
// from WritePackets, as gVisor's fdbased endpoint does, so no queue sits
// between the stack and the device.
type linkEndpoint struct {
	dev    Device
	log    *slog.Logger
	mtu    uint32
	offset int

	// intercept, when set before start, sees every inbound packet first and
	// reports whether it took it (echo requests sent on for real).
	intercept func(pkt []byte) bool

	mu         sync.RWMutex
	dispatcher stack.NetworkDispatcher

	wg sync.WaitGroup // the inbound reader

	writeMu   sync.Mutex // guards writeBufs
	writeBufs [][]byte
}

var _ stack.LinkEndpoint = (*linkEndpoint)(nil)

func newLinkEndpoint(dev Device, log *slog.Logger) *linkEndpoint {
	return &linkEndpoint{dev: dev, log: log, mtu: uint32(dev.MTU())}
}

// start begins delivering packets read from the device. It returns at once;
// the reader stops when the device is closed.
func (e *linkEndpoint) start() {
	e.wg.Go(e.readInbound)
}

func (e *linkEndpoint) readInbound() {
	n := max(e.dev.BatchSize(), 1)
	bufs := make([][]byte, n)
	sizes := make([]int, n)
	for i := range bufs {
		bufs[i] = make([]byte, e.offset+maxPacket)
	}
	for {
		count, err := e.dev.Read(bufs, sizes, e.offset)
		for i := range count {
			e.deliver(bufs[i][e.offset : e.offset+sizes[i]])
		}
		if err != nil {
			if !errors.Is(err, os.ErrClosed) {
				e.log.Error("read from device stopped", "err", err)
			}
			return
		}
	}
}

func (e *linkEndpoint) deliver(pkt []byte) {
	var proto tcpip.NetworkProtocolNumber
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		proto = header.IPv4ProtocolNumber
	case header.IPv6Version:
		proto = header.IPv6ProtocolNumber
	default:
		return // not IP: a TUN in IFF_NO_PI mode carries nothing else we serve
	}
	if e.intercept != nil && e.intercept(pkt) {
		return
	}
	e.mu.RLock()
	d := e.dispatcher
	e.mu.RUnlock()
	if d == nil {
		return
	}
	pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
	d.DeliverNetworkPacket(proto, pb)
	pb.DecRef()
}

// WritePackets hands packets from the stack to the device in one batch.
func (e *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	e.writeMu.Lock()
	defer e.writeMu.Unlock()
	list := pkts.AsSlice()
	bufs := e.writeBufs[:0]
	for i, pkt := range list {
		if i == len(e.writeBufs) {
			e.writeBufs = append(e.writeBufs, make([]byte, 0, e.offset+int(e.mtu)))
		}
		b := e.writeBufs[i][:e.offset]
		for _, s := range pkt.AsSlices() {
			b = append(b, s...)
		}
		e.writeBufs[i] = b
		bufs = append(bufs, b)
	}
	n, err := e.dev.Write(bufs, e.offset)
	if err != nil {
		if errors.Is(err, os.ErrClosed) {
			return n, &tcpip.ErrClosedForSend{}
		}
		e.log.Debug("write to device failed", "err", err, "written", n, "batch", len(bufs))
		if n == 0 {
			return 0, &tcpip.ErrAborted{}
		}
	}
	return n, nil
}

// writeRaw writes one packet built outside gVisor (UDP and ICMP replies).
// pkt must start e.offset bytes into its buffer's head-room; with no
// head-room in use that is simply the packet.
func (e *linkEndpoint) writeRaw(pkt []byte) {
	if _, err := e.dev.Write([][]byte{pkt}, 0); err != nil && !errors.Is(err, os.ErrClosed) {
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

func (e *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityNone
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

// Wait waits for the inbound reader, which ends when the device is closed.
func (e *linkEndpoint) Wait() { e.wg.Wait() }
