package sockowner

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/netstackd/netstackd/internal/netnstest"
)

func TestMain(m *testing.M) {
	if isChild() {
		if err := runChild(); err != nil {
			fmt.Fprintln(os.Stderr, "child:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	goleak.VerifyTestMain(m)
}

// Two users besides root, so that a uid read from the wrong socket shows.
const (
	uidNobody = 65534
	uidOther  = 4321
)

// lookupBound is the context deadline the tests give one lookup: far above
// what one costs (see docs/sockowner.md), so a slow machine does not fail.
const lookupBound = 2 * time.Second

// server is a TCP listener and a UDP socket in a namespace, on one
// loopback address, that tell which client address reached them.
type server struct {
	tcp net.Listener
	udp net.PacketConn
}

func startServer(t testing.TB, ns netnstest.Netns, ip netip.Addr) *server {
	t.Helper()
	s := &server{}
	at := netip.AddrPortFrom(ip, 0).String()
	var err error
	if s.tcp, err = ns.Listen("tcp", at); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.tcp.Close() })
	if err := ns.Do(func() (err error) {
		s.udp, err = net.ListenPacket("udp", at)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.udp.Close() })
	return s
}

func (s *server) tcpAddr() netip.AddrPort { return s.tcp.Addr().(*net.TCPAddr).AddrPort() }
func (s *server) udpAddr() netip.AddrPort { return s.udp.LocalAddr().(*net.UDPAddr).AddrPort() }

// accept returns the client end of the next connection; the server's end
// is closed in t.Cleanup.
func (s *server) accept(t testing.TB) netip.AddrPort {
	t.Helper()
	s.tcp.(*net.TCPListener).SetDeadline(time.Now().Add(10 * time.Second))
	c, err := s.tcp.Accept()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c.RemoteAddr().(*net.TCPAddr).AddrPort()
}

// receive returns the source of the next datagram.
func (s *server) receive(t testing.TB) netip.AddrPort {
	t.Helper()
	s.udp.SetReadDeadline(time.Now().Add(10 * time.Second))
	buf := make([]byte, 16)
	_, from, err := s.udp.ReadFrom(buf)
	if err != nil {
		t.Fatalf("receive: %v", err)
	}
	return from.(*net.UDPAddr).AddrPort()
}

// newFinder opens a Finder in ns and closes it in t.Cleanup.
func newFinder(t testing.TB, ns netnstest.Netns) *Finder {
	t.Helper()
	var f *Finder
	if err := ns.Do(func() (err error) {
		f, err = New()
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := f.Close(); err != nil {
			t.Error(err)
		}
	})
	return f
}

// flow is one child's flow as the TUN would see it, and who should own it.
type flow struct {
	name          string
	proto         string
	local, remote netip.AddrPort
	want          Owner
}

// TestLookup starts children as two users, each opening a socket one way,
// in a namespace of its own, and finds each one's uid, pid and executable
// from the flow's two ends, IPv4 and IPv6; then all of them at once.
func TestLookup(t *testing.T) {
	ns := netnstest.NewNetns(t)
	f := newFinder(t, ns)
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	v4 := startServer(t, ns, netip.MustParseAddr("127.0.0.1"))
	v6 := startServer(t, ns, netip.IPv6Loopback())

	var flows []flow
	for _, tc := range []struct {
		name string
		srv  *server
		mode string
		uid  uint32
		dual bool
	}{
		{"tcp4", v4, modeTCP, uidNobody, false},
		{"tcp6", v6, modeTCP, uidOther, false},
		{"tcp4-from-ipv6-socket", v4, modeTCP, uidOther, true},
		{"udp4-unbound", v4, modeUDPUnbound, uidOther, false},
		{"udp6-unbound", v6, modeUDPUnbound, uidNobody, false},
		{"udp4-from-ipv6-socket", v4, modeUDPUnbound, uidNobody, true},
		{"udp4-bound", v4, modeUDPBound, uidNobody, false},
		{"udp6-bound", v6, modeUDPBound, uidOther, false},
		{"udp4-connected", v4, modeUDPConnected, uidOther, false},
		{"udp6-connected", v6, modeUDPConnected, uidNobody, false},
	} {
		fl := flow{name: tc.name, proto: "udp", remote: tc.srv.udpAddr()}
		if tc.mode == modeTCP {
			fl.proto, fl.remote = "tcp", tc.srv.tcpAddr()
		}
		c := startChild(t, ns.Path, tc.uid, tc.mode, fl.remote, tc.dual)
		if fl.proto == "tcp" {
			fl.local = tc.srv.accept(t)
		} else {
			fl.local = tc.srv.receive(t)
		}
		fl.want = Owner{UID: tc.uid, PID: c.pid(), Exe: exe}
		flows = append(flows, fl)
	}

	for _, fl := range flows {
		t.Run(fl.name, func(t *testing.T) {
			took := checkLookup(t, f, fl)
			t.Logf("%s %s -> %s: %+v in %v", fl.proto, fl.local, fl.remote, fl.want, took)
			// The same flow given in IPv4-mapped form is the same flow.
			if fl.local.Addr().Is4() {
				mapped := flow{fl.name, fl.proto, mapAddr(fl.local), mapAddr(fl.remote), fl.want}
				checkLookup(t, f, mapped)
			}
		})
	}

	// All at once, many times, from several goroutines: under -race this
	// checks the Finder's locking, and every answer is still right.
	t.Run("concurrent", func(t *testing.T) {
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for range 20 {
					for _, fl := range flows {
						checkLookup(t, f, fl)
					}
				}
			})
		}
		wg.Wait()
	})
}

