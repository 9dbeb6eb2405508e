package proxy

import (
	"net/netip"
	"os"
	"syscall"
)

// Why Direct starts the connect in net.Dialer's Control hook: net.Dialer's
// connect is non-blocking, and on EINPROGRESS it parks the goroutine until
// the poller reports the socket writable. On a veth or loopback the
// handshake has already finished by then: the SYN-ACK, queued on the
// socket's backlog while connect held the socket lock, is processed as
// connect releases it (release_sock, net/core/sock.c), so the socket is
// ESTABLISHED as connect returns EINPROGRESS. Waiting for a thread to run
// netpoll anyway is on the path of every short flow: in the daemon under
// bench/connrate on 2 cores, an upstream dial over a veth took 195 µs
// (median), 155 µs with the connect started early.
//
// connectEarly issues that first connect from Control, which net.Dialer
// calls on the socket just before its own connect. net.Dialer's connect is
// then the second one on the socket, and __inet_stream_connect
// (net/ipv4/af_inet.c) answers it from the socket's state: 0 once
// ESTABLISHED, so net.Dialer takes its no-wait branch; EALREADY while the
// SYN is in flight, so it waits in the poller as it always does; the error
// (ECONNREFUSED, say) if the handshake failed. Everything else stays
// net.Dialer's own: deadlines and cancellation, keep-alive and TCP_NODELAY,
// the addresses of the conn, the shape of errors, name resolution. On
// loopback (strace) a dial makes 11 system calls, as net.Dialer's does, the
// second connect taking the place of getsockopt(SO_ERROR), and the
// goroutine never parks; a handshake still in flight costs one call more
// (connect answering EALREADY). An IP address no longer comes here: Direct
// dials it with a socket of its own (direct_socket_linux.go) that connects
// the same way; this path is left for names and zones, which net.Dialer
// resolves. (Wrapping such a socket with net.FileConn would have cost 7
// calls more than it saved: os.NewFile registers it with no dup.)

// connectEarly starts the TCP connect of the socket c to address, as
// net.Dialer's Control receives them (network "tcp4" or "tcp6", address
// "ip:port"), and returns nil unless the connect failed at once, in which
// case the error is the one net.Dialer's connect would have returned. An
// address it cannot turn into a sockaddr without help (a zone) is left
// alone, for net.Dialer to connect.
func connectEarly(network, address string, c syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil
	}
	sa, ok := sockaddr(network, ap)
	if !ok {
		return nil
	}
	var connErr error
	if err := c.Control(func(fd uintptr) { connErr = syscall.Connect(int(fd), sa) }); err != nil {
		return err
	}
	if connectStarted(connErr) {
		return nil
	}
	return os.NewSyscallError("connect", connErr)
}

// sockaddr is ap as the socket address a TCP socket for network ("tcp",
// "tcp4", "tcp6") connects to, IPv4-mapped addresses as IPv4; ok is false
// for an address of the other family or with a zone, left to net.Dialer.
func sockaddr(network string, ap netip.AddrPort) (sa syscall.Sockaddr, ok bool) {
	a := ap.Addr()
	switch {
	case a.Zone() != "":
		return nil, false
	case a.Unmap().Is4() && network != "tcp6":
		return &syscall.SockaddrInet4{Port: int(ap.Port()), Addr: a.Unmap().As4()}, true
	case a.Is6() && !a.Is4In6() && network != "tcp4":
		return &syscall.SockaddrInet6{Port: int(ap.Port()), Addr: a.As16()}, true
	}
	return nil, false
}

// connectStarted reports whether a non-blocking connect's error means it
// succeeded or is under way.
func connectStarted(err error) bool {
	switch err {
	case nil, syscall.EINPROGRESS, syscall.EALREADY, syscall.EINTR, syscall.EISCONN:
		return true
	}
	return false
}
