package stack

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// A device opened with IFF_VNET_HDR puts a struct virtio_net_hdr
// (include/uapi/linux/virtio_net.h) in front of every packet. It is how
// the kernel hands over a TCP segment of up to 64 KiB that it has not cut
// to the MTU yet (GSO), or a packet whose checksum it left for the
// receiver to complete, and how we hand it the same.
const vnetHdrLen = 10

const (
	vnetFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	vnetFlagDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID

	vnetGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	vnetGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	vnetGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	vnetGSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4 (USO)
	vnetGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN, or'ed into the type
)

// gsoMaxSize is the largest segment we hand the kernel: the most an IPv4
// total length can say. gVisor keeps a segment's payload below
// gsoMaxSize minus the largest TCP/IP header.
const gsoMaxSize = 1 << 16

// vnetHdr is struct virtio_net_hdr. A TUN device reads and writes it in
// the host's byte order unless told otherwise (tun_is_little_endian, and
// we never set TUNSETVNETBE).
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16 // Ethernet, IP and TCP headers (no Ethernet on a TUN)
	gsoSize    uint16 // payload bytes per segment once cut
	csumStart  uint16 // where the checksummed part starts
	csumOffset uint16 // where, from csumStart, the checksum goes
}

func decodeVnetHdr(b []byte) (vnetHdr, bool) {
	if len(b) < vnetHdrLen {
		return vnetHdr{}, false
	}
	e := binary.NativeEndian
	return vnetHdr{
		flags:      b[0],
		gsoType:    b[1],
		hdrLen:     e.Uint16(b[2:]),
		gsoSize:    e.Uint16(b[4:]),
		csumStart:  e.Uint16(b[6:]),
		csumOffset: e.Uint16(b[8:]),
	}, true
}

func (h vnetHdr) encode(b []byte) {
	e := binary.NativeEndian
	b[0] = h.flags
	b[1] = h.gsoType
	e.PutUint16(b[2:], h.hdrLen)
	e.PutUint16(b[4:], h.gsoSize)
	e.PutUint16(b[6:], h.csumStart)
	e.PutUint16(b[8:], h.csumOffset)
}

// outboundVnetHdr describes a packet gVisor built for a link with host GSO:
// every segment of a TCP endpoint carries only the pseudo-header sum in its
// checksum field (CHECKSUM_PARTIAL), and one longer than the MSS is to be
// cut by the kernel. Packets gVisor built without GSO (a forwarder's RST)
// are complete and get an empty header. The field rules are the kernel's
// virtio_net_hdr_to_skb.
func outboundVnetHdr(pkt *stack.PacketBuffer) vnetHdr {
	g := pkt.GSOOptions
	var h vnetHdr
	if g.Type != stack.GSOTCPv4 && g.Type != stack.GSOTCPv6 {
		return h
	}
	h.hdrLen = uint16(pkt.HeaderSize())
	if g.NeedsCsum {
		h.flags = vnetFlagNeedsCsum
		h.csumStart = g.L3HdrLen
		h.csumOffset = g.CsumOffset
	}
	if pkt.Data().Size() > int(g.MSS) {
		h.gsoType = vnetGSOTCPv4
		if g.Type == stack.GSOTCPv6 {
			h.gsoType = vnetGSOTCPv6
		}
		h.gsoSize = g.MSS
	}
	return h
}

// inboundKind is what a packet read with a vnet header needs before the
// stack can take it.
type inboundKind int

const (
	inboundDrop      inboundKind = iota // malformed, or a kind we never asked for
	inboundPlain                        // a complete packet, checksums to be verified
	inboundValidated                    // the kernel vouches for its checksums
	inboundSegment                      // a TCP segment longer than the MSS; checksums vouched for
	inboundDatagrams                    // UDP datagrams of one flow in one packet (USO), to be split
)

// prepareInbound makes pkt, read behind header h, into a packet the stack
// can take, in place, and says how. A packet with a partial checksum gets it
// completed, so that every later reader (the UDP path, gVisor) sees an
// ordinary packet. A TCP segment longer than the MSS goes to gVisor whole,
// with its IP length fields made to cover it: gVisor's TCP takes a segment
// of any length its window allows, as Linux GRO delivers them, so it is
// never cut up here.
func prepareInbound(h vnetHdr, pkt []byte) inboundKind {
	switch h.gsoType &^ vnetGSOECN {
	case vnetGSONone:
		if h.flags&vnetFlagNeedsCsum != 0 {
			if !completeChecksum(pkt, int(h.csumStart), int(h.csumOffset)) {
				return inboundDrop
			}
			return inboundValidated
		}
		if h.flags&vnetFlagDataValid != 0 {
			return inboundValidated
		}
		// gVisor trusts every packet of a link that offloads checksums
		// (the NIC, not the packet, says so), so one that nobody
		// vouched for is verified here.
		if !checksumsValid(pkt) {
			return inboundDrop
		}
		return inboundPlain
	case vnetGSOTCPv4:
		if len(pkt) < header.IPv4MinimumSize || header.IPVersion(pkt) != header.IPv4Version {
			return inboundDrop
		}
		ip := header.IPv4(pkt)
		if ip.Protocol() != uint8(header.TCPProtocolNumber) || len(pkt) > 0xffff || int(ip.HeaderLength()) < header.IPv4MinimumSize {
			return inboundDrop
		}
		if int(ip.TotalLength()) != len(pkt) {
			ip.SetTotalLength(uint16(len(pkt)))
			ip.SetChecksum(0)
			ip.SetChecksum(^ip.CalculateChecksum())
		}
		return inboundSegment
	case vnetGSOTCPv6:
		if len(pkt) < header.IPv6MinimumSize || header.IPVersion(pkt) != header.IPv6Version ||
			len(pkt)-header.IPv6MinimumSize > 0xffff {
			return inboundDrop
		}
		header.IPv6(pkt).SetPayloadLength(uint16(len(pkt) - header.IPv6MinimumSize))
		return inboundSegment
	case vnetGSOUDPL4:
		if h.gsoSize == 0 {
			return inboundDrop
		}
		return inboundDatagrams
	}
	return inboundDrop // UFO and the like: never enabled
}

