package stack

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

const (
	ipv4HeaderLen = header.IPv4MinimumSize
	ipv6HeaderLen = header.IPv6MinimumSize
	udpHeaderLen  = header.UDPMinimumSize
	replyTTL      = 64
)

var ipv4ID atomic.Uint32

func tcpipAddr(a netip.Addr) tcpip.Address {
	if a.Is4() {
		return tcpip.AddrFrom4(a.As4())
	}
	return tcpip.AddrFrom16(a.As16())
}

// ipHeaderLen is the IP header length for packets between these addresses.
func ipHeaderLen(dst netip.Addr) int {
	if dst.Is4() {
		return ipv4HeaderLen
	}
	return ipv6HeaderLen
}

// putIPHeader writes an IPv4 or IPv6 header for a packet of payloadLen bytes
// of transport protocol proto to the front of b and returns its length.
func putIPHeader(b []byte, src, dst netip.Addr, proto tcpip.TransportProtocolNumber, payloadLen int) int {
	if dst.Is4() {
		ip := header.IPv4(b[:ipv4HeaderLen])
		ip.Encode(&header.IPv4Fields{
			TotalLength: uint16(ipv4HeaderLen + payloadLen),
			ID:          uint16(ipv4ID.Add(1)),
			TTL:         replyTTL,
			Protocol:    uint8(proto),
			SrcAddr:     tcpipAddr(src),
			DstAddr:     tcpipAddr(dst),
		})
		ip.SetChecksum(^ip.CalculateChecksum())
		return ipv4HeaderLen
	}
	ip := header.IPv6(b[:ipv6HeaderLen])
	ip.Encode(&header.IPv6Fields{
		PayloadLength:     uint16(payloadLen),
		TransportProtocol: proto,
		HopLimit:          replyTTL,
		SrcAddr:           tcpipAddr(src),
		DstAddr:           tcpipAddr(dst),
	})
	return ipv6HeaderLen
}

// buildUDP writes a complete IP/UDP packet from src to dst carrying payload
// into b, which must have room for the headers and the payload, and returns
// the packet. payload may already sit at its place in b.
func buildUDP(b []byte, src, dst netip.AddrPort, payload []byte) []byte {
	hl := ipHeaderLen(dst.Addr())
	n := hl + udpHeaderLen + len(payload)
	b = b[:n]
	copy(b[hl+udpHeaderLen:], payload) // no-op when payload is already in place
	putIPHeader(b, src.Addr(), dst.Addr(), header.UDPProtocolNumber, udpHeaderLen+len(payload))
	u := header.UDP(b[hl:])
	u.Encode(&header.UDPFields{
		SrcPort: src.Port(),
		DstPort: dst.Port(),
		Length:  uint16(udpHeaderLen + len(payload)),
	})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, tcpipAddr(src.Addr()), tcpipAddr(dst.Addr()), uint16(udpHeaderLen+len(payload)))
	xsum = checksum.Checksum(b[hl+udpHeaderLen:], xsum)
	sum := ^u.CalculateChecksum(xsum)
	if sum == 0 {
		sum = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	u.SetChecksum(sum)
	return b
}

// icmpQuoteLen is how much of the offending packet an ICMP error quotes:
// RFC 792 asks for the IP header plus 8 bytes; RFC 4443 for as much as fits
// in the minimum MTU, of which a header plus a UDP header is plenty here.
const icmpQuoteLen = ipv6HeaderLen + 64

// buildPortUnreachable writes an ICMP "port unreachable" error to b, from the
// destination the client tried (src) to the client (dst), quoting orig (the
// start of the client's packet), and returns it. It tells a client at once
// that its datagrams cannot be carried, where silence would make it wait for
// a timeout: Linux and gVisor turn it into ECONNREFUSED on a connected
// socket (gVisor ignores "administratively prohibited" for UDP).
func buildPortUnreachable(b []byte, src, dst netip.Addr, orig []byte) []byte {
	if len(orig) > icmpQuoteLen {
		orig = orig[:icmpQuoteLen]
	}
	hl := ipHeaderLen(dst)
	const icmpHeaderLen = 8
	n := hl + icmpHeaderLen + len(orig)
	b = b[:n]
	msg := b[hl:]
	clear(msg[:icmpHeaderLen])
	copy(msg[icmpHeaderLen:], orig)
	if dst.Is4() {
		putIPHeader(b, src, dst, header.ICMPv4ProtocolNumber, len(msg))
		ic := header.ICMPv4(msg)
		ic.SetType(header.ICMPv4DstUnreachable)
		ic.SetCode(header.ICMPv4PortUnreachable)
		ic.SetChecksum(^checksum.Checksum(msg, 0))
		return b
	}
	putIPHeader(b, src, dst, header.ICMPv6ProtocolNumber, len(msg))
	ic := header.ICMPv6(msg)
	ic.SetType(header.ICMPv6DstUnreachable)
	ic.SetCode(header.ICMPv6PortUnreachable)
	ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
		Header: ic, Src: tcpipAddr(src), Dst: tcpipAddr(dst),
	}))
	return b
}
