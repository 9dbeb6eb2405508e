package stack

import (
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netstackd/netstackd/stack/internal/packet"
	"github.com/netstackd/netstackd/stack/internal/udpnat"
)

// maxDNSInFlight bounds intercepted DNS queries over UDP being answered at
// once; beyond it queries are dropped and the client retries.
const maxDNSInFlight = 256

// UDPDialer opens the far side of a UDP association: a packet conn that
// sends to any "host:port" given to WriteTo and reports the true source of
// what it receives. net.ListenConfig and every proxy dialer that carries UDP
// fit it.
type UDPDialer = udpnat.UDPDialer

// KernelSocket is what a packet conn that is a plain kernel UDP socket may
// implement (proxy.Direct's does) to let the stack read and write it
// directly: borrowing buffers only while a datagram is there, and receiving
// ICMP errors.
type KernelSocket = udpnat.KernelSocket

var replyBufs = sync.Pool{New: func() any { b := make([]byte, packet.Headroom+1<<16); return &b }}

// linkHandler is the stack as the link's Handler, so that the methods stay
// off the stack's public API.
type linkHandler struct{ st *Stack }

func (h linkHandler) HandlePacket(pkt []byte) bool { return h.st.handlePacket(pkt) }
func (h linkHandler) EndBatch()                    { h.st.endBatch() }

// handlePacket takes the inbound packets that do not need gVisor: whole UDP
// datagrams (the NAT, published ports and DNS), echo requests and ICMP
// errors about published ports. It runs on a device dispatcher for every
// packet but long TCP segments, checksums verified, and reports whether it
// took the packet; what it leaves goes to gVisor.
func (st *Stack) handlePacket(pkt []byte) bool {
	// One look at the protocol keeps TCP, the bulk of the traffic, off
	// the other paths.
	switch packet.TransportProtocol(pkt) {
	case header.UDPProtocolNumber:
		u, ok := packet.ParseUDP(pkt)
		if !ok {
			return false // behind IPv6 extension headers, or malformed: gVisor's
		}
		if st.inUDP.IsGateway(u.Dst.Addr()) && !st.answersDNS(u.Dst) {
			st.inUDP.Receive(u)
			return true
		}
		if src := u.Src.Addr(); u.Dst.Port() == 0 || !src.IsGlobalUnicast() && !src.IsPrivate() {
			return false // gVisor refuses it
		}
		head := u.Head
		return st.routeUDP(u.Src, u.Dst, u.Payload, func() []byte { return append([]byte(nil), head...) }, true)
	case header.ICMPv4ProtocolNumber, header.ICMPv6ProtocolNumber:
		if st.inUDP.HandleICMPError(pkt) {
			return true
		}
		src, dst, msg, ok := packet.ParseEcho(pkt)
		if ok && st.cfg.Route != nil && st.refuseEcho(src, dst) {
			return true
		}
		return ok && st.ping.Echo(src, dst, msg)
	}
	return false
}

// endBatch sends what the datagrams of one device read queued for their
// upstream sockets, in as few calls as it can.
func (st *Stack) endBatch() {
	if st.udp != nil {
		st.udp.Flush()
	}
}

// handleUDP is gVisor's UDP handler, for the datagrams handlePacket left to
// it: IPv6 ones behind extension headers (fragments never reach gVisor:
// the link reassembles them). Returning false makes gVisor
// answer ICMP port unreachable. It may run on goroutines other than the
// dispatchers, whose end of batch would flush a queue: it sends at once.
func (st *Stack) handleUDP(id gstack.TransportEndpointID, pkt *gstack.PacketBuffer) bool {
	client := netip.AddrPortFrom(packet.AddrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(packet.AddrFrom(id.LocalAddress), id.LocalPort)
	data := pkt.Data()
	payload, ok := data.PullUp(data.Size())
	if !ok && data.Size() > 0 {
		return true
	}
	u := header.UDP(pkt.TransportHeader().Slice())
	if (u.Checksum() != 0 || client.Addr().Is6()) &&
		!u.IsChecksumValid(id.RemoteAddress, id.LocalAddress, checksum.Checksum(payload, 0)) {
		return true // a corrupt datagram is dropped, as a kernel would
	}
	if st.inUDP.IsGateway(dst.Addr()) && !st.answersDNS(dst) {
		// A reply on an inbound association, never an outbound flow.
		return st.inUDP.Deliver(client, dst, payload)
	}
	quote := func() []byte {
		q := make([]byte, 0, packet.ICMPQuoteLen)
		q = append(q, pkt.NetworkHeader().Slice()...)
		return append(q, pkt.TransportHeader().Slice()...)
	}
	return st.routeUDP(client, dst, payload, quote, false)
}

// answersDNS reports whether the stack answers datagrams to dst itself.
func (st *Stack) answersDNS(dst netip.AddrPort) bool {
	return st.cfg.DNS != nil && dst.Port() == 53
}

// routeUDP carries one datagram from a client behind the TUN: to the DNS
// answerer, or through the NAT. It reports false when UDP is refused.
func (st *Stack) routeUDP(client, dst netip.AddrPort, payload []byte, quote func() []byte, batched bool) bool {
	if st.answersDNS(dst) {
		st.answerDNS(client, dst, payload)
		return true
	}
	if st.udp == nil {
		return false // refused: gVisor answers port unreachable
	}
	// A fake address is netstackd's own but stands for a name: it is
	// relayed, so Refuse (which counts and logs what it refuses) is not
	// asked about it.
	if (st.cfg.Names == nil || !st.cfg.Names.IsFake(dst.Addr())) && st.refused(dst.Addr()) {
		// Answered here, not by returning false: a datagram handed to
		// gVisor comes back through handleUDP and would be refused twice.
		bp := replyBufs.Get().(*[]byte)
		st.link.WriteRaw(packet.BuildPortUnreachable(*bp, dst.Addr(), client.Addr(), quote()))
		replyBufs.Put(bp)
		return true
	}
	return st.udp.Send(client, dst, payload, quote, batched)
}

// answerDNS answers an intercepted DNS query off the dispatcher: an answer
// may need the upstream resolver.
func (st *Stack) answerDNS(client, dst netip.AddrPort, payload []byte) {
	select {
	case st.dnsSlots <- struct{}{}:
	default:
		st.droppedDNS.Add(1)
		return
	}
	query := append([]byte(nil), payload...)
	if !st.goHelper(func() {
		defer func() { <-st.dnsSlots }()
		st.replyDNS(client, dst, query)
	}) {
		<-st.dnsSlots
	}
}

func (st *Stack) replyDNS(client, dst netip.AddrPort, query []byte) {
	reply := st.cfg.DNS.Answer(st.ctx, query, false)
	if reply == nil {
		return
	}
	if len(reply) > packet.MaxUDPPayload(client.Addr()) {
		st.droppedDNS.Add(1)
		return
	}
	bp := replyBufs.Get().(*[]byte)
	defer replyBufs.Put(bp)
	st.link.WriteRaw(packet.BuildUDP(*bp, dst, client, reply))
}

// goHelper runs fn on a goroutine of the stack's, unless the stack is
// closing, and reports whether it did.
func (st *Stack) goHelper(fn func()) bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.helpers.Go(fn)
	return true
}

// udpFlows is the number of open UDP associations.
func (st *Stack) udpFlows() int {
	if st.udp == nil {
		return 0
	}
	return st.udp.Len()
}
