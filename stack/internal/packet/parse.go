package packet

import (
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// AddrFrom is a gVisor address as a netip.Addr.
func AddrFrom(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}

// TransportProtocol is the protocol an IPv4 packet, or an IPv6 packet
// without extension headers, carries; 0 when there is none to read.
func TransportProtocol(pkt []byte) tcpip.TransportProtocolNumber {
	switch {
	case len(pkt) >= IPv4HeaderLen && header.IPVersion(pkt) == header.IPv4Version:
		return header.IPv4(pkt).TransportProtocol()
	case len(pkt) >= IPv6HeaderLen && header.IPVersion(pkt) == header.IPv6Version:
		return header.IPv6(pkt).TransportProtocol()
	}
	return 0
}

// Dst reads the destination address of an IPv4 or IPv6 packet from its
// fixed place; the zero Addr when there is none.
func Dst(pkt []byte) netip.Addr {
	switch {
	case len(pkt) >= IPv4HeaderLen && header.IPVersion(pkt) == header.IPv4Version:
		return netip.AddrFrom4([4]byte(pkt[16:20]))
	case len(pkt) >= IPv6HeaderLen && header.IPVersion(pkt) == header.IPv6Version:
		return netip.AddrFrom16([16]byte(pkt[24:40]))
	}
	return netip.Addr{}
}

// UDP is a UDP datagram parsed from a whole IP packet.
type UDP struct {
	Src, Dst netip.AddrPort
	Payload  []byte
	// Checksum is the datagram's checksum field; 0 means none (IPv4 only).
	Checksum uint16
	// Segment is the UDP header and payload.
	Segment []byte
	// Head is the IP and UDP headers, which an ICMP error about the
	// datagram quotes.
	Head []byte
}

// ParseUDP parses pkt as a whole, unfragmented IPv4 or IPv6 (no extension
// headers) UDP datagram whose lengths agree and whose IPv4 header checksum
// is right. Anything else (fragments that need reassembly among them)
// gives ok false. It does not verify the UDP checksum: see ChecksumValid.
func ParseUDP(pkt []byte) (u UDP, ok bool) {
	var hl int
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 ||
			ip.CalculateChecksum() != 0xffff {
			return u, false
		}
		hl = int(ip.HeaderLength())
		u.Segment = pkt[hl:ip.TotalLength()]
		u.Src = netip.AddrPortFrom(netip.AddrFrom4(ip.SourceAddress().As4()), 0)
		u.Dst = netip.AddrPortFrom(netip.AddrFrom4(ip.DestinationAddress().As4()), 0)
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.UDPProtocolNumber {
			return u, false
		}
		hl = IPv6HeaderLen
		u.Segment = pkt[hl : hl+int(ip.PayloadLength())]
		u.Src = netip.AddrPortFrom(netip.AddrFrom16(ip.SourceAddress().As16()), 0)
		u.Dst = netip.AddrPortFrom(netip.AddrFrom16(ip.DestinationAddress().As16()), 0)
	default:
		return u, false
	}
	if len(u.Segment) < UDPHeaderLen {
		return UDP{}, false
	}
	h := header.UDP(u.Segment)
	if int(h.Length()) != len(u.Segment) {
		return UDP{}, false
	}
	u.Src = netip.AddrPortFrom(u.Src.Addr(), h.SourcePort())
	u.Dst = netip.AddrPortFrom(u.Dst.Addr(), h.DestinationPort())
	u.Checksum = h.Checksum()
	u.Payload = u.Segment[UDPHeaderLen:]
	u.Head = pkt[:hl+UDPHeaderLen]
	return u, true
}

// ChecksumValid verifies the datagram's UDP checksum; an IPv4 datagram
// sent without one passes.
func (u UDP) ChecksumValid() bool {
	if u.Checksum == 0 && u.Src.Addr().Is4() {
		return true
	}
	return header.UDP(u.Segment).IsChecksumValid(TCPIPAddr(u.Src.Addr()), TCPIPAddr(u.Dst.Addr()), checksum.Checksum(u.Payload, 0))
}

// icmpEchoLen is the fixed part of an echo message: type, code, checksum,
// identifier, sequence.
const icmpEchoLen = 8

// ParseEcho recognises an ICMP or ICMPv6 echo request in a whole IP packet
// and returns its addresses and ICMP message. Anything else, including
// fragments, IPv6 packets with extension headers and echo requests to
// link-local or multicast addresses, gives ok false.
func ParseEcho(pkt []byte) (src, dst netip.Addr, msg []byte, ok bool) {
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) ||
			ip.More() || ip.FragmentOffset() != 0 {
			return
		}
		msg = ip.Payload()
		if len(msg) < icmpEchoLen || header.ICMPv4(msg).Type() != header.ICMPv4Echo || checksum.Checksum(msg, 0) != 0xffff {
			return
		}
		src, dst = netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4())
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber {
			return
		}
		msg = ip.Payload()
		if len(msg) < icmpEchoLen || header.ICMPv6(msg).Type() != header.ICMPv6EchoRequest {
			return
		}
		src, dst = netip.AddrFrom16(ip.SourceAddress().As16()), netip.AddrFrom16(ip.DestinationAddress().As16())
		// ICMPv6Checksum skips the checksum field and returns what it
		// should hold.
		if header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: msg, Src: TCPIPAddr(src), Dst: TCPIPAddr(dst)}) != header.ICMPv6(msg).Checksum() {
			return
		}
	default:
		return
	}
	if !dst.IsGlobalUnicast() || dst.IsLinkLocalUnicast() {
		return netip.Addr{}, netip.Addr{}, nil, false // for the stack's own link
	}
	return src, dst, msg, true
}

