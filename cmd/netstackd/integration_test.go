package main_test

// End-to-end tests of the netstackd binary. Each test builds the topology of
// internal/netnstest: netstackd runs in the daemon namespace (no default
// route, its own pools blackholed), puts its TUN with default routes into the
// client namespace, and relays to Go servers in the server namespace,
// directly or through the SOCKS servers there (microsocks, Dante). No packet
// can leave the machine.

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// tunName is netstackd's default TUN name; each client namespace is new, so
// the default cannot collide with anything.
const tunName = "netstack0"

// Bounds the contract promises.
const (
	refuseWithin = 3 * time.Second // a refused upstream reaches the client
	stopWithin   = 5 * time.Second // SIGTERM or SIGINT to exit
)

var (
	netstackdBin string // built by TestMain when root
	buildErr     error
)

func TestMain(m *testing.M) {
	os.Exit(testMain(m))
}

func testMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "netstackd-integration-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Only root runs the integration tests; others skip them and need no
	// binary.
	if os.Geteuid() == 0 {
		netstackdBin, buildErr = buildNetstackd(dir)
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	return code
}

// buildNetstackd builds ./cmd/netstackd from the module root into dir, with
// the race detector when this test binary has it, so a data race in the
// daemon fails the run (the race runtime exits 66 instead of 0).
func buildNetstackd(dir string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	root := filepath.Dir(strings.TrimSpace(string(gomod)))
	bin := filepath.Join(dir, "netstackd")
	args := []string{"build", "-o", bin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.CommandContext(ctx, "go", append(args, "./cmd/netstackd")...)
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go %s in %s: %w\n%s", strings.Join(cmd.Args[1:], " "), root, err, out)
	}
	return bin, nil
}

// requireBinary skips when not root and fails when netstackd did not build.
func requireBinary(t *testing.T) {
	t.Helper()
	netnstest.RequireRoot(t)
	if buildErr != nil {
		t.Fatalf("build netstackd: %v", buildErr)
	}
}

var (
	socks4 = netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort)
	socks6 = netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.SocksPort)
)

func serverAddr(ip netip.Addr, port uint16) string {
	return netip.AddrPortFrom(ip, port).String()
}

func httpURL(ip netip.Addr, path string) string {
	return "http://" + serverAddr(ip, netnstest.HTTPPort) + path
}

// startNetstackd runs netstackd in tp's daemon namespace serving tp's client
// namespace, and returns once its default routes (installed last) are in the
// client namespace. The process is stopped in t.Cleanup, and its log is
// printed if t failed.
func startNetstackd(t *testing.T, tp *netnstest.Topology, extra ...string) *netnstest.Process {
	t.Helper()
	args := append([]string{netstackdBin, "--netns", tp.Client.Path, "--log-level", "debug"}, extra...)
	// Registered before Start's cleanup, so it runs after the process has
	// been stopped and has written everything.
	var p *netnstest.Process
	t.Cleanup(func() {
		if p == nil {
			return
		}
		if log := p.Log(); strings.Contains(log, "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race:\n%s", p, log)
		}
	})
	p = tp.Daemon.Start(t, args...)
	ctx := netnstest.TestContext(t, 20*time.Second)
	start := time.Now()
	err := netnstest.Poll(ctx, 20*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, errors.New("netstackd exited")
		default:
		}
		for _, ipv6 := range []bool{false, true} {
			if ok, err := tp.Client.HasDefaultRoute(ctx, ipv6, tunName); !ok || err != nil {
				return false, err
			}
		}
		return true, nil
	})
	if err != nil {
		t.Fatalf("netstackd %s not ready: %v\n%s", strings.Join(args[1:], " "), err, p.Log())
	}
	t.Logf("%s ready after %v: %s", p, time.Since(start).Round(time.Millisecond), strings.Join(args[1:], " "))
	return p
}

// curl runs curl in the client namespace with the given arguments.
func curl(t *testing.T, tp *netnstest.Topology, timeout time.Duration, args ...string) *netnstest.Result {
	t.Helper()
	a := []string{"curl", "-sS", "-g", "--max-time", fmt.Sprint(int(timeout / time.Second))}
	return tp.Client.Exec(t, timeout+5*time.Second, append(a, args...)...)
}