// splitDatagrams cuts a USO packet (one IP and UDP header, then datagrams
// of gsoSize bytes but for a shorter last one) into complete packets, as
// the kernel's __udp_gso_segment would, and hands each to deliver. scratch
// must have room for the longest such packet; it is reused for each.
func splitDatagrams(pkt []byte, gsoSize int, scratch []byte, deliver func([]byte)) bool {
	var hl int
	switch {
	case len(pkt) >= header.IPv4MinimumSize && header.IPVersion(pkt) == header.IPv4Version:
		ip := header.IPv4(pkt)
		hl = int(ip.HeaderLength())
		if hl < header.IPv4MinimumSize || ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 {
			return false
		}
	case len(pkt) >= header.IPv6MinimumSize && header.IPVersion(pkt) == header.IPv6Version:
		hl = header.IPv6MinimumSize
		if header.IPv6(pkt).TransportProtocol() != header.UDPProtocolNumber {
			return false
		}
	default:
		return false
	}
	if len(pkt) < hl+udpHeaderLen || gsoSize <= 0 {
		return false
	}
	payload := pkt[hl+udpHeaderLen:]
	hdrs := pkt[:hl+udpHeaderLen]
	for first := true; len(payload) > 0; first = false {
		n := min(gsoSize, len(payload))
		if len(scratch) < len(hdrs)+n {
			return false
		}
		out := append(scratch[:0], hdrs...)
		out = append(out, payload[:n]...)
		payload = payload[n:]
		fixUDPSegment(out, hl, first)
		deliver(out)
	}
	return true
}

// fixUDPSegment makes the lengths and checksums of one datagram cut from a
// USO packet true. IPv4 segments after the first get IDs of their own, as
// the kernel gives them.
func fixUDPSegment(out []byte, hl int, first bool) {
	udpLen := len(out) - hl
	var src, dst tcpip.Address
	if header.IPVersion(out) == header.IPv4Version {
		ip := header.IPv4(out)
		ip.SetTotalLength(uint16(len(out)))
		if !first {
			ip.SetID(uint16(ipv4ID.Add(1)))
		}
		ip.SetChecksum(0)
		ip.SetChecksum(^ip.CalculateChecksum())
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	} else {
		ip := header.IPv6(out)
		ip.SetPayloadLength(uint16(udpLen))
		src, dst = ip.SourceAddress(), ip.DestinationAddress()
	}
	u := header.UDP(out[hl:])
	u.SetLength(uint16(udpLen))
	u.SetChecksum(0)
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, src, dst, uint16(udpLen))
	sum := ^checksum.Checksum(out[hl:], xsum)
	if sum == 0 {
		sum = 0xffff
	}
	u.SetChecksum(sum)
}

// completeChecksum finishes a CHECKSUM_PARTIAL packet as a NIC would: the
// checksum field at start+offset holds the pseudo-header sum, and the sum
// over everything from start is folded into it.
func completeChecksum(pkt []byte, start, offset int) bool {
	at := start + offset
	// An odd offset would put the field across the 16-bit words the sum
	// is made of; every transport's checksum sits at an even one.
	if start >= len(pkt) || at+2 > len(pkt) || offset%2 != 0 {
		return false
	}
	sum := ^checksum.Checksum(pkt[start:], 0)
	if sum == 0 {
		sum = 0xffff // 0 means "no checksum" to UDP; both are zero in ones' complement
	}
	binary.BigEndian.PutUint16(pkt[at:], sum)
	return true
}

// checksumsValid verifies what gVisor would have: the IPv4 header checksum,
// and the TCP, UDP or ICMP checksum of a packet that is not a fragment and,
// for IPv6, has no extension headers. What it cannot see (the transport
// checksum of a fragment) it lets through; anything that is not IP goes on
// to be refused by gVisor.
func checksumsValid(pkt []byte) bool {
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