// checkLookup looks fl up with UID and Lookup and compares with fl.want.
// It returns how long Lookup took.
func checkLookup(t *testing.T, f *Finder, fl flow) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), lookupBound)
	defer cancel()
	start := time.Now()
	got, err := f.Lookup(ctx, fl.proto, fl.local, fl.remote)
	took := time.Since(start)
	if err != nil {
		t.Errorf("%s: Lookup(%s, %s, %s): %v", fl.name, fl.proto, fl.local, fl.remote, err)
		return took
	}
	if got != fl.want {
		t.Errorf("%s: Lookup(%s, %s, %s) = %+v, want %+v", fl.name, fl.proto, fl.local, fl.remote, got, fl.want)
	}
	uid, err := f.UID(ctx, fl.proto, fl.local, fl.remote)
	if err != nil {
		t.Errorf("%s: UID: %v", fl.name, err)
		return took
	}
	if want := (Owner{UID: fl.want.UID}); uid != want {
		t.Errorf("%s: UID = %+v, want %+v", fl.name, uid, want)
	}
	return took
}

func mapAddr(ap netip.AddrPort) netip.AddrPort {
	return netip.AddrPortFrom(netip.AddrFrom16(ap.Addr().As16()), ap.Port())
}

// TestLookupSocat finds real socat, started by setpriv as another user,
// connected over TCP and sending UDP from a socket it never connects.
func TestLookupSocat(t *testing.T) {
	ns := netnstest.NewNetns(t)
	socat := netnstest.RequireCommand(t, "socat", "socat")
	netnstest.RequireCommand(t, "setpriv", "util-linux")
	f := newFinder(t, ns)
	srv := startServer(t, ns, netip.MustParseAddr("127.0.0.1"))

	for _, tc := range []struct {
		proto, address string
		remote         netip.AddrPort
	}{
		{"tcp", "TCP:" + srv.tcpAddr().String(), srv.tcpAddr()},
		{"udp", "UDP-SENDTO:" + srv.udpAddr().String(), srv.udpAddr()},
	} {
		t.Run(tc.proto, func(t *testing.T) {
			// Not t.Context(): it ends before the cleanup that stops socat.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			// ip netns exec and setpriv exec in place: the PID is socat's.
			cmd := ns.Command(ctx, "setpriv", fmt.Sprint("--reuid=", uidOther), fmt.Sprint("--regid=", uidOther),
				"--clear-groups", socat, "-u", "STDIN", tc.address)
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			cmd.WaitDelay = time.Second
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				cancel()
				t.Fatal(err)
			}
			t.Cleanup(func() {
				defer cancel()
				stdin.Close() // socat -u ends at EOF
				if err := cmd.Wait(); err != nil {
					t.Errorf("socat: %v", err)
				}
			})
			if _, err := stdin.Write([]byte("x\n")); err != nil {
				t.Fatal(err)
			}
			var local netip.AddrPort
			if tc.proto == "tcp" {
				local = srv.accept(t)
			} else {
				local = srv.receive(t)
			}
			want := Owner{UID: uidOther, PID: cmd.Process.Pid, Exe: socat}
			took := checkLookup(t, f, flow{"socat-" + tc.proto, tc.proto, local, tc.remote, want})
			t.Logf("%s %s -> %s: %+v in %v", tc.proto, local, tc.remote, want, took)
		})
	}
}