// TestIntegrationRelay runs the client scenarios against one netstackd per
// mode: direct, through microsocks (listening on IPv4, then on IPv6), and
// through Dante.
func TestIntegrationRelay(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	srv := tp.StartServers(t)
	tp.StartMicrosocks(t, socks4)
	tp.StartMicrosocks(t, socks6)

	dante := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.DantePort)
	tp.StartDante(t)

	// Which scenarios run in which mode. microsocks closes both sides of a
	// connection at the first EOF, so the half-close scenarios go through
	// Dante, which relays a FIN (internal/netnstest TestSocksHalfClose).
	const (
		bulk      = 1 << iota // 50 MB download, 20 MB upload
		echo                  // 500 concurrent connections
		halfClose             // client FIN, then the reply; echo with FIN
	)
	for _, mode := range []struct {
		name  string
		args  []string
		tests int
	}{
		{"direct", nil, bulk | echo | halfClose},
		{"microsocks", []string{"--socks", socks4.String()}, bulk | echo},
		{"microsocks-ipv6", []string{"--proxy", "socks5://" + socks6.String()}, 0},
		{"dante", []string{"--proxy", "socks5://" + dante.String()}, echo | halfClose},
	} {
		t.Run(mode.name, func(t *testing.T) {
			d := startNetstackd(t, tp, mode.args...)
			t.Run("get-ipv4", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv4) })
			t.Run("get-ipv6", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv6) })
			if mode.tests&bulk != 0 {
				t.Run("download-50MB", func(t *testing.T) { testDownload(t, tp, 50<<20) })
				t.Run("upload-20MB", func(t *testing.T) { testUpload(t, tp, 20<<20) })
			}
			if mode.tests&echo != 0 {
				t.Run("echo-500-concurrent", func(t *testing.T) {
					testEcho(t, tp, srv, 500, 16<<10, mode.tests&halfClose != 0)
				})
			}
			if mode.tests&halfClose != 0 {
				t.Run("half-close-go-ipv4", func(t *testing.T) { testHalfCloseGo(t, tp, netnstest.ServerIPv4) })
				t.Run("half-close-go-ipv6", func(t *testing.T) { testHalfCloseGo(t, tp, netnstest.ServerIPv6) })
				t.Run("half-close-socat", func(t *testing.T) { testHalfCloseSocat(t, tp) })
			}
			t.Run("refused-ipv4", func(t *testing.T) { testRefused(t, tp, netnstest.ServerIPv4) })
			t.Run("refused-ipv6", func(t *testing.T) { testRefused(t, tp, netnstest.ServerIPv6) })
			t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
		})
	}
}

func testGet(t *testing.T, tp *netnstest.Topology, ip netip.Addr) {
	r := curl(t, tp, 10*time.Second, httpURL(ip, "/"))
	if r.Err != nil || r.Stdout != netnstest.HelloBody {
		t.Errorf("GET / = %q, want %q: %s", r.Stdout, netnstest.HelloBody, r)
	}
}

func testDownload(t *testing.T, tp *netnstest.Topology, n int64) {
	want := netnstest.BytesSHA256(n)
	out := filepath.Join(t.TempDir(), "download")
	r := curl(t, tp, 120*time.Second, "-o", out, httpURL(netnstest.ServerIPv4, fmt.Sprintf("/bytes?n=%d", n)))
	if r.Err != nil {
		t.Fatalf("download: %s", r)
	}
	got, size := fileSHA256(t, out)
	if got != want || size != n {
		t.Errorf("downloaded %d bytes with sha256 %s, want %d bytes with %s", size, got, n, want)
	}
	t.Logf("downloaded %d MiB in %v (%.1f MiB/s)", n>>20, r.Elapsed.Round(time.Millisecond), float64(n)/(1<<20)/r.Elapsed.Seconds())
}

func testUpload(t *testing.T, tp *netnstest.Topology, n int64) {
	in := filepath.Join(t.TempDir(), "upload")
	f, err := os.Create(in)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, netnstest.Bytes(n)); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	want := netnstest.BytesSHA256(n)
	r := curl(t, tp, 120*time.Second, "-H", "Content-Type: application/octet-stream",
		"--data-binary", "@"+in, httpURL(netnstest.ServerIPv4, "/sha256"))
	if r.Err != nil || r.Stdout != want {
		t.Errorf("server got a body with sha256 %q, want %q: %s", r.Stdout, want, r)
	}
	t.Logf("uploaded %d MiB in %v (%.1f MiB/s)", n>>20, r.Elapsed.Round(time.Millisecond), float64(n)/(1<<20)/r.Elapsed.Seconds())
}

