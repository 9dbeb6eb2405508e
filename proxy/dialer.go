// Package proxy owns reaching the far end of a flow: directly from the
// daemon's own network namespace, or through an upstream SOCKS5, SOCKS4(a)
// or HTTP CONNECT proxy.
//
// Every way of reaching it is a Dialer with exactly the DialContext method of
// net.Dialer, so the stack (and the DNS forwarder) can take *net.Dialer or any
// dialer here without knowing which. Each dialer hands back the socket
// itself (a *net.TCPConn, or Direct's own conn of a socket), never a wrapper
// that copies, so callers can half-close it (CloseWrite), reset it
// (SetLinger(0)) and take its descriptor (syscall.Conn) as they would a
// direct connection. The
// handshakes read the proxy's answer exactly to its end, so the first bytes
// of the tunnel are still in the socket.
//
// UDP has a datagram twin, PacketListener, with the ListenPacket method of
// net.ListenConfig: Direct opens a real socket and SOCKS5 a UDP ASSOCIATE.
// Either conn sends to any destination given to WriteTo, a domain name
// included, and reports the true source from ReadFrom. SOCKS4 and HTTP
// CONNECT have no UDP.
//
// Each wire format lives in a subpackage (socks5, socks4, httpconnect) as
// pure functions on bytes; this package owns the sockets, deadlines and
// cancellation around them. FromURL turns a --proxy URL into a Dialer.
package proxy

import (
	"context"
	"net"
)

// Dialer reaches address ("host:port", host an IP literal or a domain name)
// over network "tcp", "tcp4" or "tcp6". A domain name is passed on to the
// proxy unresolved where the protocol allows. The caller owns the returned
// conn.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// PacketListener opens a datagram conn for network "udp", "udp4" or "udp6"
// that sends to any "host:port" given to WriteTo (an *net.UDPAddr, or any
// net.Addr whose String is "host:port" with host an IP literal or a domain
// name) and reports from ReadFrom where each datagram came from. address is
// the local address; "" lets the dialer choose. The caller owns the conn.
type PacketListener interface {
	ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error)
}

// Prober is a dialer that can check its proxy server answers without
// opening a flow: netstackd warns at start when it does not, and not only
// when the first flow fails.
type Prober interface {
	Probe(ctx context.Context) error
}

// Probe checks that d's proxy server answers, if d has one (Prober); nil
// for a dialer with nothing to probe, such as Direct.
func Probe(ctx context.Context, d Dialer) error {
	if p, ok := d.(Prober); ok {
		return p.Probe(ctx)
	}
	return nil
}

// Compile-time proof that every dialer here, and the standard ones, fit.
var (
	_ Dialer = Direct{}
	_ Dialer = SOCKS5{}
	_ Dialer = SOCKS4{}
	_ Dialer = HTTPConnect{}
	_ Dialer = (*net.Dialer)(nil)

	_ PacketListener = Direct{}
	_ PacketListener = SOCKS5{}
	_ PacketListener = (*net.ListenConfig)(nil)

	_ Prober = SOCKS5{}
	_ Prober = SOCKS4{}
	_ Prober = HTTPConnect{}
)

// checkNetwork accepts the stream networks that every dialer here carries.
func checkNetwork(network string) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
		return nil
	}
	return net.UnknownNetworkError(network)
}

// checkPacketNetwork accepts the datagram networks that ListenPacket
// carries.
func checkPacketNetwork(network string) error {
	switch network {
	case "udp", "udp4", "udp6":
		return nil
	}
	return net.UnknownNetworkError(network)
}
