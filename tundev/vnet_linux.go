package tundev

import (
	"encoding/binary"
	"math/bits"
	"sync/atomic"

	"github.com/netstackd/netstackd/internal/device"
)

// A device opened with IFF_VNET_HDR puts a struct virtio_net_hdr
// (include/uapi/linux/virtio_net.h) in front of every packet. It is how the
// kernel hands over a TCP segment of up to 64 KiB that it has not cut to
// the MTU yet (GSO), or a packet whose checksum it left for the receiver to
// complete, and how we hand it the same. The header stops here: the stack
// sees device.Meta.

const (
	vnetFlagNeedsCsum = 1 // VIRTIO_NET_HDR_F_NEEDS_CSUM
	vnetFlagDataValid = 2 // VIRTIO_NET_HDR_F_DATA_VALID

	vnetGSONone  = 0    // VIRTIO_NET_HDR_GSO_NONE
	vnetGSOTCPv4 = 1    // VIRTIO_NET_HDR_GSO_TCPV4
	vnetGSOTCPv6 = 4    // VIRTIO_NET_HDR_GSO_TCPV6
	vnetGSOUDPL4 = 5    // VIRTIO_NET_HDR_GSO_UDP_L4 (USO)
	vnetGSOECN   = 0x80 // VIRTIO_NET_HDR_GSO_ECN, or'ed into the type
)

// Fixed header sizes (RFC 791, RFC 8200, RFC 768).
const (
	ipv4HeaderLen = 20
	ipv6HeaderLen = 40
	udpHeaderLen  = 8
	protoTCP      = 6
	protoUDP      = 17
)

// vnetHdr is struct virtio_net_hdr. A TUN device reads and writes it in the
// host's byte order unless told otherwise (tun_is_little_endian, and we
// never set TUNSETVNETBE).
type vnetHdr struct {
	flags      uint8
	gsoType    uint8
	hdrLen     uint16 // IP and transport headers (no Ethernet on a TUN)
	gsoSize    uint16 // payload bytes per segment once cut
	csumStart  uint16 // where the checksummed part starts
	csumOffset uint16 // where, from csumStart, the checksum goes
}

func decodeVnetHdr(b []byte) (vnetHdr, bool) {
	if len(b) < VnetHdrLen {
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

// encodeVnetHdr writes the header that tells the kernel what m says. The
// field rules are the kernel's virtio_net_hdr_to_skb.
func encodeVnetHdr(b []byte, m device.Meta) {
	var h vnetHdr
	if m.NeedsCsum {
		h.flags = vnetFlagNeedsCsum
		h.csumStart, h.csumOffset = m.CsumStart, m.CsumOffset
	}
	switch m.GSO {
	case device.GSOTCPv4:
		h.gsoType = vnetGSOTCPv4
	case device.GSOTCPv6:
		h.gsoType = vnetGSOTCPv6
	case device.GSOUDP:
		h.gsoType = vnetGSOUDPL4
	}
	if h.gsoType != vnetGSONone {
		h.hdrLen, h.gsoSize = m.HdrLen, m.GSOSize
	}
	h.encode(b)
}

// inbound makes pkt, read behind header h, into a packet the stack can
// take, in place, and says what it is. A packet with a partial checksum
// gets it completed. A TCP segment longer than the MSS stays whole, with
// its IP length fields made to cover it: the stack's TCP takes a segment of
// any length its window allows, as Linux GRO delivers them. A USO packet is
// reported as GSOUDP, for the caller to split. ok is false for a packet to
// drop: malformed, or of a kind we never asked for.
func (h vnetHdr) inbound(pkt []byte) (m device.Meta, ok bool) {
	switch h.gsoType &^ vnetGSOECN {
	case vnetGSONone:
		if h.flags&vnetFlagNeedsCsum != 0 {
			if !completeChecksum(pkt, int(h.csumStart), int(h.csumOffset)) {
				return m, false
			}
			return device.Meta{Verified: true}, true
		}
		return device.Meta{Verified: h.flags&vnetFlagDataValid != 0}, true
	case vnetGSOTCPv4:
		if len(pkt) < ipv4HeaderLen || pkt[0]>>4 != 4 || pkt[9] != protoTCP || len(pkt) > 0xffff || int(pkt[0]&0xf)*4 < ipv4HeaderLen {
			return m, false
		}
		if int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) {
			binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
			setIPv4Checksum(pkt)
		}
		return device.Meta{GSO: device.GSOTCPv4, GSOSize: h.gsoSize, Verified: true}, true
	case vnetGSOTCPv6:
		if len(pkt) < ipv6HeaderLen || pkt[0]>>4 != 6 || len(pkt)-ipv6HeaderLen > 0xffff {
			return m, false
		}
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-ipv6HeaderLen))
		return device.Meta{GSO: device.GSOTCPv6, GSOSize: h.gsoSize, Verified: true}, true
	case vnetGSOUDPL4:
		if h.gsoSize == 0 {
			return m, false
		}
		return device.Meta{GSO: device.GSOUDP, GSOSize: h.gsoSize, Verified: true}, true
	}
	return m, false // UFO and the like: never enabled
}

