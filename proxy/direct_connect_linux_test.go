package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
)

// Tests of Direct's dial with the connect started early, from net.Dialer's
// Control (direct_connect_linux.go), on real loopback sockets. A connect
// that stays in flight without leaving the machine goes to a listener whose
// accept queue is full: the kernel drops further SYNs (tcp_conn_request, when
// sk_acceptq_is_full), so the connecting socket stays in SYN_SENT.

// fullListener listens on 127.0.0.1 with a backlog of 0, never accepts, and
// fills the accept queue with connections of its own, so that the next
// connect to it stays in flight. It returns the listening descriptor, for a
// test that frees a place with accept, and the address. Everything is
// closed when the test ends.
func fullListener(t *testing.T) (int, netip.AddrPort) {
	t.Helper()
	lfd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(lfd) })
	loopback := [4]byte{127, 0, 0, 1}
	if err := syscall.Bind(lfd, &syscall.SockaddrInet4{Addr: loopback}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(lfd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(lfd)
	if err != nil {
		t.Fatal(err)
	}
	port := sa.(*syscall.SockaddrInet4).Port
	// On loopback the handshake completes within connect, so the first
	// connect that is not connected when connect returns found the queue
	// full. It is closed at once: a socket closed in SYN_SENT sends nothing.
	for range 8 {
		fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_NONBLOCK|syscall.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Connect(fd, &syscall.SockaddrInet4{Port: port, Addr: loopback}); err != nil && err != syscall.EINPROGRESS {
			syscall.Close(fd)
			t.Fatalf("fill the accept queue: connect: %v", err)
		}
		if _, err := syscall.Getpeername(fd); err != nil {
			syscall.Close(fd)
			return lfd, netip.AddrPortFrom(netip.AddrFrom4(loopback), uint16(port))
		}
		t.Cleanup(func() { syscall.Close(fd) })
	}
	t.Fatal("the accept queue of a listener with backlog 0 took 8 connections")
	return -1, netip.AddrPort{}
}

// waitSynSent polls /proc/net/tcp until a socket is in SYN_SENT towards the
// IPv4 loopback address dst, so that a test acts while a dial is parked. It
// reports an error after 5s; it may run on a goroutine of its own.
func waitSynSent(dst netip.AddrPort) error {
	a := dst.Addr().As4()
	// /proc/net/tcp prints the address as the host-order number in hex
	// (little endian here), the port in network order.
	remote := fmt.Sprintf("%02X%02X%02X%02X:%04X", a[3], a[2], a[1], a[0], dst.Port())
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile("/proc/net/tcp")
		if err != nil {
			return err
		}
		sc := bufio.NewScanner(strings.NewReader(string(b)))
		for sc.Scan() {
			f := strings.Fields(sc.Text())
			if len(f) > 3 && f[2] == remote && f[3] == "02" {
				return nil
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	return fmt.Errorf("no socket in SYN_SENT to %v within 5s", dst)
}

// fdCount returns how many descriptors the process has open.
func fdCount(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// socketOpen reports whether the process still has a descriptor for the
// socket with inode ino.
func socketOpen(t *testing.T, ino uint64) bool {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("socket:[%d]", ino)
	for _, e := range ents {
		if target, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && target == want {
			return true
		}
	}
	return false
}

// getsockoptInt reads an integer option of c's socket.
func getsockoptInt(t *testing.T, c net.Conn, level, opt int) int {
	t.Helper()
	rc, err := c.(syscall.Conn).SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = syscall.GetsockoptInt(int(fd), level, opt) }); err != nil {
		t.Fatal(err)
	}
	if gerr != nil {
		t.Fatalf("getsockopt %d/%d: %v", level, opt, gerr)
	}
	return v
}

// TestDirectConnectAddrs: addresses of each family, a mapped one, a name and
// a zone are connected, both ends agree on the addresses, and bytes go both
// ways.
func TestDirectConnectAddrs(t *testing.T) {
	ln4 := listen(t, "tcp4", "127.0.0.1:0")
	tests := []struct {
		name    string
		network string
		address string // with %d for the port of the listener
		v6      bool
	}{
		{name: "ipv4", network: "tcp", address: "127.0.0.1:%d"},
		{name: "tcp4", network: "tcp4", address: "127.0.0.1:%d"},
		{name: "mapped", network: "tcp", address: "[::ffff:127.0.0.1]:%d"},
		{name: "mapped tcp4", network: "tcp4", address: "[::ffff:127.0.0.1]:%d"},
		{name: "name", network: "tcp4", address: "localhost:%d"},
		{name: "ipv6", network: "tcp", address: "[::1]:%d", v6: true},
		{name: "tcp6", network: "tcp6", address: "[::1]:%d", v6: true},
		// connectEarly leaves a zone to net.Dialer.
		{name: "zone", network: "tcp6", address: "[::1%%lo]:%d", v6: true},
	}
	var ln6 net.Listener
	if hasIPv6Loopback() {
		ln6 = listen(t, "tcp6", "[::1]:0")
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ln := ln4
			if tt.v6 {
				if ln6 == nil {
					t.Skip("no IPv6 loopback")
				}
				ln = ln6
			}
			address := fmt.Sprintf(tt.address, ln.Addr().(*net.TCPAddr).Port)
			c, err := Direct{}.DialContext(t.Context(), tt.network, address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, ok := c.(socket); !ok {
				t.Fatalf("conn is %T, want a socket (CloseWrite, SetLinger, SyscallConn)", c)
			}
			peer, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer peer.Close()
			if c.RemoteAddr() == nil || c.RemoteAddr().String() != peer.LocalAddr().String() {
				t.Errorf("RemoteAddr = %v, want %v", c.RemoteAddr(), peer.LocalAddr())
			}
			if c.LocalAddr() == nil || c.LocalAddr().String() != peer.RemoteAddr().String() {
				t.Errorf("LocalAddr = %v, want %v", c.LocalAddr(), peer.RemoteAddr())
			}
			exchange(t, c, peer, "ping")
			exchange(t, peer, c, "pong")
		})
	}
}

// TestConnectEarlyCompletes checks what the early connect relies on: on
// loopback the handshake has completed when connect returns, before
// net.Dialer's own connect, which then has nothing to wait for.
func TestConnectEarlyCompletes(t *testing.T) {
	addrs := []string{listen(t, "tcp4", "127.0.0.1:0").Addr().String()}
	if hasIPv6Loopback() {
		addrs = append(addrs, listen(t, "tcp6", "[::1]:0").Addr().String())
	}
	for _, address := range addrs {
		var peerErr error
		nd := net.Dialer{Control: func(network, address string, c syscall.RawConn) error {
			err := connectEarly(network, address, c)
			c.Control(func(fd uintptr) { _, peerErr = syscall.Getpeername(int(fd)) })
			return err
		}}
		c, err := nd.DialContext(t.Context(), "tcp", address)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if peerErr != nil {
			t.Errorf("%s: not connected after connectEarly: getpeername: %v", address, peerErr)
		}
	}
}

// exchange writes msg on from and reads it whole on to.
func exchange(t *testing.T, from, to net.Conn, msg string) {
	t.Helper()
	if _, err := io.WriteString(from, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(to, got); err != nil {
		t.Fatalf("read: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("read %q, want %q", got, msg)
	}
}

// TestDirectConnectRefused: a refused connect of either family keeps
// ECONNREFUSED and reads as net.Dialer's error does, under our prefix.
func TestDirectConnectRefused(t *testing.T) {
	addrs := []string{fmt.Sprintf("127.0.0.1:%d", freePort(t))}
	if hasIPv6Loopback() {
		ln := listen(t, "tcp6", "[::1]:0")
		addrs = append(addrs, ln.Addr().String())
		ln.Close()
	}
	for _, address := range addrs {
		_, err := Direct{}.DialContext(t.Context(), "tcp", address)
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial %s: err = %v, want ECONNREFUSED", address, err)
		}
		want := "dial " + address + " direct: dial tcp " + address + ": connect: connection refused"
		if err.Error() != want {
			t.Errorf("err = %q, want %q", err, want)
		}
		if _, ok := errors.AsType[*net.OpError](err); !ok {
			t.Errorf("err = %#v, want a *net.OpError inside", err)
		}
	}
}

// TestDirectConnectControlArgs: Control sees the network and address that
// net.Dialer gives it, for each family and for a mapped address, which are
// also what connectEarly parses.
func TestDirectConnectControlArgs(t *testing.T) {
	ln4 := listen(t, "tcp4", "127.0.0.1:0")
	p4 := ln4.Addr().(*net.TCPAddr).Port
	cases := [][2]string{
		{"tcp", fmt.Sprintf("127.0.0.1:%d", p4)},
		{"tcp4", fmt.Sprintf("127.0.0.1:%d", p4)},
		{"tcp", fmt.Sprintf("[::ffff:127.0.0.1]:%d", p4)},
	}
	if hasIPv6Loopback() {
		ln6 := listen(t, "tcp6", "[::1]:0")
		cases = append(cases, [2]string{"tcp", ln6.Addr().String()}, [2]string{"tcp6", ln6.Addr().String()})
	}
	for _, tc := range cases {
		var got, want string
		d := Direct{Control: func(network, address string, _ syscall.RawConn) error {
			got = network + " " + address
			return nil
		}}
		nd := net.Dialer{Control: func(network, address string, _ syscall.RawConn) error {
			want = network + " " + address
			return nil
		}}
		c, err := d.DialContext(t.Context(), tc[0], tc[1])
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		c, err = nd.DialContext(t.Context(), tc[0], tc[1])
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if got != want {
			t.Errorf("dial %s %s: Control got %q, net.Dialer gives %q", tc[0], tc[1], got, want)
		}
	}
}

// TestDirectConnectControlError: Control's error aborts the dial before any
// connect, and the socket is closed.
func TestDirectConnectControlError(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0") // never accepts
	errMark := errors.New("no mark for you")
	var ino uint64
	d := Direct{Control: func(_, _ string, rc syscall.RawConn) error {
		rc.Control(func(fd uintptr) {
			var st syscall.Stat_t
			if err := syscall.Fstat(int(fd), &st); err == nil {
				ino = st.Ino
			}
		})
		return errMark
	}}
	address := ln.Addr().String()
	c, err := d.DialContext(t.Context(), "tcp", address)
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded, want Control's error")
	}
	if !errors.Is(err, errMark) || !strings.HasPrefix(err.Error(), "dial "+address+" direct: ") {
		t.Errorf("err = %v, want %v under the dial prefix", err, errMark)
	}
	if ino == 0 {
		t.Fatal("Control saw no socket")
	}
	if socketOpen(t, ino) {
		t.Errorf("socket %d still open after Control failed the dial", ino)
	}
	// The listener's queue would hold a connection had one been made; on
	// loopback it would be there by now (TestConnectEarlyCompletes).
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(50 * time.Millisecond))
	if peer, err := ln.Accept(); err == nil {
		peer.Close()
		t.Errorf("a connection reached the listener although Control failed")
	}
}