// testEcho opens conns connections to the echo server from the client
// namespace, all at once, then on each writes size bytes and expects the same
// bytes back. With halfClose the client shuts down its write side after
// sending and expects EOF after the echo; without, it closes once it has read
// the echo.
func testEcho(t *testing.T, tp *netnstest.Topology, srv *netnstest.Servers, conns, size int, halfClose bool) {
	ctx := netnstest.TestContext(t, 60*time.Second)
	deadline, _ := ctx.Deadline()
	addr := serverAddr(netnstest.ServerIPv4, netnstest.EchoPort)
	msg, _ := io.ReadAll(netnstest.Bytes(int64(size)))
	start := time.Now()
	open0 := srv.OpenConns()

	// Dial every connection before any sends, so all are open at once.
	// Each dial moves a thread into the client namespace: a few at a time.
	cs := make([]net.Conn, conns)
	errs := make([]error, conns)
	sem := make(chan struct{}, 16)
	var wg sync.WaitGroup
	for i := range conns {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			cs[i], errs[i] = tp.Client.DialContext(ctx, "tcp", addr)
		})
	}
	wg.Wait()
	t.Cleanup(func() {
		for _, c := range cs {
			if c != nil {
				c.Close()
			}
		}
	})
	if n, first := countErrs(errs); n > 0 {
		t.Fatalf("%d of %d dials failed; first: %v", n, conns, first)
	}
	dialed := time.Since(start)
	// netstackd dials upstream before it completes the client's handshake,
	// so every client connection has its own upstream connection by now
	// (give the server's accept loop a moment to count them).
	err := netnstest.Poll(ctx, 10*time.Millisecond, func() (bool, error) { return srv.OpenConns()-open0 >= conns, nil })
	if err != nil {
		t.Errorf("%d client connections open, but the echo server holds %d new ones: %v", conns, srv.OpenConns()-open0, err)
	}

	took := make([]time.Duration, conns)
	for i, c := range cs {
		errs[i] = nil
		wg.Go(func() {
			begin := time.Now()
			defer func() { took[i] = time.Since(begin) }()
			c.SetDeadline(deadline)
			if _, err := c.Write(msg); err != nil {
				errs[i] = fmt.Errorf("conn %d: write: %w", i, err)
				return
			}
			var got []byte
			var err error
			if halfClose {
				if err := c.(*net.TCPConn).CloseWrite(); err != nil {
					errs[i] = fmt.Errorf("conn %d: shutdown write: %w", i, err)
					return
				}
				got, err = io.ReadAll(c)
			} else {
				got = make([]byte, len(msg))
				var n int
				n, err = io.ReadFull(c, got)
				got = got[:n]
			}
			if err != nil {
				errs[i] = fmt.Errorf("conn %d: read after %d bytes: %w", i, len(got), err)
				return
			}
			if !bytes.Equal(got, msg) {
				errs[i] = fmt.Errorf("conn %d: got %d bytes back (equal prefix %v), want the %d sent",
					i, len(got), bytes.HasPrefix(msg, got), len(msg))
			}
		})
	}
	wg.Wait()
	if n, first := countErrs(errs); n > 0 {
		t.Errorf("%d of %d connections failed; first: %v", n, conns, first)
	}
	slices.Sort(took)
	t.Logf("%d connections dialed in %v, echoed %d KiB each in %v (per connection: median %v, p99 %v, max %v)",
		conns, dialed.Round(time.Millisecond), size>>10, time.Since(start).Round(time.Millisecond),
		took[len(took)/2].Round(time.Millisecond), took[len(took)*99/100].Round(time.Millisecond),
		took[len(took)-1].Round(time.Millisecond))
}

func countErrs(errs []error) (n int, first error) {
	for _, err := range errs {
		if err != nil {
			if first == nil {
				first = err
			}
			n++
		}
	}
	return n, first
}

// halfCloseData is what the half-close tests send before their FIN: more than
// fits in one window, so the FIN trails data still in flight.
func halfCloseData() []byte {
	b, _ := io.ReadAll(netnstest.Bytes(300 << 10))
	return b
}

// testHalfCloseGo sends data and shuts down its write side; the reply, sent
// by the server only after it has read the FIN, must arrive intact.
func testHalfCloseGo(t *testing.T, tp *netnstest.Topology, ip netip.Addr) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := tp.Client.DialContext(ctx, "tcp", serverAddr(ip, netnstest.HalfClosePort))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	data := halfCloseData()
	if _, err := c.Write(data); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatalf("shutdown write: %v", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Errorf("read reply after FIN: %v (after %d bytes)", err, len(got))
	}
	if want := netnstest.HalfCloseReply(data); !bytes.Equal(got, want) {
		t.Errorf("reply after FIN: %d bytes starting %.70q, want %d bytes starting %.70q", len(got), got, len(want), want)
	}
}

