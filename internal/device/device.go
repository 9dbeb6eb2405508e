// Package device is the seam between the TUN (package tundev) and the
// userspace stack (package stack): the Device interface that tundev
// implements and stack consumes, and the metadata that travels with each
// packet. It imports nothing but the standard library, so neither side
// needs the other: tundev knows nothing of gVisor, and stack nothing of
// /dev/net/tun, virtio-net headers or netlink.
//
// The shape is wireguard-go's tun.Device (batched Read and Write, MTU,
// Events, Close), with two differences that netstackd's data path needs.
// A TCP segment of up to 64 KiB that the kernel has not cut to the MTU yet
// is handed over whole, with its segment size in Meta, instead of being
// split: gVisor's TCP takes it as Linux GRO would. And a device may have
// several queues, each read by a goroutine of its own.
package device

// GSO says how a packet longer than one segment is to be cut.
type GSO uint8

const (
	// GSONone is a single packet.
	GSONone GSO = iota
	// GSOTCPv4 and GSOTCPv6 are TCP segments longer than the MSS, to be
	// cut into segments of Meta.GSOSize payload bytes.
	GSOTCPv4
	GSOTCPv6
	// GSOUDP is a run of UDP datagrams of one flow behind one IP and UDP
	// header, each Meta.GSOSize bytes but a shorter last one (USO). Only
	// written, never read: a device splits what it reads into datagrams.
	GSOUDP
)

// Meta is what a packet carries besides its bytes: how to cut it, and the
// state of its checksums. The zero value is a whole packet whose checksums
// are complete but not vouched for.
type Meta struct {
	// GSO and GSOSize: see GSO. GSOSize is 0 for GSONone.
	GSO     GSO
	GSOSize uint16
	// HdrLen is the length of the IP and transport headers of a packet
	// with GSO; 0 otherwise. Written packets only.
	HdrLen uint16
	// NeedsCsum says that the transport checksum holds only the
	// pseudo-header sum: the sum over the packet from CsumStart is to be
	// folded into the 16 bits at CsumStart+CsumOffset (CHECKSUM_PARTIAL).
	// Written packets only: a device completes such checksums on read.
	NeedsCsum             bool
	CsumStart, CsumOffset uint16
	// Verified says, for a packet read, that its checksums are known to be
	// good: the kernel vouched for them, or the device completed them.
	Verified bool
}

// Capabilities is what a device lets the stack write.
type Capabilities struct {
	// TSO: TCP packets may carry GSOTCPv4/GSOTCPv6 and NeedsCsum.
	TSO bool
	// USO: UDP packets may carry GSOUDP and NeedsCsum.
	USO bool
}

// EventKind is the kind of an Event.
type EventKind uint8

const (
	// EventDown: the device can carry no more packets (its interface was
	// deleted, or reading it failed). It is the last event.
	EventDown EventKind = iota + 1
	// EventMTU: the interface's MTU changed to Event.MTU.
	EventMTU
)

// Event is something that happened to the device which its user must act
// on.
type Event struct {
	Kind EventKind
	MTU  int   // EventMTU: the new MTU
	Err  error // EventDown: why
}

// Device is a packet device of one or more queues. Read, Write and Close
// may be called concurrently; one queue is read by one goroutine at a time.
type Device interface {
	// Queues is the number of queues, at least 1. The kernel puts all
	// packets of one flow on one queue.
	Queues() int
	// Read reads a batch of packets from queue q: packet i goes to
	// bufs[i][offset:offset+sizes[i]] with its metadata in metas[i]. It
	// blocks until one packet is there, then takes what else is already
	// queued, up to len(bufs), and returns how many it read. The device
	// may use the ReadOffset bytes in front of each packet for its own
	// framing, so offset must be at least ReadOffset, and each buffer
	// needs room for offset+MaxPacket bytes. After Close it returns an
	// error matching os.ErrClosed; any other error ends the device (an
	// EventDown follows).
	Read(q int, bufs [][]byte, sizes []int, metas []Meta, offset int) (int, error)
	// Write writes packets, each given as the pieces it is made of (so
	// that headers and payload need not be copied together first), with
	// its metadata, and returns how many it wrote. It stops at the first
	// packet the device refuses and returns its error. A device of
	// several queues writes each packet to the queue of its flow.
	Write(pkts [][][]byte, metas []Meta) (int, error)
	// BatchSize is the most packets one Read returns.
	BatchSize() int
	// MTU is the device's MTU when it was opened; EventMTU reports changes.
	MTU() int
	// Capabilities is what Write may be given beyond whole packets.
	Capabilities() Capabilities
	// Events delivers what happens to the device. The channel is closed
	// after EventDown or Close; a user that does not read it loses
	// nothing but events.
	Events() <-chan Event
	// Close closes the device and wakes blocked Reads.
	Close() error
}

// ReadOffset is the room a device may use in front of each packet it reads
// (a virtio_net_hdr is 10 bytes).
const ReadOffset = 16

// MaxPacket is the longest packet a read may return: the most an IPv4 total
// length or IPv6 payload length can describe.
const MaxPacket = 1 << 16
