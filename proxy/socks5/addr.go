package socks5

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
)

// Address types, RFC 1928 §5.
const (
	AddrTypeIPv4   byte = 0x01
	AddrTypeDomain byte = 0x03
	AddrTypeIPv6   byte = 0x04
)

// MaxDomainLen is the longest domain name an address can carry: its length
// travels in one octet (RFC 1928 §5).
const MaxDomainLen = 255

// Addr is a SOCKS address: an IP address or a domain name, and a port. It is
// the DST of a request, the BND of a reply and, for UDP ASSOCIATE, the
// address in each datagram header (RFC 1928 §§4–7).
type Addr struct {
	// Name is a domain name, sent as is for the server to resolve. When it
	// is empty the address is IP.
	Name string
	// IP is the address when Name is empty. An IPv4 address (not an
	// IPv4-mapped IPv6 one) goes on the wire as type 0x01.
	IP netip.Addr
	// Port is the TCP or UDP port.
	Port uint16
}

// AddrFromAddrPort returns the IP address ap.
func AddrFromAddrPort(ap netip.AddrPort) Addr {
	return Addr{IP: ap.Addr(), Port: ap.Port()}
}

// ParseAddr parses "host:port" as net.Dial takes it: host is an IPv4
// literal, an IPv6 literal in brackets or a domain name, and port is a
// decimal number. An IPv4-mapped IPv6 literal becomes plain IPv4, so that
// the server connects over IPv4 as net.Dial would.
func ParseAddr(hostport string) (Addr, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return Addr{}, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return Addr{}, fmt.Errorf("address %q: invalid port %q", hostport, port)
	}
	if host == "" {
		return Addr{}, fmt.Errorf("address %q: missing host", hostport)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			// The wire format has no room for a zone (RFC 1928 §5).
			return Addr{}, fmt.Errorf("address %q: zoned IPv6 address cannot be sent to a SOCKS server", hostport)
		}
		return Addr{IP: ip.Unmap(), Port: uint16(p)}, nil
	}
	if len(host) > MaxDomainLen {
		return Addr{}, fmt.Errorf("address %q: domain name longer than %d bytes", hostport, MaxDomainLen)
	}
	return Addr{Name: host, Port: uint16(p)}, nil
}

// IsName reports whether a is a domain name rather than an IP address.
func (a Addr) IsName() bool { return a.Name != "" }

// AddrPort returns a as an IP address and port, and false if a is a name.
func (a Addr) AddrPort() (netip.AddrPort, bool) {
	if a.IsName() {
		return netip.AddrPort{}, false
	}
	return netip.AddrPortFrom(a.IP, a.Port), true
}

// String returns a in the "host:port" form that net.Dial takes.
func (a Addr) String() string {
	if a.IsName() {
		return net.JoinHostPort(a.Name, strconv.Itoa(int(a.Port)))
	}
	return netip.AddrPortFrom(a.IP, a.Port).String()
}

// AppendAddr appends a as ATYP, ADDR and PORT (RFC 1928 §5; the port in
// network byte order). It fails for an empty or too long name, an invalid
// IP and a zoned IPv6 address, none of which the wire format can carry.
func AppendAddr(b []byte, a Addr) ([]byte, error) {
	switch {
	case a.IsName():
		if len(a.Name) > MaxDomainLen {
			return b, fmt.Errorf("domain name longer than %d bytes", MaxDomainLen)
		}
		b = append(b, AddrTypeDomain, byte(len(a.Name)))
		b = append(b, a.Name...)
	case a.IP.Is4():
		ip := a.IP.As4()
		b = append(b, AddrTypeIPv4)
		b = append(b, ip[:]...)
	case a.IP.Is6():
		if a.IP.Zone() != "" {
			return b, errors.New("zoned IPv6 address has no SOCKS encoding")
		}
		ip := a.IP.As16()
		b = append(b, AddrTypeIPv6)
		b = append(b, ip[:]...)
	default:
		return b, errors.New("address is neither an IP address nor a domain name")
	}
	return binary.BigEndian.AppendUint16(b, a.Port), nil
}

// AddrLen reports how many bytes the address at the start of b takes, as far
// as the prefix b tells: 1 while b is empty (the ATYP octet), 2 for a domain
// whose length octet has not arrived, then the full length. A reader that
// grows b to the returned length until it stops growing reads exactly the
// address and no further. It fails for an unknown ATYP and a zero-length
// domain.
func AddrLen(b []byte) (int, error) {
	if len(b) < 1 {
		return 1, nil
	}
	switch b[0] {
	case AddrTypeIPv4:
		return 1 + 4 + 2, nil
	case AddrTypeIPv6:
		return 1 + 16 + 2, nil
	case AddrTypeDomain:
		if len(b) < 2 {
			return 2, nil
		}
		if b[1] == 0 {
			return 0, errors.New("empty domain name")
		}
		return 2 + int(b[1]) + 2, nil
	default:
		return 0, fmt.Errorf("unknown address type %#02x", b[0])
	}
}

// DecodeAddr parses the address at the start of b and returns it with the
// number of bytes it took. It returns ErrTruncated when b ends early.
func DecodeAddr(b []byte) (Addr, int, error) {
	n, err := AddrLen(b)
	if err != nil {
		return Addr{}, 0, err
	}
	if n > len(b) {
		return Addr{}, 0, ErrTruncated
	}
	var a Addr
	switch b[0] {
	case AddrTypeIPv4:
		a.IP = netip.AddrFrom4([4]byte(b[1:5]))
	case AddrTypeIPv6:
		a.IP = netip.AddrFrom16([16]byte(b[1:17]))
	case AddrTypeDomain:
		a.Name = string(b[2 : n-2])
	}
	a.Port = binary.BigEndian.Uint16(b[n-2 : n])
	return a, n, nil
}