// usoHeaders checks that pkt is an unfragmented IPv4, or IPv6 without
// extension headers, UDP packet and returns its IP header length.
func usoHeaders(pkt []byte) (int, bool) {
	var hl int
	switch {
	case len(pkt) >= ipv4HeaderLen && pkt[0]>>4 == 4:
		hl = int(pkt[0]&0xf) * 4
		frag := binary.BigEndian.Uint16(pkt[6:])
		if hl < ipv4HeaderLen || pkt[9] != protoUDP || frag&0x3fff != 0 {
			return 0, false
		}
	case len(pkt) >= ipv6HeaderLen && pkt[0]>>4 == 6:
		hl = ipv6HeaderLen
		if pkt[6] != protoUDP {
			return 0, false
		}
	default:
		return 0, false
	}
	if len(pkt) < hl+udpHeaderLen {
		return 0, false
	}
	return hl, true
}

// splitUSO cuts a USO packet (one IP and UDP header, then datagrams of
// gsoSize bytes but a shorter last one), read into b's current buffer, into
// complete datagrams as the kernel's __udp_gso_segment would: the first
// stays where it is, the next go to the following buffers, and what finds
// no buffer waits in q.rest for the next read.
func (q *queue) splitUSO(b *readBatch, pkt []byte, gsoSize int) bool {
	hl, ok := usoHeaders(pkt)
	if !ok || gsoSize <= 0 {
		return false
	}
	hdrs, payload := pkt[:hl+udpHeaderLen], pkt[hl+udpHeaderLen:]
	first := b.count
	n := min(gsoSize, len(payload))
	rest := payload[n:]
	b.count++
	for len(rest) > 0 && b.count < len(b.bufs) {
		if !b.emit(hdrs, rest[:min(gsoSize, len(rest))], false) {
			b.count = first // none of them, then
			return false
		}
		rest = rest[min(gsoSize, len(rest)):]
	}
	if len(rest) > 0 {
		q.rest.keep(hdrs, rest, gsoSize)
		b.full = true
	}
	// The first datagram last: the others were cut from behind it.
	out := pkt[:hl+udpHeaderLen+n]
	fixUDPSegment(out, hl, true)
	b.sizes[first] = len(out)
	b.metas[first] = device.Meta{Verified: true}
	return true
}

// emit puts one datagram, hdrs then payload, in the batch's next buffer.
func (b *readBatch) emit(hdrs, payload []byte, first bool) bool {
	buf := b.bufs[b.count][b.offset:]
	if len(buf) < len(hdrs)+len(payload) {
		return false
	}
	out := append(buf[:0], hdrs...)
	out = append(out, payload...)
	fixUDPSegment(out, len(hdrs)-udpHeaderLen, first)
	b.sizes[b.count] = len(out)
	b.metas[b.count] = device.Meta{Verified: true}
	b.count++
	return true
}