// TestDirectConnectMark: a Control that sets SO_MARK, as host-wide mode's
// does, marks the socket the dial returns.
func TestDirectConnectMark(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_NET_ADMIN) to set SO_MARK")
	}
	const mark = 0x5eed
	var setErr error
	d := Direct{Control: func(_, _ string, rc syscall.RawConn) error {
		if err := rc.Control(func(fd uintptr) {
			setErr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_MARK, mark)
		}); err != nil {
			return err
		}
		return setErr
	}}
	c, err := d.DialContext(t.Context(), "tcp", fmt.Sprintf("127.0.0.1:%d", startEcho(t)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if got := getsockoptInt(t, c, syscall.SOL_SOCKET, syscall.SO_MARK); got != mark {
		t.Errorf("SO_MARK = %#x, want %#x", got, mark)
	}
}

// TestDirectConnectOptions: TCP_NODELAY and keep-alive are what net.Dialer
// sets for the same KeepAlive.
func TestDirectConnectOptions(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	opts := []struct {
		name       string
		level, opt int
	}{
		{"TCP_NODELAY", syscall.IPPROTO_TCP, syscall.TCP_NODELAY},
		{"SO_KEEPALIVE", syscall.SOL_SOCKET, syscall.SO_KEEPALIVE},
		{"TCP_KEEPIDLE", syscall.IPPROTO_TCP, syscall.TCP_KEEPIDLE},
		{"TCP_KEEPINTVL", syscall.IPPROTO_TCP, syscall.TCP_KEEPINTVL},
		{"TCP_KEEPCNT", syscall.IPPROTO_TCP, syscall.TCP_KEEPCNT},
	}
	for _, ka := range []time.Duration{0, 42 * time.Second, 1500 * time.Millisecond, -1} {
		t.Run(ka.String(), func(t *testing.T) {
			c, err := Direct{KeepAlive: ka}.DialContext(t.Context(), "tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ref, err := (&net.Dialer{KeepAlive: ka}).DialContext(t.Context(), "tcp", ln.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer ref.Close()
			for _, o := range opts {
				// With keep-alive off its timers do not matter, and
				// net.Dialer leaves the kernel's defaults in them.
				if ka < 0 && o.level == syscall.IPPROTO_TCP && o.opt != syscall.TCP_NODELAY {
					continue
				}
				got, want := getsockoptInt(t, c, o.level, o.opt), getsockoptInt(t, ref, o.level, o.opt)
				if got != want {
					t.Errorf("%s = %d, net.Dialer sets %d", o.name, got, want)
				}
			}
		})
	}
}

// TestDirectConnectInFlight: a connect the kernel does not complete at once
// waits in the poller and ends with the context, the timeout or the
// handshake, whichever comes first.
func TestDirectConnectInFlight(t *testing.T) {
	t.Run("cancel", func(t *testing.T) {
		_, ap := fullListener(t)
		ctx, cancel := context.WithCancel(t.Context())
		defer cancel()
		var cancelled time.Time
		var wg sync.WaitGroup
		wg.Go(func() {
			if err := waitSynSent(ap); err != nil {
				t.Error(err)
			}
			cancelled = time.Now()
			cancel()
		})
		c, err := Direct{}.DialContext(ctx, "tcp", ap.String())
		wg.Wait()
		if err == nil {
			c.Close()
			t.Fatal("dial to a full accept queue succeeded")
		}
		if !errors.Is(err, context.Canceled) {
			t.Errorf("err = %v, want context.Canceled", err)
		}
		if late := time.Since(cancelled); late > time.Second {
			t.Errorf("dial returned %v after the cancel", late)
		}
	})
	t.Run("timeout", func(t *testing.T) {
		_, ap := fullListener(t)
		start := time.Now()
		c, err := Direct{Timeout: 100 * time.Millisecond}.DialContext(t.Context(), "tcp", ap.String())
		if err == nil {
			c.Close()
			t.Fatal("dial to a full accept queue succeeded")
		}
		// As from net.Dialer: a net.Error whose Timeout is true and that
		// is context.DeadlineExceeded (the poller's deadline error, if it
		// wins the race with the dial's own context).
		if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
			t.Errorf("err = %v, want a net.Error timeout", err)
		}
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err = %v, want a deadline error", err)
		}
		if took := time.Since(start); took < 100*time.Millisecond || took > 2*time.Second {
			t.Errorf("dial with Timeout 100ms took %v", took)
		}
	})
	t.Run("context deadline", func(t *testing.T) {
		_, ap := fullListener(t)
		ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
		defer cancel()
		c, err := Direct{}.DialContext(ctx, "tcp", ap.String())
		if err == nil {
			c.Close()
			t.Fatal("dial to a full accept queue succeeded")
		}
		ne, ok := errors.AsType[net.Error](err)
		if !ok || !ne.Timeout() {
			t.Errorf("err = %v, want a net.Error timeout", err)
		}
		if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("err = %v, want a deadline error", err)
		}
	})
	t.Run("completes later", func(t *testing.T) {
		lfd, ap := fullListener(t)
		var wg sync.WaitGroup
		defer wg.Wait()
		wg.Go(func() {
			// Free a place in the queue once the dial is parked; the
			// SYN it retransmits after a second then gets through.
			if err := waitSynSent(ap); err != nil {
				t.Error(err)
				return
			}
			nfd, _, err := syscall.Accept4(lfd, syscall.SOCK_CLOEXEC)
			if err != nil {
				t.Errorf("accept: %v", err)
				return
			}
			syscall.Close(nfd)
		})
		c, err := Direct{Timeout: 10 * time.Second}.DialContext(t.Context(), "tcp", ap.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if c.RemoteAddr() == nil || c.RemoteAddr().String() != ap.String() {
			t.Errorf("RemoteAddr = %v, want %v", c.RemoteAddr(), ap)
		}
		if la, ok := c.LocalAddr().(*net.TCPAddr); !ok || la.Port == 0 {
			t.Errorf("LocalAddr = %v, want the bound address", c.LocalAddr())
		}
	})
}