// testHalfCloseSocat is testHalfCloseGo with socat as the client: at EOF on
// stdin it shuts down the socket's write side and keeps reading (-t 20).
func testHalfCloseSocat(t *testing.T, tp *netnstest.Topology) {
	data := halfCloseData()
	r := tp.Client.ExecInput(t, 30*time.Second, bytes.NewReader(data),
		"socat", "-t", "20", "-", "TCP:"+serverAddr(netnstest.ServerIPv4, netnstest.HalfClosePort))
	if r.Err != nil {
		t.Fatalf("socat: %s", r)
	}
	if want := netnstest.HalfCloseReply(data); r.Stdout != string(want) {
		t.Errorf("reply after FIN: %d bytes starting %.70q, want %d bytes starting %.70q", len(r.Stdout), r.Stdout, len(want), want)
	}
}

// testRefused connects to a port where nothing listens: netstackd's upstream
// dial (or the SOCKS server's) is refused, and the client must see a refusal
// (a RST to its SYN) within refuseWithin.
func testRefused(t *testing.T, tp *netnstest.Topology, ip netip.Addr) {
	addr := serverAddr(ip, netnstest.ClosedPort)
	t.Run("curl", func(t *testing.T) {
		r := curl(t, tp, 10*time.Second, "http://"+addr+"/")
		if r.ExitCode != 7 || r.Elapsed > refuseWithin {
			t.Errorf("curl %s: exit %d after %v, want 7 (could not connect) within %v: %s",
				addr, r.ExitCode, r.Elapsed.Round(time.Millisecond), refuseWithin, r)
		}
	})
	t.Run("go", func(t *testing.T) { expectRefused(t, tp, addr) })
}

// expectRefused dials addr from the client namespace and wants
// ECONNREFUSED within refuseWithin.
func expectRefused(t *testing.T, tp *netnstest.Topology, addr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c, err := tp.Client.DialContext(ctx, "tcp", addr)
	took := time.Since(start)
	if err == nil {
		// The handshake completed although the upstream is gone: the
		// connection must at least be reset at once, not left open.
		c.SetDeadline(time.Now().Add(refuseWithin))
		n, rerr := c.Read(make([]byte, 1))
		c.Close()
		t.Fatalf("dial %s succeeded after %v (then read: %d, %v); want ECONNREFUSED", addr, took, n, rerr)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) || took > refuseWithin {
		t.Errorf("dial %s: %v after %v, want ECONNREFUSED within %v", addr, err, took.Round(time.Millisecond), refuseWithin)
	}
}

// testStop ends d with sig (SIGTERM or SIGINT): exit status 0 within
// stopWithin, the TUN gone from the client namespace, and an open flow
// reset, so that its client learns at once that it is gone.
func testStop(t *testing.T, tp *netnstest.Topology, d *netnstest.Process, sig syscall.Signal) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	// Topologies that serve no TCP (the UDP and DNS tests) refuse the
	// flow: there is nothing open to reset then.
	open, err := tp.Client.DialContext(ctx, "tcp", serverAddr(netnstest.ServerIPv4, netnstest.EchoPort))
	if errors.Is(err, syscall.ECONNREFUSED) {
		t.Logf("no TCP echo server here (%v): the reset of open flows is not checked", err)
		open = nil
	} else if err != nil {
		t.Fatalf("open a flow before %v: %v", sig, err)
	}
	if open != nil {
		defer open.Close()
		if _, err := open.Write([]byte("x")); err != nil {
			t.Fatalf("write before %v: %v", sig, err)
		}
		if _, err := io.ReadFull(open, make([]byte, 1)); err != nil {
			t.Fatalf("echo before %v: %v", sig, err)
		}
	}
	start := time.Now()
	if err := d.Signal(sig); err != nil {
		t.Fatalf("%v to %s: %v", sig, d, err)
	}
	if open != nil {
		open.SetReadDeadline(time.Now().Add(stopWithin))
		if _, err := open.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("open flow after %v: read returned %v, want ECONNRESET", sig, err)
		}
	}
	st := d.Wait(stopWithin)
	took := time.Since(start)
	switch {
	case st == nil:
		t.Errorf("%s still running %v after %v", d, stopWithin, sig)
	case st.ExitCode() != 0:
		t.Errorf("%s exited with %v after %v, want status 0", d, st, sig)
	default:
		t.Logf("%s exited 0 %v after %v", d, took.Round(time.Millisecond), sig)
	}
	if ok, err := tp.Client.HasLink(ctx, tunName); ok || err != nil {
		t.Errorf("%s still in %s after netstackd exited (err %v)", tunName, tp.Client, err)
	}
	r := tp.Client.Exec(t, 10*time.Second, "ip", "link", "show", tunName)
	if r.ExitCode == 0 {
		t.Errorf("`ip -n %s link show %s` succeeds after netstackd exited", tp.Client, tunName)
	}
}

