// Package packet builds and parses the IP packets that the stack handles
// outside gVisor: UDP datagrams, ICMP errors and echo messages, carried to
// and from the TUN by hand. It is pure: bytes in, bytes out, nothing kept.
package packet

import (
	"net/netip"
	"sync/atomic"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Replies to UDP and ICMP flows are built here and written to the device
// directly: they come from addresses the stack does not own (any server the
// client talks to), and going through gVisor endpoints would need one
// endpoint per source, which endpoint-independent mapping makes unbounded.

// Fixed header lengths (RFC 791 without options, RFC 8200, RFC 768).
const (
	IPv4HeaderLen = header.IPv4MinimumSize
	IPv6HeaderLen = header.IPv6MinimumSize
	UDPHeaderLen  = header.UDPMinimumSize
	replyTTL      = 64
	// Headroom is room in front of a payload for the IP and UDP headers of
	// the packet that will carry it, whatever its family.
	Headroom = IPv6HeaderLen + UDPHeaderLen
)

// ipv4ID numbers the IPv4 packets built here.
var ipv4ID atomic.Uint32

// TCPIPAddr is a in gVisor's form.
func TCPIPAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// IPHeaderLen is the IP header length for packets between these addresses.
func IPHeaderLen(dst netip.Addr) int {
	if dst.Is4() {
		return IPv4HeaderLen
	}
	return IPv6HeaderLen
}

// MaxUDPPayload is the largest UDP payload one IP packet (or its fragments)
// to dst carries: 65,507 bytes over IPv4, whose total length counts the
// header; 65,527 over IPv6, whose payload length does not.
func MaxUDPPayload(dst netip.Addr) int {
	if dst.Is4() {
		return 0xffff - IPv4HeaderLen - UDPHeaderLen
	}
	return 0xffff - UDPHeaderLen
}

// PutIPHeader writes an IPv4 or IPv6 header for a packet of payloadLen bytes
// of transport protocol proto to the front of b and returns its length.
func PutIPHeader(b []byte, src, dst netip.Addr, proto tcpip.TransportProtocolNumber, payloadLen int) int {
	if dst.Is4() {
		ip := header.IPv4(b[:IPv4HeaderLen])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(IPv4HeaderLen + payloadLen),
			ID:          uint16(ipv4ID.Add(1)),
			TTL:         replyTTL,
			Protocol:    uint8(proto),
			SrcAddr:     TCPIPAddr(src),
			DstAddr:     TCPIPAddr(dst),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		return IPv4HeaderLen
	}
	ip := header.IPv6(b[:IPv6HeaderLen])
	ip.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(payloadLen),
		TransportProtocol: proto,
		HopLimit:          replyTTL,
		SrcAddr:           TCPIPAddr(src),
		DstAddr:           TCPIPAddr(dst),
	})
	return IPv6HeaderLen
}

// BuildUDP writes a complete IP/UDP packet from src to dst carrying payload
// into b, which must have room for the headers and the payload, and returns
// the packet. payload may already sit at its place in b.
func BuildUDP(b []byte, src, dst netip.AddrPort, payload []byte) []byte {
	hl := IPHeaderLen(dst.Addr())
	n := hl + UDPHeaderLen + len(payload)
	b = b[:n]
	copy(b[hl+UDPHeaderLen:], payload) // no-op when payload is already in place
	PutIPHeader(b, src.Addr(), dst.Addr(), header.UDPProtocolNumber, UDPHeaderLen+len(payload))
	u := header.UDP(b[hl:])
	u.Encode(&header.UDPFields{
		SrcPort: src.Port(),
		DstPort: dst.Port(),
		Length:  uint16(UDPHeaderLen + len(payload)),
	})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, TCPIPAddr(src.Addr()), TCPIPAddr(dst.Addr()), uint16(UDPHeaderLen+len(payload)))
	xsum = checksum.Checksum(b[hl+UDPHeaderLen:], xsum)
	sum := ^u.CalculateChecksum(xsum)
	if sum == 0 {
		sum = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	u.SetChecksum(sum)
	return b
}

// ICMPQuoteLen is how much of the offending packet an ICMP error quotes:
// RFC 792 asks for the IP header plus 8 bytes; RFC 4443 for as much as fits
// in the minimum MTU, of which a header plus a UDP header is plenty here.
const ICMPQuoteLen = IPv6HeaderLen + 64

// BuildPortUnreachable writes an ICMP "port unreachable" error to b, from the
// destination the client tried (src) to the client (dst), quoting orig (the
// start of the client's packet), and returns it. It tells a client at once
// that its datagrams cannot be carried, where silence would make it wait for
// a timeout: Linux and gVisor turn it into ECONNREFUSED on a connected
// socket (gVisor ignores "administratively prohibited" for UDP).
func BuildPortUnreachable(b []byte, src, dst netip.Addr, orig []byte) []byte {
	if len(orig) > ICMPQuoteLen {
		orig = orig[:ICMPQuoteLen]
	}
	hl := IPHeaderLen(dst)
	const icmpHeaderLen = 8
	n := hl + icmpHeaderLen + len(orig)
	b = b[:n]
	msg := b[hl:]
	clear(msg[:icmpHeaderLen])
	copy(msg[icmpHeaderLen:], orig)
	if dst.Is4() {
		PutIPHeader(b, src, dst, header.ICMPv4ProtocolNumber, len(msg))
		ic := header.ICMPv4(msg)
		ic.SetType(header.ICMPv4DstUnreachable)
		ic.SetCode(header.ICMPv4PortUnreachable)
		ic.SetChecksum(^checksum.Checksum(msg, 0))
		return b
	}
	PutIPHeader(b, src, dst, header.ICMPv6ProtocolNumber, len(msg))
	ic := header.ICMPv6(msg)
	ic.SetType(header.ICMPv6DstUnreachable)
	ic.SetCode(header.ICMPv6PortUnreachable)
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: ic, Src: TCPIPAddr(src), Dst: TCPIPAddr(dst),
	}))
	return b
}

// AppendUSO appends to b one packet carrying payloads (equal sizes but for
// a shorter last one) from src to dst, for a device to cut into datagrams
// of len(payloads[0]) bytes (USO). The kernel's rules
// (virtio_net_hdr_to_skb, __udp_gso_segment): the IP and UDP length fields
// cover the whole packet, and the checksum field holds the pseudo-header
// sum over that length, for each datagram's to be completed when cut.
func AppendUSO(b []byte, src, dst netip.AddrPort, payloads [][]byte) []byte {
	start := len(b)
	hl := IPHeaderLen(dst.Addr())
	udpLen := UDPHeaderLen
	for _, p := range payloads {
		udpLen += len(p)
	}
	b = append(b, make([]byte, hl+UDPHeaderLen)...)
	for _, p := range payloads {
		b = append(b, p...)
	}
	pkt := b[start:]
	PutIPHeader(pkt, src.Addr(), dst.Addr(), header.UDPProtocolNumber, udpLen)
	u := header.UDP(pkt[hl:])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(udpLen)})
	u.SetChecksum(header.PseudoHeaderChecksum(header.UDPProtocolNumber, TCPIPAddr(src.Addr()), TCPIPAddr(dst.Addr()), uint16(udpLen)))
	return b
}
