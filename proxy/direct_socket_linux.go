package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
)

// Why Direct makes its own socket for an address literal: net.Dialer around
// the connect is work on the path of every short flow, about half of a
// loopback dial's cost (BenchmarkDirectDial): the address list and the
// dial's plumbing, a netFD, getsockname and getpeername once connected, a
// descriptor registered with the poller through net's own type. Here a
// dial is socket, the options net.Dialer would set, Control, connect, and
// os.NewFile, which registers the connected socket with the same runtime
// poller (fcntl and epoll_ctl): 9 system calls with keep-alive on, the
// addresses asked for only if someone wants the local one. A name, a zone
// or a network that does not fit the address still goes to net.Dialer.

// dialAddr reaches ap over a socket of its own. ok is false when the
// address is one for net.Dialer (see above).
func (d Direct) dialAddr(ctx context.Context, network, address string) (c net.Conn, ok bool, err error) {
	ap, perr := netip.ParseAddrPort(address)
	if perr != nil {
		return nil, false, nil
	}
	sa, ok := sockaddr(network, ap)
	if !ok {
		return nil, false, nil
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	family, sockNet := syscall.AF_INET, "tcp4"
	if ap.Addr().Is6() {
		family, sockNet = syscall.AF_INET6, "tcp6"
	}
	raddr := net.TCPAddrFromAddrPort(ap)
	opErr := func(err error) error { return &net.OpError{Op: "dial", Net: network, Addr: raddr, Err: err} }
	if err := checkRefused(d.Refuse, ap.Addr()); err != nil {
		return nil, true, opErr(err)
	}
	if err := ctx.Err(); err != nil {
		return nil, true, opErr(err)
	}
	fd, err := syscall.Socket(family, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, syscall.IPPROTO_TCP)
	if err != nil {
		return nil, true, opErr(os.NewSyscallError("socket", err))
	}
	if err := d.prepareSocket(fd, sockNet, ap.String()); err != nil {
		syscall.Close(fd)
		return nil, true, opErr(err)
	}
	cerr := syscall.Connect(fd, sa)
	if !connectStarted(cerr) {
		syscall.Close(fd)
		return nil, true, opErr(os.NewSyscallError("connect", cerr))
	}
	// From here the file owns the descriptor.
	f := os.NewFile(uintptr(fd), "tcp "+address)
	sc := &socketConn{f: f, network: network, raddr: raddr}
	if cerr != nil {
		if err := d.awaitConnect(ctx, sc, sa); err != nil {
			f.Close()
			return nil, true, opErr(err)
		}
	}
	return sc, true, nil
}

// prepareSocket sets what net.Dialer sets on a TCP socket (TCP_NODELAY,
// keep-alive as KeepAlive says), then runs Control, before the connect.
func (d Direct) prepareSocket(fd int, network, address string) error {
	if err := syscall.SetsockoptInt(fd, syscall.IPPROTO_TCP, syscall.TCP_NODELAY, 1); err != nil {
		return os.NewSyscallError("setsockopt", err)
	}
	if d.KeepAlive >= 0 {
		// net.Dialer's keep-alive: the idle time KeepAlive says (15s
		// for 0) rounded up to whole seconds, probes every 15s, 9 of them.
		idle := d.KeepAlive
		if idle == 0 {
			idle = 15 * time.Second
		}
		secs := int((idle + time.Second - 1) / time.Second)
		for _, o := range [...][3]int{
			{syscall.SOL_SOCKET, syscall.SO_KEEPALIVE, 1},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE, secs},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL, 15},
			{syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT, 9},
		} {
			if err := syscall.SetsockoptInt(fd, o[0], o[1], o[2]); err != nil {
				return os.NewSyscallError("setsockopt", err)
			}
		}
	}
	if d.Control != nil {
		return d.Control(network, address, fdControl(fd))
	}
	return nil
}

// awaitConnect waits in the poller for a connect in flight to end, within
// Timeout and the context (handshakeContext).
func (d Direct) awaitConnect(ctx context.Context, sc *socketConn, sa syscall.Sockaddr) error {
	return handshakeContext(ctx, sc, d.Timeout, func() error {
		rc, err := sc.f.SyscallConn()
		if err != nil {
			return err
		}
		var cerr error
		err = rc.Write(func(fd uintptr) bool {
			// A second connect reports how the first is doing (as in
			// connectEarly): 0 or EISCONN once it is established.
			cerr = syscall.Connect(int(fd), sa)
			return cerr != syscall.EALREADY && cerr != syscall.EINPROGRESS && cerr != syscall.EINTR
		})
		if err != nil {
			return err
		}
		if cerr != nil && cerr != syscall.EISCONN {
			return os.NewSyscallError("connect", cerr)
		}
		return nil
	})
}

