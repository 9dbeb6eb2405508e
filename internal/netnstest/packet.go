package netnstest

import (
	"encoding/binary"
	"fmt"
	"net/netip"
)

// Packets for tests that write into a TUN and read from it: UDP datagrams
// in IPv4 or IPv6, built and parsed by hand so that a test sees every byte
// the kernel gets or gives.

const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	udpHeaderLen  = 8
	protoUDP      = 17
)

// UDPPacket returns an IPv4 or IPv6 packet carrying one UDP datagram from
// src to dst, with valid checksums, TTL 64 and no options or extension
// headers. src and dst must be of one family; an IPv4-mapped IPv6 address
// counts as IPv6, so Unmap addresses taken from a dual-stack socket.
func UDPPacket(src, dst netip.AddrPort, payload []byte) []byte {
	s, d := src.Addr(), dst.Addr()
	if s.Is4() != d.Is4() {
		panic(fmt.Sprintf("netnstest.UDPPacket: %s and %s are of different families", s, d))
	}
	udpLen := udpHeaderLen + len(payload)
	var pkt, udp []byte
	if s.Is4() {
		pkt = make([]byte, ipv4HeaderLen+udpLen)
		ip := pkt[:ipv4HeaderLen]
		ip[0] = 0x45 // version 4, 5 words of header
		binary.BigEndian.PutUint16(ip[2:], uint16(len(pkt)))
		binary.BigEndian.PutUint16(ip[6:], 0x4000) // don't fragment
		ip[8] = 64
		ip[9] = protoUDP
		s4, d4 := s.As4(), d.As4()
		copy(ip[12:16], s4[:])
		copy(ip[16:20], d4[:])
		binary.BigEndian.PutUint16(ip[10:], ^checksum(0, ip))
		udp = pkt[ipv4HeaderLen:]
	} else {
		pkt = make([]byte, ipv6HeaderLen+udpLen)
		ip := pkt[:ipv6HeaderLen]
		ip[0] = 0x60
		binary.BigEndian.PutUint16(ip[4:], uint16(udpLen))
		ip[6] = protoUDP
		ip[7] = 64
		s16, d16 := s.As16(), d.As16()
		copy(ip[8:24], s16[:])
		copy(ip[24:40], d16[:])
		udp = pkt[ipv6HeaderLen:]
	}
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(udpLen))
	copy(udp[udpHeaderLen:], payload)
	sum := ^checksum(pseudoHeaderSum(s, d, udpLen), udp)
	if sum == 0 {
		sum = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(udp[6:], sum)
	return pkt
}

// ParseUDP returns the addresses and payload of pkt if it is an IPv4 or
// IPv6 packet carrying a whole UDP datagram right after the IP header (no
// fragments, no IPv6 extension headers); ok is false otherwise. Checksums
// are not verified.
func ParseUDP(pkt []byte) (src, dst netip.AddrPort, payload []byte, ok bool) {
	if len(pkt) < 1 {
		return src, dst, nil, false
	}
	var s, d netip.Addr
	var udp []byte
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < ipv4HeaderLen {
			return src, dst, nil, false
		}
		hl := int(pkt[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(pkt[2:]))
		fragment := binary.BigEndian.Uint16(pkt[6:])&0x3fff != 0 // MF or an offset
		if hl < ipv4HeaderLen || total < hl || total > len(pkt) || pkt[9] != protoUDP || fragment {
			return src, dst, nil, false
		}
		s = netip.AddrFrom4([4]byte(pkt[12:16]))
		d = netip.AddrFrom4([4]byte(pkt[16:20]))
		udp = pkt[hl:total]
	case 6:
		if len(pkt) < ipv6HeaderLen || pkt[6] != protoUDP {
			return src, dst, nil, false
		}
		total := ipv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:]))
		if total > len(pkt) {
			return src, dst, nil, false
		}
		s = netip.AddrFrom16([16]byte(pkt[8:24]))
		d = netip.AddrFrom16([16]byte(pkt[24:40]))
		udp = pkt[ipv6HeaderLen:total]
	default:
		return src, dst, nil, false
	}
	if len(udp) < udpHeaderLen {
		return src, dst, nil, false
	}
	n := int(binary.BigEndian.Uint16(udp[4:]))
	if n < udpHeaderLen || n > len(udp) {
		return src, dst, nil, false
	}
	src = netip.AddrPortFrom(s, binary.BigEndian.Uint16(udp[0:]))
	dst = netip.AddrPortFrom(d, binary.BigEndian.Uint16(udp[2:]))
	return src, dst, udp[udpHeaderLen:n], true
}

// pseudoHeaderSum is the unfolded sum of the UDP pseudo-header (RFC 768;
// RFC 8200 section 8.1 for IPv6).
func pseudoHeaderSum(src, dst netip.Addr, udpLen int) uint32 {
	sum := checksum(0, src.AsSlice())
	sum = checksum(uint32(sum), dst.AsSlice())
	return uint32(sum) + protoUDP + uint32(udpLen)
}

// checksum adds b to the running one's-complement sum (RFC 1071) and
// returns it folded to 16 bits, not inverted.
func checksum(initial uint32, b []byte) uint16 {
	sum := initial
	for len(b) >= 2 {
		sum += uint32(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}
