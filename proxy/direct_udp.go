package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
)

// ListenPacket opens an unconnected UDP socket in the daemon's own network
// namespace, dual-stack for "udp" where the kernel has IPv6 (else IPv4), on
// address ("" means any address, a port the kernel picks). Control, if set,
// is called with the socket before it binds.
//
// The conn embeds the *net.UDPConn, so its SyscallConn, ReadFromUDPAddrPort,
// WriteToUDPAddrPort and the rest are the kernel socket's own; callers find
// them by asserting an interface, not the concrete *net.UDPConn. Only
// WriteTo differs: an address that is not an *net.UDPAddr is taken as
// "host:port" and a name in it is resolved with d.Resolver, each
// lookup bounded by 2s and remembered for 30s (up to 256 names per conn), so
// that a datagram to a name waits at most once per name and half-minute.
// A v4-only socket asks only for IPv4 addresses. WriteTo sends nothing to
// an address d.Refuse refuses; the embedded socket's own methods
// (WriteToUDPAddrPort, the KernelSocket) do not check, so a caller that
// uses them checks for itself.
func (d Direct) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	if err := checkPacketNetwork(network); err != nil {
		return nil, fmt.Errorf("listen %s direct: %w", network, err)
	}
	if address == "" {
		address = ":0"
	}
	lc := net.ListenConfig{Control: d.Control}
	pc, err := lc.ListenPacket(ctx, network, address)
	if err != nil && network == "udp" {
		// Go already picks IPv4 where its probe finds no IPv6 sockets;
		// if it chose IPv6 and the socket still failed (IPv6 switched
		// off in a way the probe did not see), try IPv4 alone.
		if pc4, err4 := lc.ListenPacket(ctx, "udp4", address); err4 == nil {
			pc, err = pc4, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("listen %s %s direct: %w", network, address, err)
	}
	uc := pc.(*net.UDPConn)
	names := newNameCache(lookupNetwork(network, uc))
	if d.Resolver != nil {
		names.lookupNetIP = d.Resolver.LookupNetIP
	}
	return &directPacketConn{UDPConn: uc, names: names, refuse: d.Refuse}, nil
}

// lookupNetwork returns the resolver network that suits the socket uc:
// "ip4" for an IPv4 socket, "ip6" for a v6-only one, else "ip".
func lookupNetwork(network string, uc *net.UDPConn) string {
	if la, ok := uc.LocalAddr().(*net.UDPAddr); ok && la.IP.To4() != nil {
		return "ip4"
	}
	if network == "udp6" {
		return "ip6"
	}
	return "ip"
}

// directPacketConn is a UDP socket whose WriteTo also takes "host:port"
// addresses with a domain name, as the stack passes for fake-IP
// destinations. Every other method is the embedded socket's.
type directPacketConn struct {
	*net.UDPConn
	names  *nameCache
	refuse func(netip.Addr) bool // Direct.Refuse
}

// WriteTo sends b to addr: an *net.UDPAddr as the socket would, anything
// else parsed as "host:port" from its String, a name resolved through the
// conn's cache. A refused address fails with ErrRefusedDestination.
func (c *directPacketConn) WriteTo(b []byte, addr net.Addr) (int, error) {
	if ua, ok := addr.(*net.UDPAddr); ok {
		if ip, ok := netip.AddrFromSlice(ua.IP); ok {
			if err := checkRefused(c.refuse, ip); err != nil {
				return 0, &net.OpError{Op: "write", Net: "udp", Source: c.LocalAddr(), Addr: addr, Err: err}
			}
		}
		return c.UDPConn.WriteTo(b, ua)
	}
	if addr == nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Source: c.LocalAddr(), Err: errors.New("missing address")}
	}
	ap, err := c.resolve(addr.String())
	if err == nil {
		err = checkRefused(c.refuse, ap.Addr())
	}
	if err != nil {
		return 0, &net.OpError{Op: "write", Net: "udp", Source: c.LocalAddr(), Addr: addr, Err: err}
	}
	return c.UDPConn.WriteToUDPAddrPort(b, ap)
}

// resolve turns "host:port" into an address to send to.
func (c *directPacketConn) resolve(hostport string) (netip.AddrPort, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return netip.AddrPort{}, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("address %q: invalid port %q", hostport, port)
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		if ip, err = c.names.lookup(host); err != nil {
			return netip.AddrPort{}, err
		}
	}
	if ip.Is4In6() && c.names.network == "ip4" {
		ip = ip.Unmap()
	}
	return netip.AddrPortFrom(ip, uint16(p)), nil
}

// KernelSocket returns the plain kernel socket under the conn, so that the
// stack may read it with borrowed buffers and receive ICMP errors on it.
// Destinations given by name still need WriteTo.
func (c *directPacketConn) KernelSocket() *net.UDPConn { return c.UDPConn }