// PortUnreachableQuote recognises an ICMP or ICMPv6 port unreachable in a
// whole IP packet and returns the destination of the error and the UDP
// datagram it quotes: the source port of that datagram tells whose it was.
func PortUnreachableQuote(pkt []byte) (dst netip.Addr, quotedSrcPort uint16, ok bool) {
	var quote []byte // the offending IP packet, as much as the error carries
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.More() || ip.FragmentOffset() != 0 || ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) {
			return dst, 0, false
		}
		msg := header.ICMPv4(ip.Payload())
		if len(msg) < header.ICMPv4MinimumSize || msg.Type() != header.ICMPv4DstUnreachable || msg.Code() != header.ICMPv4PortUnreachable {
			return dst, 0, false
		}
		quote = msg[header.ICMPv4MinimumSize:]
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber {
			return dst, 0, false
		}
		msg := header.ICMPv6(ip.Payload())
		if len(msg) < header.ICMPv6ErrorHeaderSize || msg.Type() != header.ICMPv6DstUnreachable || msg.Code() != header.ICMPv6PortUnreachable {
			return dst, 0, false
		}
		quote = msg[header.ICMPv6ErrorHeaderSize:]
	default:
		return dst, 0, false
	}
	hl := 0
	switch header.IPVersion(quote) {
	case header.IPv4Version:
		if len(quote) >= IPv4HeaderLen && header.IPv4(quote).Protocol() == uint8(header.UDPProtocolNumber) {
			hl = int(header.IPv4(quote).HeaderLength())
		}
	case header.IPv6Version:
		if len(quote) >= IPv6HeaderLen && header.IPv6(quote).TransportProtocol() == header.UDPProtocolNumber {
			hl = IPv6HeaderLen
		}
	}
	if hl == 0 || len(quote) < hl+UDPHeaderLen {
		return dst, 0, false
	}
	return Dst(pkt), header.UDP(quote[hl:]).SourcePort(), true
}

// ChecksumsValid verifies what gVisor would have: the IPv4 header checksum,
// and the TCP, UDP or ICMP checksum of a packet that is not a fragment and,
// for IPv6, has no extension headers. What it cannot see (the transport
// checksum of a fragment) it lets through; anything that is not IP goes on
// to be refused by gVisor.
func ChecksumsValid(pkt []byte) bool {
	var (
		proto    tcpip.TransportProtocolNumber
		src, dst tcpip.Address
		seg      []byte
	)
	switch {
	case len(pkt) >= header.IPv4MinimumSize && header.IPVersion(pkt) == header.IPv4Version:
		ip := header.IPv4(pkt)
		hl, tl := int(ip.HeaderLength()), int(ip.TotalLength())
		if hl < header.IPv4MinimumSize || hl > tl || tl > len(pkt) || checksum.Checksum(pkt[:hl], 0) != 0xffff {
			return false
		}
		if ip.More() || ip.FragmentOffset() != 0 {
			return true
		}
		proto, src, dst, seg = ip.TransportProtocol(), ip.SourceAddress(), ip.DestinationAddress(), pkt[hl:tl]
		if proto == header.ICMPv4ProtocolNumber {
			return checksum.Checksum(seg, 0) == 0xffff
		}
	case len(pkt) >= header.IPv6MinimumSize && header.IPVersion(pkt) == header.IPv6Version:
		ip := header.IPv6(pkt)
		end := header.IPv6MinimumSize + int(ip.PayloadLength())
		if end > len(pkt) {
			return false
		}
		proto, src, dst, seg = ip.TransportProtocol(), ip.SourceAddress(), ip.DestinationAddress(), pkt[header.IPv6MinimumSize:end]
	default:
		return true
	}
	switch proto {
	case header.UDPProtocolNumber:
		if len(seg) >= header.UDPMinimumSize && header.UDP(seg).Checksum() == 0 && src.Len() == 4 {
			return true // IPv4 UDP without a checksum
		}
	case header.TCPProtocolNumber, header.ICMPv6ProtocolNumber:
	default:
		return true // not ours to judge: gVisor refuses what it does not serve
	}
	if len(seg) > 0xffff {
		return false
	}
	pseudo := header.PseudoHeaderChecksum(proto, src, dst, uint16(len(seg)))
	return checksum.Checksum(seg, pseudo) == 0xffff
}
