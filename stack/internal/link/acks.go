package link

import (
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// gVisor acknowledges every batch of segments it processes at once: it has
// no delayed ACK. On a request/reply flow that is two TUN writes per round
// trip, the ACK of the request and then the reply, which carries the same
// acknowledgement; each write runs the client's TCP receive path inside our
// system call, and the ACK's write runs before the request is relayed
// upstream (the writer is the goroutine woken last, so Go runs it first).
// So a batch made only of pure ACKs does not wake the writer: it waits at
// most ackHold for a packet that does, and when the writer drains the queue
// a pure ACK that a later packet of its flow supersedes is not written. The
// client then sees what a kernel peer with delayed ACKs would send.

// ackHold bounds how long a pure ACK may wait for a packet that carries it.
// Requests answered within it cost one TUN write instead of two; a Linux
// peer waits up to 40 ms before it acknowledges alone.
const ackHold = 200 * time.Microsecond

// ackLookahead bounds how far along a drained batch a pure ACK looks for a
// packet of its flow that supersedes it.
const ackLookahead = 64

// ackKind is what an outbound packet is to ACK coalescing.
type ackKind uint8

const (
	ackNone    ackKind = iota // not TCP, or no acknowledgement in it
	ackPure                   // only an acknowledgement: no data, no SYN, FIN or RST
	ackCarried                // an acknowledgement carried by data, SYN, FIN or RST
)

// tcpKey names a TCP flow's direction: addresses and ports as on the wire.
type tcpKey struct {
	addrs [32]byte
	ports [4]byte
}

// ackInfo is what coalescing needs of one outbound packet.
type ackInfo struct {
	kind ackKind
	ack  uint32 // the acknowledgement number
	key  tcpKey
}

// classifyAck reads an outbound packet's headers as gVisor built them.
func classifyAck(pkt *stack.PacketBuffer) ackInfo {
	if pkt.TransportProtocolNumber != header.TCPProtocolNumber {
		return ackInfo{}
	}
	nh, th := pkt.NetworkHeader().Slice(), header.TCP(pkt.TransportHeader().Slice())
	if len(th) < header.TCPMinimumSize {
		return ackInfo{}
	}
	var a ackInfo
	switch pkt.NetworkProtocolNumber {
	case header.IPv4ProtocolNumber:
		if len(nh) < header.IPv4MinimumSize {
			return ackInfo{}
		}
		copy(a.key.addrs[:8], nh[12:20]) // source, destination
	case header.IPv6ProtocolNumber:
		if len(nh) < header.IPv6MinimumSize {
			return ackInfo{}
		}
		copy(a.key.addrs[:], nh[8:40])
	default:
		return ackInfo{}
	}
	flags := th.Flags()
	if flags&header.TCPFlagAck == 0 {
		return ackInfo{}
	}
	copy(a.key.ports[:], th[:4])
	a.ack = th.AckNumber()
	a.kind = ackCarried
	if flags == header.TCPFlagAck && pkt.Data().Size() == 0 {
		a.kind = ackPure
	}
	return a
}

// supersedes reports whether p, sent after the pure ACK a, tells the peer
// everything a does. A pure ACK with the same number is a duplicate ACK,
// which the peer counts toward fast retransmit: it supersedes nothing.
func (p *ackInfo) supersedes(a *ackInfo) bool {
	if p.kind == ackNone || p.key != a.key {
		return false
	}
	d := int32(p.ack - a.ack)
	return d > 0 || d == 0 && p.kind == ackCarried
}

// coalesceAcks removes from batch, in place, each pure ACK that a later
// packet of its flow supersedes, releasing it, and returns the rest in order
// and how many it removed.
func coalesceAcks(batch []outPacket) ([]outPacket, int) {
	kept := batch[:0]
	removed := 0
	for i := range batch {
		if batch[i].ack.kind == ackPure && supersededLater(batch[i+1:], &batch[i].ack) {
			batch[i].release()
			removed++
			continue
		}
		kept = append(kept, batch[i])
	}
	clear(batch[len(kept):])
	return kept, removed
}

func supersededLater(later []outPacket, a *ackInfo) bool {
	for j := range later[:min(len(later), ackLookahead)] {
		if later[j].ack.supersedes(a) {
			return true
		}
	}
	return false
}