// usoRest is what is left of a USO packet: its headers, then the payload
// of the datagrams not handed out yet.
type usoRest struct {
	buf     []byte
	hdrLen  int // IP and UDP headers at the front of buf
	gsoSize int
}

func (r *usoRest) pending() bool { return len(r.buf) > r.hdrLen }

func (r *usoRest) keep(hdrs, rest []byte, gsoSize int) {
	r.buf = append(append(r.buf[:0], hdrs...), rest...)
	r.hdrLen, r.gsoSize = len(hdrs), gsoSize
}

// emit hands out as many of the kept datagrams as b has buffers for.
func (r *usoRest) emit(b *readBatch) {
	hdrs, payload := r.buf[:r.hdrLen], r.buf[r.hdrLen:]
	for len(payload) > 0 && b.count < len(b.bufs) {
		n := min(r.gsoSize, len(payload))
		if !b.emit(hdrs, payload[:n], false) {
			payload = nil // a buffer too short for it: give up on the rest
			break
		}
		payload = payload[n:]
	}
	if len(payload) == 0 {
		r.buf, r.hdrLen = r.buf[:0], 0
	} else {
		r.buf = append(r.buf[:r.hdrLen], payload...)
		b.full = true
	}
}

// ipv4ID numbers the IPv4 datagrams cut from a USO packet after the first,
// as the kernel gives each segment an ID of its own.
var ipv4ID atomic.Uint32

// fixUDPSegment makes the lengths and checksums of one datagram cut from a
// USO packet true.
func fixUDPSegment(out []byte, hl int, first bool) {
	udpLen := len(out) - hl
	var sum uint64
	if out[0]>>4 == 4 {
		binary.BigEndian.PutUint16(out[2:], uint16(len(out)))
		if !first {
			binary.BigEndian.PutUint16(out[4:], uint16(ipv4ID.Add(1)))
		}
		setIPv4Checksum(out[:hl])
		sum = pseudoHeaderSum(out[12:16], out[16:20], protoUDP, udpLen)
	} else {
		binary.BigEndian.PutUint16(out[4:], uint16(udpLen))
		sum = pseudoHeaderSum(out[8:24], out[24:40], protoUDP, udpLen)
	}
	u := out[hl:]
	binary.BigEndian.PutUint16(u[4:], uint16(udpLen))
	binary.BigEndian.PutUint16(u[6:], 0)
	c := ^fold(sumBytes(u, sum))
	if c == 0 {
		c = 0xffff // RFC 768: a computed zero is sent as all ones
	}
	binary.BigEndian.PutUint16(u[6:], c)
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
	sum := ^fold(sumBytes(pkt[start:], 0))
	if sum == 0 {
		sum = 0xffff // 0 means "no checksum" to UDP; both are zero in ones' complement
	}
	binary.BigEndian.PutUint16(pkt[at:], sum)
	return true
}

// setIPv4Checksum recomputes the header checksum of an IPv4 packet.
func setIPv4Checksum(pkt []byte) {
	hl := int(pkt[0]&0xf) * 4
	binary.BigEndian.PutUint16(pkt[10:], 0)
	binary.BigEndian.PutUint16(pkt[10:], ^fold(sumBytes(pkt[:hl], 0)))
}

// pseudoHeaderSum is the unfolded sum of a transport checksum's
// pseudo-header (RFC 768, RFC 8200 section 8.1).
func pseudoHeaderSum(src, dst []byte, proto uint8, length int) uint64 {
	sum := sumBytes(src, 0)
	sum = sumBytes(dst, sum)
	return sum + uint64(proto) + uint64(length)
}