// TestNotFound: flows with no socket behind them get ErrNotFound, never an
// owner: no socket at all, a flow whose local end is a listener's (the
// kernel's TCP lookup falls back to listeners), a UDP flow to a remote its
// connected socket is not connected to, a socket closed before the lookup,
// and a socket in another namespace.
func TestNotFound(t *testing.T) {
	ns := netnstest.NewNetns(t)
	f := newFinder(t, ns)
	srv := startServer(t, ns, netip.MustParseAddr("127.0.0.1"))
	lo := netip.MustParseAddr("127.0.0.1")

	closed := startChild(t, ns.Path, uidNobody, modeTCP, srv.tcpAddr(), false)
	closedLocal := srv.accept(t)
	closed.stop(t)

	connected := startChild(t, ns.Path, uidOther, modeUDPConnected, srv.udpAddr(), false)
	connectedLocal := srv.receive(t)
	_ = connected

	// A connection in the test's own namespace: Finder looks only in ns.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	outside, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer outside.Close()

	for _, tc := range []struct {
		name          string
		proto         string
		local, remote netip.AddrPort
	}{
		{"no-socket-tcp", "tcp", netip.AddrPortFrom(lo, 1), netip.AddrPortFrom(lo, 2)},
		{"no-socket-udp", "udp", netip.AddrPortFrom(lo, 1), netip.AddrPortFrom(lo, 2)},
		{"no-socket-tcp6", "tcp", netip.AddrPortFrom(netip.IPv6Loopback(), 1), netip.AddrPortFrom(netip.IPv6Loopback(), 2)},
		{"listener-is-not-the-flow", "tcp", srv.tcpAddr(), netip.AddrPortFrom(lo, 9)},
		{"udp-connected-elsewhere", "udp", connectedLocal, netip.AddrPortFrom(lo, srv.udpAddr().Port()+1)},
		{"closed-before-lookup", "tcp", closedLocal, srv.tcpAddr()},
		{"other-namespace", "tcp",
			outside.LocalAddr().(*net.TCPAddr).AddrPort(), outside.RemoteAddr().(*net.TCPAddr).AddrPort()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), lookupBound)
			defer cancel()
			o, err := f.Lookup(ctx, tc.proto, tc.local, tc.remote)
			if !errors.Is(err, ErrNotFound) {
				t.Errorf("Lookup(%s, %s, %s) = %+v, %v; want ErrNotFound", tc.proto, tc.local, tc.remote, o, err)
			}
			if _, err := f.UID(ctx, tc.proto, tc.local, tc.remote); !errors.Is(err, ErrNotFound) {
				t.Errorf("UID(%s, %s, %s): %v; want ErrNotFound", tc.proto, tc.local, tc.remote, err)
			}
		})
	}
}

// TestBadInput: a clear error, not a lookup, for what cannot be a flow;
// and a closed Finder says so.
func TestBadInput(t *testing.T) {
	f, err := New()
	if err != nil {
		t.Fatal(err)
	}
	v4 := netip.MustParseAddrPort("127.0.0.1:1")
	v6 := netip.MustParseAddrPort("[::1]:1")
	for _, tc := range []struct {
		name          string
		proto         string
		local, remote netip.AddrPort
	}{
		{"protocol", "icmp", v4, v4},
		{"mixed-families", "tcp", v4, v6},
		{"zero-addr", "udp", netip.AddrPort{}, v4},
	} {
		_, err := f.Lookup(t.Context(), tc.proto, tc.local, tc.remote)
		if err == nil || errors.Is(err, ErrNotFound) {
			t.Errorf("%s: Lookup(%q, %s, %s) = %v, want an error about the input", tc.name, tc.proto, tc.local, tc.remote, err)
		}
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, err := f.UID(ctx, "tcp", v4, v4); !errors.Is(err, context.Canceled) {
		t.Errorf("UID with an ended context: %v, want context.Canceled", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := f.UID(t.Context(), "tcp", v4, v4); !errors.Is(err, os.ErrClosed) {
		t.Errorf("UID after Close: %v, want os.ErrClosed", err)
	}
}

// TestScanBounded: a scan for a socket no process holds reports
// ErrNotFound; with a deadline shorter than that scan, it stops at the
// deadline (within ctxEvery descriptors) and says why; with a context
// already ended it does nothing.
func TestScanBounded(t *testing.T) {
	f, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// Inode 1 is no socket's: sockfs numbers its inodes from the counter
	// every pseudo-filesystem shares, far past 1 once a host is up.
	const nobody = 1
	start := time.Now()
	if _, _, err := f.procs.find(t.Context(), nobody, 0); !errors.Is(err, ErrNotFound) {
		t.Fatalf("find of an inode no process holds: %v, want ErrNotFound", err)
	}
	full := time.Since(start)
	t.Logf("a full scan for nothing took %v", full)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, _, err := f.procs.find(ctx, nobody, 0); !errors.Is(err, context.Canceled) {
		t.Errorf("find with an ended context: %v, want context.Canceled", err)
	}

	const bound = time.Millisecond
	if full < 3*bound {
		t.Logf("a full scan takes under %v here: the deadline cannot be tested", 3*bound)
		return
	}
	ctx, cancel = context.WithTimeout(t.Context(), bound)
	defer cancel()
	start = time.Now()
	_, _, err = f.procs.find(ctx, nobody, 0)
	took := time.Since(start)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("find with a %v deadline: %v, want DeadlineExceeded", bound, err)
	}
	if took >= full {
		t.Errorf("find with a %v deadline took %v, as long as a full scan", bound, took)
	}
	t.Logf("find with a %v deadline: %v after %v", bound, err, took)
}
