package socks5

import "fmt"

// UDPHeader is the header in front of every datagram relayed for a UDP
// ASSOCIATE: RSV (two zero octets), FRAG, then the address of the far end,
// the destination on the way out and the source on the way back (RFC 1928
// §7).
type UDPHeader struct {
	// Frag is the fragment number; 0 means a whole datagram. Relays need
	// not support fragmentation and clients here drop anything else.
	Frag byte
	// Addr is DST.ADDR, DST.PORT.
	Addr Addr
}

// udpHeadLen is RSV and FRAG: the part of a UDP header before its address.
const udpHeadLen = 3

// MaxUDPHeaderLen is the longest UDP header: RSV, FRAG, ATYP, a domain name
// of 255 bytes with its length octet, and the port.
const MaxUDPHeaderLen = udpHeadLen + 1 + 1 + MaxDomainLen + 2

// AppendUDPHeader appends h (RFC 1928 §7); the caller appends the data. It
// fails, leaving b unchanged, for an address the wire format cannot carry.
func AppendUDPHeader(b []byte, h UDPHeader) ([]byte, error) {
	out, err := AppendAddr(append(b, 0x00, 0x00, h.Frag), h.Addr)
	if err != nil {
		return b, err
	}
	return out, nil
}

// ParseUDPHeader parses the header at the start of the datagram b and
// returns it with its length: the data is b[n:]. A datagram arrives whole,
// so a short one is malformed rather than incomplete, but it is still
// reported as ErrTruncated. RSV must be zero.
func ParseUDPHeader(b []byte) (UDPHeader, int, error) {
	if len(b) < udpHeadLen {
		return UDPHeader{}, 0, ErrTruncated
	}
	if b[0] != 0 || b[1] != 0 {
		return UDPHeader{}, 0, fmt.Errorf("reserved field is %#04x, want 0x0000", uint16(b[0])<<8|uint16(b[1]))
	}
	a, n, err := DecodeAddr(b[udpHeadLen:])
	if err != nil {
		return UDPHeader{}, 0, err
	}
	return UDPHeader{Frag: b[2], Addr: a}, udpHeadLen + n, nil
}