// sumBytes adds b to sum as big-endian 16-bit words (RFC 1071), an odd last
// byte padded with zero, and returns the sum unfolded (fold finishes it).
// It adds eight bytes at a time with end-around carry: the ones' complement
// sum of 64-bit words folds to that of the 16-bit words they hold.
func sumBytes(b []byte, sum uint64) uint64 {
	var carry uint64
	for len(b) >= 32 {
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b), carry)
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b[8:]), carry)
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b[16:]), carry)
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b[24:]), carry)
		b = b[32:]
	}
	for len(b) >= 8 {
		sum, carry = bits.Add64(sum, binary.BigEndian.Uint64(b), carry)
		b = b[8:]
	}
	var tail uint64
	for len(b) >= 2 {
		tail = tail<<16 | uint64(binary.BigEndian.Uint16(b))
		b = b[2:]
	}
	if len(b) == 1 {
		tail = tail<<16 | uint64(b[0])<<8
	}
	sum, carry = bits.Add64(sum, tail, carry)
	sum, carry = bits.Add64(sum, 0, carry)
	return sum + carry
}

// fold folds a ones' complement sum to 16 bits.
func fold(sum uint64) uint16 {
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}

// flowQueue picks one of n queues for the flow of a packet given in pieces:
// a hash of its protocol, addresses and, for TCP and UDP, ports. Packets
// without ports (ICMP, IP fragments after the first) hash their addresses
// alone; a packet too short to read goes to queue 0.
//
// A multi-queue TUN hands a flow's packets to the queue that last wrote one
// of that flow (tun_flow_update, tun_automq_select_queue in
// drivers/net/tun.c), so writing everything to queue 0 would pull every
// answered flow onto queue 0 and leave the other readers idle. Keeping a
// flow on one queue also keeps its packets in order.
func flowQueue(pieces [][]byte, n int) int {
	if n <= 1 {
		return 0
	}
	// The hash must see what a whole packet shows, however the packet's
	// headers were split into pieces.
	var head [60 + 4]byte // the longest IPv4 header, then the ports
	l := 0
	for _, p := range pieces {
		l += copy(head[l:], p)
		if l == len(head) {
			break
		}
	}
	return flowQueueOf(head[:l], n)
}

func flowQueueOf(pkt []byte, n int) int {
	if len(pkt) < 1 {
		return 0
	}
	var h uint64
	var l4 []byte
	switch pkt[0] >> 4 {
	case 4:
		if len(pkt) < ipv4HeaderLen {
			return 0
		}
		proto := pkt[9]
		h = uint64(binary.BigEndian.Uint32(pkt[12:]))<<32 | uint64(binary.BigEndian.Uint32(pkt[16:]))
		h ^= uint64(proto)
		ihl := int(pkt[0]&0xf) * 4
		// Only an unfragmented packet or a first fragment has ports.
		if (proto == protoTCP || proto == protoUDP) && binary.BigEndian.Uint16(pkt[6:])&0x1fff == 0 && ihl >= ipv4HeaderLen && len(pkt) >= ihl+4 {
			l4 = pkt[ihl:]
		}
	case 6:
		if len(pkt) < ipv6HeaderLen {
			return 0
		}
		proto := pkt[6]
		for i := 8; i < 40; i += 8 {
			h = mix64(h ^ binary.BigEndian.Uint64(pkt[i:]))
		}
		h ^= uint64(proto)
		if (proto == protoTCP || proto == protoUDP) && len(pkt) >= ipv6HeaderLen+4 {
			l4 = pkt[ipv6HeaderLen:]
		}
	default:
		return 0
	}
	if l4 != nil {
		h ^= uint64(binary.BigEndian.Uint32(l4)) << 8
	}
	// The high bits of a well-mixed hash, scaled to n without a division.
	return int((mix64(h) >> 32) * uint64(n) >> 32)
}

// mix64 is the finalizer of MurmurHash3 (fmix64): every input bit flips
// about half of the output bits, so nearby addresses and ports spread.
func mix64(h uint64) uint64 {
	h ^= h >> 33
	h *= 0xff51afd7ed558ccd
	h ^= h >> 33
	h *= 0xc4ceb9fe1a85ec53
	h ^= h >> 33
	return h
}
