package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"
)

// ErrRefusedDestination is wrapped by the error of a dial or datagram that
// Direct refused because its destination, once resolved, is one that
// Direct.Refuse names: test for it with errors.Is.
var ErrRefusedDestination = errors.New("refused destination")

// LoopbackPrefixes returns the addresses that reach the host itself whatever
// its routes say: 127.0.0.0/8 and ::1, and the unspecified addresses, which
// Linux connects to the local host as well (0.0.0.0 and ::; all of 0.0.0.0/8
// is "this network", RFC 1122 3.2.1.3, and never a destination).
func LoopbackPrefixes() []netip.Prefix {
	return []netip.Prefix{
		netip.MustParsePrefix("127.0.0.0/8"),
		netip.MustParsePrefix("0.0.0.0/8"),
		netip.MustParsePrefix("::1/128"),
		netip.MustParsePrefix("::/128"),
	}
}

// RefusePrefixes returns a func for Direct.Refuse that refuses every
// address inside one of prefixes. Addresses are compared without their zone,
// and an IPv4-mapped IPv6 address (::ffff:127.0.0.1) as the IPv4 address it
// carries, since that is where the kernel sends it.
func RefusePrefixes(prefixes ...netip.Prefix) func(netip.Addr) bool {
	// Split by family: the stack asks about every direct datagram, and an
	// address is only ever inside prefixes of its own family.
	var v4, v6 []netip.Prefix
	for _, p := range prefixes {
		switch {
		case !p.IsValid():
		case p.Addr().Is4():
			v4 = append(v4, p.Masked())
		default:
			v6 = append(v6, p.Masked())
		}
	}
	return func(a netip.Addr) bool {
		a = a.WithZone("").Unmap()
		ps := v6
		if a.Is4() {
			ps = v4
		}
		for _, p := range ps {
			if p.Contains(a) {
				return true
			}
		}
		return false
	}
}

// checkRefused returns an error wrapping ErrRefusedDestination if refuse
// (nil refuses nothing) refuses addr. The address is unmapped and stripped
// of its zone first, whatever refuse does with it.
func checkRefused(refuse func(netip.Addr) bool, addr netip.Addr) error {
	if refuse == nil {
		return nil
	}
	if a := addr.WithZone("").Unmap(); refuse(a) {
		return fmt.Errorf("%w %s", ErrRefusedDestination, a)
	}
	return nil
}

// RefuseControl returns a Control func for net.Dialer that fails a socket
// whose remote address ("ip:port", as Control receives it) refuse refuses,
// with an error wrapping ErrRefusedDestination. net.Dialer calls Control
// with each address it is about to connect to, after name resolution, so a
// name that resolves to a refused address is caught too. An address that is
// not an IP literal passes. Not for net.ListenConfig: its Control receives
// the local address.
func RefuseControl(refuse func(netip.Addr) bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, _ syscall.RawConn) error {
		return checkRefusedAddress(refuse, address)
	}
}

// checkRefusedAddress is checkRefused for "ip:port"; anything else passes.
func checkRefusedAddress(refuse func(netip.Addr) bool, address string) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil
	}
	return checkRefused(refuse, ap.Addr())
}