// TestDirectConnectNoLeak: hundreds of dials, successful and failing in every
// way, leave no descriptor and no goroutine behind.
func TestDirectConnectNoLeak(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0") // never accepts: no server-side descriptors
	ok := ln.Addr().String()
	refused := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	_, full := fullListener(t)
	errControl := errors.New("control says no")
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()

	dials := []struct {
		name    string
		d       Direct
		ctx     context.Context
		address string
		wantErr bool
	}{
		{"connected", Direct{}, t.Context(), ok, false},
		{"refused", Direct{}, t.Context(), refused, true},
		{"control error", Direct{Control: func(string, string, syscall.RawConn) error { return errControl }}, t.Context(), ok, true},
		{"cancelled", Direct{}, cancelled, ok, true},
		{"timeout", Direct{Timeout: time.Millisecond}, t.Context(), full.String(), true},
	}
	// Warm up: the first dial may open descriptors the runtime keeps.
	if c, err := (Direct{}).DialContext(t.Context(), "tcp", ok); err == nil {
		c.Close()
	}
	goroutines := goleak.IgnoreCurrent()
	before := fdCount(t)
	for i := range 300 {
		dl := dials[i%len(dials)]
		c, err := dl.d.DialContext(dl.ctx, "tcp", dl.address)
		if (err != nil) != dl.wantErr {
			t.Fatalf("%s: err = %v", dl.name, err)
		}
		if c != nil {
			c.Close()
		}
	}
	if after := fdCount(t); after != before {
		t.Errorf("%d descriptors open before 300 dials, %d after", before, after)
	}
	goleak.VerifyNone(t, goroutines)
}

// BenchmarkDirectDial compares a loopback dial by Direct, which starts the
// connect in Control, with a plain net.Dialer's. The client resets (linger 0) so that no TIME_WAIT piles up.
func BenchmarkDirectDial(b *testing.B) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	serve(b, ln, func(net.Conn) {})
	nd := &net.Dialer{Timeout: defaultTimeout}
	for _, bc := range []struct {
		name string
		dial func(context.Context, string, string) (net.Conn, error)
	}{
		{"direct", Direct{}.DialContext},
		{"net.Dialer", nd.DialContext},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				c, err := bc.dial(b.Context(), "tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				c.(socket).SetLinger(0)
				c.Close()
			}
		})
	}
}
