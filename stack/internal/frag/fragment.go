package frag

import "encoding/binary"

// Minimum MTUs the fragmenter accepts: RFC 791's 68 for IPv4, RFC 8200's
// 1280 for IPv6.
const (
	minMTU4 = 68
	minMTU6 = 1280
)

// AppendFragments appends to b the fragments of pkt, a whole IPv4 packet or
// an IPv6 packet without extension headers, each at most mtu bytes long,
// one after another, and appends their lengths to lens. IPv4 fragments keep
// pkt's identification, and pkt must not forbid fragmenting (DF): the
// stack builds its replies without it. IPv6 fragments carry id in their
// Fragment header (RFC 8200 section 4.5). A packet that fits the MTU is
// appended whole; ok is false, and nothing appended, for a packet that
// cannot be cut (too short to parse, DF set, an MTU below the minimum).
func AppendFragments(b []byte, lens []int, pkt []byte, mtu int, id uint32) (_ []byte, _ []int, ok bool) {
	if len(pkt) <= mtu {
		return append(b, pkt...), append(lens, len(pkt)), true
	}
	if len(pkt) == 0 {
		return b, lens, false
	}
	switch pkt[0] >> 4 {
	case 4:
		return appendFragments4(b, lens, pkt, mtu)
	case 6:
		return appendFragments6(b, lens, pkt, mtu, id)
	}
	return b, lens, false
}

func appendFragments4(b []byte, lens []int, pkt []byte, mtu int) ([]byte, []int, bool) {
	if len(pkt) < ipv4HeaderLen || mtu < minMTU4 {
		return b, lens, false
	}
	hl := int(pkt[0]&0xf) * 4
	tl := int(binary.BigEndian.Uint16(pkt[2:]))
	flags := binary.BigEndian.Uint16(pkt[6:])
	if hl < ipv4HeaderLen || tl != len(pkt) || hl > tl || flags&0x4000 != 0 || mtu-hl < 8 {
		return b, lens, false
	}
	// pkt may itself be a fragment (offset and MF): its pieces keep
	// their place in the whole.
	base, more := int(flags&0x1fff)*8, flags&0x2000 != 0
	payload := pkt[hl:]
	step := (mtu - hl) &^ 7
	for off := 0; off < len(payload); off += step {
		n := min(step, len(payload)-off)
		start := len(b)
		b = append(b, pkt[:hl]...)
		b = append(b, payload[off:off+n]...)
		h := b[start : start+hl]
		binary.BigEndian.PutUint16(h[2:], uint16(hl+n))
		v := uint16((base + off) / 8)
		if more || off+n < len(payload) {
			v |= 0x2000
		}
		binary.BigEndian.PutUint16(h[6:], v)
		setIPv4Checksum(h)
		lens = append(lens, hl+n)
	}
	return b, lens, true
}

func appendFragments6(b []byte, lens []int, pkt []byte, mtu int, id uint32) ([]byte, []int, bool) {
	if len(pkt) < ipv6HeaderLen || mtu < minMTU6 ||
		int(binary.BigEndian.Uint16(pkt[4:]))+ipv6HeaderLen != len(pkt) {
		return b, lens, false
	}
	nh := pkt[6]
	if nh == protoHopByHop || nh == protoRouting || nh == protoDestOptions || nh == protoFragment {
		return b, lens, false // not built by the stack: no extension headers
	}
	payload := pkt[ipv6HeaderLen:]
	step := (mtu - ipv6HeaderLen - fragmentHdrLen) &^ 7
	for off := 0; off < len(payload); off += step {
		n := min(step, len(payload)-off)
		start := len(b)
		b = append(b, pkt[:ipv6HeaderLen]...)
		b = append(b, nh, 0, 0, 0, 0, 0, 0, 0)
		b = append(b, payload[off:off+n]...)
		h := b[start:]
		binary.BigEndian.PutUint16(h[4:], uint16(fragmentHdrLen+n))
		h[6] = protoFragment
		fh := h[ipv6HeaderLen:]
		v := uint16(off)
		if off+n < len(payload) {
			v |= 1
		}
		binary.BigEndian.PutUint16(fh[2:], v)
		binary.BigEndian.PutUint32(fh[4:], id)
		lens = append(lens, ipv6HeaderLen+fragmentHdrLen+n)
	}
	return b, lens, true
}