// TestIntegrationSocksRestart kills the SOCKS server under a running
// netstackd: new flows are refused within refuseWithin; once its health
// check finds the server back, new flows work again without restarting
// netstackd. It is then ended with SIGINT, which must act as SIGTERM does.
func TestIntegrationSocksRestart(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	socks := tp.StartMicrosocks(t, socks4)
	d := startNetstackd(t, tp, "--socks", socks4.String())

	testGet(t, tp, netnstest.ServerIPv4)
	if st, err := socks.Stop(syscall.SIGKILL, netnstest.StopGrace); st == nil {
		t.Fatalf("kill %s: %v", socks, err)
	}
	t.Run("down", func(t *testing.T) {
		t.Run("curl", func(t *testing.T) {
			r := curl(t, tp, 10*time.Second, httpURL(netnstest.ServerIPv4, "/"))
			if r.ExitCode != 7 || r.Elapsed > refuseWithin {
				t.Errorf("curl with the SOCKS server down: exit %d after %v, want 7 within %v: %s",
					r.ExitCode, r.Elapsed.Round(time.Millisecond), refuseWithin, r)
			}
		})
		t.Run("go", func(t *testing.T) { expectRefused(t, tp, serverAddr(netnstest.ServerIPv4, netnstest.HTTPPort)) })
	})
	tp.StartMicrosocks(t, socks4)
	t.Run("back", func(t *testing.T) {
		waitProxyBack(t, d, 2) // at start, and now
		testGet(t, tp, netnstest.ServerIPv4)
		testGet(t, tp, netnstest.ServerIPv6)
	})
	select {
	case <-d.Done():
		t.Errorf("netstackd exited while the SOCKS server was down")
	default:
	}
	t.Run("sigint", func(t *testing.T) { testStop(t, tp, d, syscall.SIGINT) })
}

// TestIntegrationBadFlags: a usage error exits with status 2 and one line on
// stderr, before anything is created. Each run is confined to a fresh
// namespace all the same, in case it got further than it should.
func TestIntegrationBadFlags(t *testing.T) {
	requireBinary(t)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"unknown-flag", []string{"--bogus"}},
		{"proxy-scheme", []string{"--proxy", "ftp://x"}},
		{"proxy-no-port", []string{"--proxy", "socks5://192.0.2.2"}},
		{"socks-no-port", []string{"--socks", "192.0.2.2"}},
		{"addr-not-cidr", []string{"--addr", "not-an-address"}},
		{"route-not-cidr", []string{"--route", "300.0.0.0/8"}},
		{"mtu-too-small", []string{"--mtu", "100"}},
		{"log-level", []string{"--log-level", "loud"}},
		{"positional", []string{"extra"}},
		{"duration-no-unit", []string{"--dial-timeout", "10"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netnstest.NewNetns(t)
			r := ns.Exec(t, 10*time.Second, append([]string{netstackdBin}, tc.args...)...)
			stderr := strings.TrimSuffix(r.Stderr, "\n")
			if r.ExitCode != 2 || stderr == "" || strings.Contains(stderr, "\n") {
				t.Errorf("netstackd %s: exit %d, stderr %q; want exit 2 and one line", strings.Join(tc.args, " "), r.ExitCode, r.Stderr)
			}
			if oneDashFlag.MatchString(stderr) || !strings.Contains(stderr, "--") {
				t.Errorf("netstackd %s: %q does not name the flag as --help does, with two dashes", strings.Join(tc.args, " "), stderr)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			if ok, err := ns.HasLink(ctx, tunName); ok || err != nil {
				t.Errorf("a bad flag left %s in the namespace (err %v)", tunName, err)
			}
		})
	}
}

// oneDashFlag matches a flag spelled as the flag package does, -name.
var oneDashFlag = regexp.MustCompile(`(^|[\s"(])-[a-z]`)

func fileSHA256(t *testing.T, path string) (string, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil)), n
}
