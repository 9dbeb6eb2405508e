package proxy

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"
)

// defaultTimeout bounds a connect, and a SOCKS5 handshake, when the caller's
// context does not bound it sooner.
const defaultTimeout = 10 * time.Second

// Direct dials with real sockets from the daemon's own network namespace.
// The zero value is ready to use.
type Direct struct {
	// Timeout bounds the connect; the context's deadline applies too, the
	// earlier one wins. 0 means 10s.
	Timeout time.Duration
	// KeepAlive is the TCP keep-alive period, as in net.Dialer: 0 means Go's
	// default (15s), negative turns keep-alives off.
	KeepAlive time.Duration
	// Control, if not nil, is called with each socket before it connects
	// or binds, as net.Dialer.Control is: netstackd sets SO_MARK with it in
	// host-wide mode, so that its own sockets bypass the TUN. Its error
	// aborts the dial.
	Control func(network, address string, c syscall.RawConn) error
	// Resolver looks up the names given to DialContext and to the WriteTo
	// of a ListenPacket conn; nil means net.DefaultResolver. Host-wide mode
	// gives one whose own sockets carry the mark too.
	Resolver *net.Resolver
	// Refuse, if not nil, reports destinations Direct must never reach
	// (netstackd's own TUN prefixes, loopback): a dial, or a datagram
	// given to the WriteTo of a ListenPacket conn, whose address after
	// name resolution it refuses fails with an error wrapping
	// ErrRefusedDestination, and nothing is sent. It sees addresses
	// without zone, IPv4-mapped ones as IPv4. RefusePrefixes makes one.
	Refuse func(netip.Addr) bool
}

// DialContext connects to address and returns the connection: a socket,
// which can half-close (CloseWrite), reset (SetLinger(0)) and hand over its
// descriptor (syscall.Conn) as *net.TCPConn does. Errors keep their cause
// and read as net.Dialer's: errors.Is(err, syscall.ECONNREFUSED) holds for
// a refused connect.
//
// An IP address is dialed with a socket of Direct's own on Linux
// (direct_socket_linux.go). Anything else goes to net.Dialer, whose
// Control hook also starts the connect (connectEarly), so that a handshake
// the kernel completes within connect, as on a veth or loopback, does not
// wait for the poller.
func (d Direct) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkNetwork(network); err != nil {
		return nil, fmt.Errorf("dial %s direct: %w", address, err)
	}
	if c, ok, err := d.dialAddr(ctx, network, address); ok {
		if err != nil {
			return nil, fmt.Errorf("dial %s direct: %w", address, err)
		}
		return c, nil
	}
	nd := net.Dialer{
		Timeout:   d.Timeout,
		KeepAlive: d.KeepAlive,
		Control:   d.controlConnect,
		Resolver:  d.Resolver,
	}
	if nd.Timeout == 0 {
		nd.Timeout = defaultTimeout
	}
	c, err := nd.DialContext(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial %s direct: %w", address, err)
	}
	return c, nil
}

// controlConnect is the Control of DialContext's net.Dialer: the Refuse
// check on the resolved address, d.Control, which may set options that must
// precede the connect (SO_MARK), then connectEarly.
func (d Direct) controlConnect(network, address string, c syscall.RawConn) error {
	if err := checkRefusedAddress(d.Refuse, address); err != nil {
		return err
	}
	if d.Control != nil {
		if err := d.Control(network, address, c); err != nil {
			return err
		}
	}
	return connectEarly(network, address, c)
}

// String returns "direct".
func (Direct) String() string { return "direct" }
