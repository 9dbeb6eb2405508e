package frag

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

const (
	ipv4HeaderLen    = 20
	ipv6HeaderLen    = 40
	fragmentHdrLen   = 8 // RFC 8200 section 4.5
	protoFragment    = 44
	protoHopByHop    = 0
	protoRouting     = 43
	protoDestOptions = 60
	// maxIPv6Headers bounds the extension headers walked before the
	// Fragment header.
	maxIPv6Headers = 8
)

// parsed is a fragment as read from its packet.
type parsed struct {
	key     key
	off     int
	more    bool
	payload []byte // the fragment's part of the packet's payload
	// head is the unfragmentable part; nextHeader the index in head of
	// the byte naming the Fragment header (IPv6).
	head       []byte
	nextHeader int
	proto      uint8 // the upper-layer protocol (IPv6)
	// valid is false for a fragment that breaks the rules: lengths that
	// are not multiples of 8, or a packet longer than IP allows.
	valid bool
}

// parse reads pkt as a fragment: ok is false when it is not one (or not IP
// at all, or too short to tell).
func parse(pkt []byte) (f parsed, ok bool) {
	if len(pkt) == 0 {
		return f, false
	}
	switch pkt[0] >> 4 {
	case 4:
		return parse4(pkt)
	case 6:
		return parse6(pkt)
	}
	return f, false
}

func parse4(pkt []byte) (f parsed, ok bool) {
	if len(pkt) < ipv4HeaderLen {
		return f, false
	}
	hl := int(pkt[0]&0xf) * 4
	tl := int(binary.BigEndian.Uint16(pkt[2:]))
	if hl < ipv4HeaderLen || hl > tl || tl > len(pkt) {
		return f, false
	}
	flags := binary.BigEndian.Uint16(pkt[6:])
	f.more = flags&0x2000 != 0
	f.off = int(flags&0x1fff) * 8
	if !f.more && f.off == 0 {
		return f, false
	}
	f.key = key{
		src:   netip.AddrFrom4([4]byte(pkt[12:16])),
		dst:   netip.AddrFrom4([4]byte(pkt[16:20])),
		id:    uint32(binary.BigEndian.Uint16(pkt[4:])),
		proto: pkt[9],
	}
	f.head = pkt[:hl]
	f.payload = pkt[hl:tl]
	f.valid = f.lengthsValid(hl)
	return f, true
}

func parse6(pkt []byte) (f parsed, ok bool) {
	if len(pkt) < ipv6HeaderLen {
		return f, false
	}
	end := ipv6HeaderLen + int(binary.BigEndian.Uint16(pkt[4:]))
	if end > len(pkt) {
		return f, false
	}
	// Walk the extension headers that may come before the Fragment
	// header (RFC 8200 section 4.1).
	nh, nhAt, pos := pkt[6], 6, ipv6HeaderLen
	for range maxIPv6Headers {
		if nh != protoHopByHop && nh != protoRouting && nh != protoDestOptions {
			break
		}
		if nh == protoHopByHop && pos != ipv6HeaderLen {
			return f, false // Hop-by-Hop comes first or not at all
		}
		if pos+2 > end {
			return f, false
		}
		nh, nhAt, pos = pkt[pos], pos, pos+(int(pkt[pos+1])+1)*8
	}
	if nh != protoFragment || pos+fragmentHdrLen > end {
		return f, false
	}
	fh := pkt[pos : pos+fragmentHdrLen]
	v := binary.BigEndian.Uint16(fh[2:])
	f.off = int(v &^ 7)
	f.more = v&1 != 0
	// RFC 8200: the protocol does not identify an IPv6 packet, and the
	// first fragment's counts.
	f.key = key{
		src: netip.AddrFrom16([16]byte(pkt[8:24])),
		dst: netip.AddrFrom16([16]byte(pkt[24:40])),
		id:  binary.BigEndian.Uint32(fh[4:]),
	}
	f.proto = fh[0]
	f.head = pkt[:pos]
	f.nextHeader = nhAt
	f.payload = pkt[pos+fragmentHdrLen : end]
	f.valid = f.lengthsValid(pos - ipv6HeaderLen)
	return f, true
}

// lengthsValid checks a fragment's lengths: a fragment followed by more
// carries a non-zero multiple of 8 bytes (RFC 791, RFC 8200), and the
// reassembled packet must fit its length field: headers of extra bytes
// before the payload, within 65,535.
func (f *parsed) lengthsValid(extra int) bool {
	if f.more && (len(f.payload) == 0 || len(f.payload)%8 != 0) {
		return false
	}
	return extra+f.off+len(f.payload) <= 0xffff
}

// whole writes the packet of an IPv6 atomic fragment (offset 0, no more
// fragments: RFC 6946) into out, without its Fragment header.
func (f *parsed) whole(out []byte) []byte {
	hl := len(f.head)
	out = out[:hl+len(f.payload)]
	copy(out, f.head)
	copy(out[hl:], f.payload)
	out[f.nextHeader] = f.proto
	binary.BigEndian.PutUint16(out[4:], uint16(len(out)-ipv6HeaderLen))
	return out
}

// setIPv4Checksum computes the checksum of the IPv4 header h into it.
func setIPv4Checksum(h []byte) {
	h[10], h[11] = 0, 0
	binary.BigEndian.PutUint16(h[10:], ^checksum.Checksum(h, 0))
}