// fdControl is the syscall.RawConn Control sees before the socket is a
// file: the options it sets must precede the connect.
type fdControl int

func (c fdControl) Control(f func(fd uintptr)) error { f(uintptr(c)); return nil }
func (fdControl) Read(func(fd uintptr) bool) error {
	return errors.New("read on a socket before its connect")
}
func (fdControl) Write(func(fd uintptr) bool) error {
	return errors.New("write on a socket before its connect")
}

// socketConn is a TCP connection Direct made: the socket as an *os.File,
// which the runtime's poller serves as it serves net's own, with the
// socket calls the relay and the proxies use (CloseWrite, SetLinger,
// SyscallConn). The file is not embedded: its Fd would make the socket
// blocking, and its ReadFrom would take file paths.
type socketConn struct {
	f       *os.File
	network string
	raddr   *net.TCPAddr

	laddrOnce sync.Once
	laddr     net.Addr
	closed    atomic.Bool // Close was called: control reports net.ErrClosed, as net's conn does
}

var (
	_ net.Conn                        = (*socketConn)(nil)
	_ syscall.Conn                    = (*socketConn)(nil)
	_ interface{ CloseWrite() error } = (*socketConn)(nil)
)

func (c *socketConn) Read(b []byte) (int, error) {
	n, err := c.f.Read(b)
	return n, c.netError("read", err)
}

func (c *socketConn) Write(b []byte) (int, error) {
	n, err := c.f.Write(b)
	return n, c.netError("write", err)
}

func (c *socketConn) Close() error {
	c.closed.Store(true)
	return c.netError("close", c.f.Close())
}

func (c *socketConn) SetDeadline(t time.Time) error      { return c.f.SetDeadline(t) }
func (c *socketConn) SetReadDeadline(t time.Time) error  { return c.f.SetReadDeadline(t) }
func (c *socketConn) SetWriteDeadline(t time.Time) error { return c.f.SetWriteDeadline(t) }

func (c *socketConn) SyscallConn() (syscall.RawConn, error) { return c.f.SyscallConn() }

func (c *socketConn) RemoteAddr() net.Addr { return c.raddr }

// LocalAddr asks the kernel once, when first wanted: most flows never do.
func (c *socketConn) LocalAddr() net.Addr {
	c.laddrOnce.Do(func() {
		var sa syscall.Sockaddr
		_ = c.control("getsockname", func(fd int) error {
			var err error
			sa, err = syscall.Getsockname(fd)
			return err
		})
		switch sa := sa.(type) {
		case *syscall.SockaddrInet4:
			c.laddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port)))
		case *syscall.SockaddrInet6:
			c.laddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port)))
		}
	})
	return c.laddr
}

// CloseWrite sends a FIN and goes on receiving.
func (c *socketConn) CloseWrite() error {
	return c.control("shutdown", func(fd int) error { return syscall.Shutdown(fd, syscall.SHUT_WR) })
}

// CloseRead shuts the receiving side.
func (c *socketConn) CloseRead() error {
	return c.control("shutdown", func(fd int) error { return syscall.Shutdown(fd, syscall.SHUT_RD) })
}

// SetLinger is net.TCPConn's: 0 makes Close send a RST.
func (c *socketConn) SetLinger(sec int) error {
	l := syscall.Linger{}
	if sec >= 0 {
		l.Onoff, l.Linger = 1, int32(sec)
	}
	return c.control("setsockopt", func(fd int) error { return syscall.SetsockoptLinger(fd, syscall.SOL_SOCKET, syscall.SO_LINGER, &l) })
}

// control runs f, the system call named call, on the descriptor and wraps
// its error as net's methods do.
func (c *socketConn) control(call string, f func(fd int) error) error {
	if c.closed.Load() {
		return c.opError("control", net.ErrClosed)
	}
	rc, err := c.f.SyscallConn()
	if err != nil {
		return c.opError("control", err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) { ferr = f(int(fd)) }); err != nil {
		return c.opError("control", err)
	}
	if ferr != nil {
		return c.opError(call, os.NewSyscallError(call, ferr))
	}
	return nil
}

// netError makes a file's error what net's conn would return: a
// *net.OpError with the cause inside, net.ErrClosed for a closed conn, io.EOF
// as it is.
func (c *socketConn) netError(op string, err error) error {
	if err == nil || err == io.EOF {
		return err
	}
	if errors.Is(err, os.ErrClosed) {
		return c.opError(op, net.ErrClosed)
	}
	if pe, ok := errors.AsType[*os.PathError](err); ok {
		err = pe.Err
	}
	return c.opError(op, err)
}

func (c *socketConn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: c.network, Addr: c.raddr, Err: err}
}
