// Package proxy owns reaching the far end of a flow: directly from the
// daemon's own network namespace, or through an upstream SOCKS5 server.
//
// Every way of reaching it is a Dialer with exactly the DialContext method of
// net.Dialer, so the stack (and the DNS forwarder) can take *net.Dialer or any
// dialer here without knowing which. Each dialer hands back the kernel's own
// *net.TCPConn, never a wrapper, so callers can half-close it (CloseWrite)
// and reset it (SetLinger(0)) as they would a direct connection.
//
// The SOCKS5 wire format lives in the subpackage socks5 as pure functions on
// bytes; this package owns the sockets, deadlines and cancellation around
// it. FromURL turns a --proxy URL into a Dialer.
//
// UDP is not carried yet: a later datagram twin (a ListenPacket method
// returning a net.PacketConn, backed by SOCKS5 UDP ASSOCIATE) goes beside
// DialContext without changing it.
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

// Compile-time proof that every dialer here, and the standard one, fit.
var (
	_ Dialer = Direct{}
	_ Dialer = SOCKS5{}
	_ Dialer = (*net.Dialer)(nil)
)

// checkNetwork accepts the stream networks that every dialer here carries.
func checkNetwork(network string) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
		return nil
	}
	return net.UnknownNetworkError(network)
}
