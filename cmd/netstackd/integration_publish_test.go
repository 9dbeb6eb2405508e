package main_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// TestIntegrationPublish serves a namespace with --netns and a published
// port: a connection to the port on netstackd's side reaches a server in
// the namespace, which sees it coming from the gateway address.
func TestIntegrationPublish(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	startNetstackd(t, tp, "--dns", "off", "--publish", "127.0.0.1:18080:9000", "--publish", "[::1]:18081:9000")

	// The server inside the namespace, on all its addresses.
	ln, err := tp.Client.Listen("tcp", "[::]:9000")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "inside, from "+r.RemoteAddr)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })

	for _, url := range []string{"http://127.0.0.1:18080/", "http://[::1]:18081/"} {
		r := tp.Daemon.Exec(t, 15*time.Second, "curl", "-sS", "-g", "--max-time", "10", url)
		if r.Err != nil {
			t.Fatalf("GET %s from netstackd's side: %v\n%s", url, r.Err, r)
		}
		// Both listeners reach the namespace's IPv4 address, from the
		// gateway 198.18.0.2 (the default --dns-addr).
		if !strings.HasPrefix(r.Stdout, "inside, from 198.18.0.2:") {
			t.Errorf("GET %s: %q, want the server inside to see the gateway 198.18.0.2", url, r.Stdout)
		}
	}
	// A published port with nothing listening behind it is a reset, not a hang.
	srv.Close()
	<-done
	start := time.Now()
	r := tp.Daemon.Exec(t, 15*time.Second, "curl", "-sS", "--max-time", "10", "http://127.0.0.1:18080/")
	if r.Err == nil {
		t.Fatalf("GET with no server inside succeeded: %s", r)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %v to fail, want a reset within 3s", d)
	}
}

// Published UDP ports. The echo server behind the TUN listens on
// publishedUDPPort on all its addresses; netstackd publishes it on loopback
// in the daemon namespace, where the tests send from.
const publishedUDPPort = 9000

// Gateway addresses of netstackd's default TUN prefixes: the --dns-addr, and
// the first free address of fd00:1898::/64.
var (
	gateway4 = netip.MustParseAddr("198.18.0.2")
	gateway6 = netip.MustParseAddr("fd00:1898::2")
)

// TestIntegrationPublishUDP publishes UDP ports with --netns and with run,
// on IPv4 and IPv6 loopback: datagrams of every size reach an echo server
// behind the TUN and come back intact, the server sees them from the
// gateway address, and two outside sources get an association each.
func TestIntegrationPublishUDP(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	pub4 := netip.MustParseAddrPort("127.0.0.1:18090")
	pub6 := netip.MustParseAddrPort("[::1]:18091")
	publish := []string{
		"--publish", fmt.Sprintf("%s:%d/udp", pub4, publishedUDPPort),
		"--publish", fmt.Sprintf("%s:%d/udp", pub6, publishedUDPPort),
	}

	t.Run("netns", func(t *testing.T) {
		echo := startInsideUDPEcho(t, tp.Client)
		startNetstackd(t, tp, append([]string{"--dns", "off"}, publish...)...)
		// Both listeners reach the namespace's IPv4 address, as for TCP.
		for _, pub := range []netip.AddrPort{pub4, pub6} {
			t.Run(addrFamily(pub.Addr()), func(t *testing.T) { testPublishedUDP(t, tp, echo, pub, gateway4) })
		}
	})
	t.Run("netns-ipv6-target", func(t *testing.T) {
		// With an IPv6 prefix only, published ports reach the namespace's
		// IPv6 address, from the IPv6 gateway.
		echo := startInsideUDPEcho(t, tp.Client)
		startNetstackd(t, tp, append([]string{"--dns", "off", "--addr", "fd00:1898::1/64"}, publish...)...)
		for _, pub := range []netip.AddrPort{pub4, pub6} {
			t.Run(addrFamily(pub.Addr()), func(t *testing.T) { testPublishedUDP(t, tp, echo, pub, gateway6) })
		}
	})
	t.Run("run", func(t *testing.T) {
		// The program (sleep) holds the namespace run made; the echo server
		// is opened in it from here.
		p := tp.Daemon.Start(t, append(append([]string{netstackdBin, "run", "--dns", "off", "--log-level", "debug"}, publish...), "--", "sleep", "300")...)
		t.Cleanup(func() {
			if log := p.Log(); strings.Contains(log, "WARNING: DATA RACE") {
				t.Errorf("%s reported a data race:\n%s", p, log)
			}
		})
		inside := runNamespace(t, p)
		echo := startInsideUDPEcho(t, inside)
		for _, pub := range []netip.AddrPort{pub4, pub6} {
			t.Run(addrFamily(pub.Addr()), func(t *testing.T) { testPublishedUDP(t, tp, echo, pub, gateway4) })
		}
	})
}

func addrFamily(a netip.Addr) string {
	if a.Is4() {
		return "ipv4"
	}
	return "ipv6"
}

// runNamespace returns the network namespace of the program that
// `netstackd run` (p) started, once it runs. The namespace is held open by
// a descriptor until the test ends, so the path stays valid.
func runNamespace(t *testing.T, p *netnstest.Process) netnstest.Netns {
	t.Helper()
	ctx := netnstest.TestContext(t, 20*time.Second)
	var ns *os.File
	err := netnstest.Poll(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, errors.New("netstackd exited")
		default:
		}
		for _, pid := range grandchildrenOf(p.PID()) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "sleep" {
				continue
			}
			f, err := os.Open(fmt.Sprintf("/proc/%d/ns/net", pid))
			if err != nil {
				continue
			}
			// Still our grandchild (netstackd, run's init, the
			// program) after the open: the namespace is the right one.
			if !slices.Contains(grandchildrenOf(p.PID()), pid) {
				f.Close()
				continue
			}
			ns = f
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("the program did not start under %s: %v\n%s", p, err, p.Log())
	}
	t.Cleanup(func() { ns.Close() })
	return netnstest.Netns{Name: "run-" + p.String(), Path: fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), ns.Fd())}
}

// insideUDPEcho is a UDP echo server behind the TUN, on all addresses of a
// namespace, that records the source of every datagram.
type insideUDPEcho struct {
	c  *net.UDPConn
	wg sync.WaitGroup

	mu      sync.Mutex
	sources map[netip.AddrPort]int
}

// startInsideUDPEcho serves on publishedUDPPort in ns until t's cleanup.
func startInsideUDPEcho(t *testing.T, ns netnstest.Netns) *insideUDPEcho {
	t.Helper()
	pc, err := ns.ListenPacket("udp", fmt.Sprintf("[::]:%d", publishedUDPPort))
	if err != nil {
		t.Fatal(err)
	}
	e := &insideUDPEcho{c: pc.(*net.UDPConn), sources: make(map[netip.AddrPort]int)}
	t.Cleanup(func() { e.c.Close(); e.wg.Wait() })
	e.wg.Go(e.serve)
	return e
}

func (e *insideUDPEcho) serve() {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := e.c.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue
		}
		e.mu.Lock()
		e.sources[netip.AddrPortFrom(from.Addr().Unmap(), from.Port())]++
		e.mu.Unlock()
		e.c.WriteToUDPAddrPort(buf[:n], from)
	}
}

// takeSources returns the sources seen since the last call, sorted, and
// forgets them.
func (e *insideUDPEcho) takeSources() []netip.AddrPort {
	e.mu.Lock()
	defer e.mu.Unlock()
	var s []netip.AddrPort
	for a := range e.sources {
		s = append(s, a)
	}
	clear(e.sources)
	slices.SortFunc(s, netip.AddrPort.Compare)
	return s
}

// testPublishedUDP drives the published UDP port pub from netstackd's
// namespace: two sources, then udpEchoCount datagrams of every size from
// one of them. The server behind the TUN must see each source from gw, on a
// port of its own, which the source keeps.
func testPublishedUDP(t *testing.T, tp *netnstest.Topology, echo *insideUDPEcho, pub netip.AddrPort, gw netip.Addr) {
	ctx := netnstest.TestContext(t, 90*time.Second)
	dial := func() *net.UDPConn {
		t.Helper()
		c, err := tp.Daemon.DialContext(ctx, "udp", pub.String())
		if err != nil {
			t.Fatalf("dial %s in %s: %v", pub, tp.Daemon, err)
		}
		t.Cleanup(func() { c.Close() })
		return c.(*net.UDPConn)
	}
	a, b := dial(), dial()
	// Under run nothing says when the stack serves the namespace: the
	// first echo is the readiness signal.
	start := time.Now()
	if err := netnstest.Poll(ctx, 200*time.Millisecond, func() (bool, error) {
		return udpExchange(a, []byte("ready?"), 200*time.Millisecond)
	}); err != nil {
		t.Fatalf("no echo through %s: %v", pub, err)
	}
	t.Logf("first echo through %s after %v", pub, time.Since(start).Round(time.Millisecond))
	srcA := echo.takeSources()
	mustExchange(t, b, []byte("from b"))
	srcB := echo.takeSources()
	if len(srcA) != 1 || len(srcB) != 1 {
		t.Fatalf("the server inside saw sources %v for the first source and %v for the second, want one each", srcA, srcB)
	}
	for _, s := range []netip.AddrPort{srcA[0], srcB[0]} {
		if s.Addr() != gw {
			t.Errorf("the server inside saw a datagram through %s from %s, want the gateway %s", pub, s, gw)
		}
	}
	if srcA[0] == srcB[0] {
		t.Fatalf("two outside sources reached the server from one source %s", srcA[0])
	}
	for round := range 3 {
		mustExchange(t, a, fmt.Appendf(nil, "a, round %d", round))
		mustExchange(t, b, fmt.Appendf(nil, "b, round %d", round))
	}
	if got, want := echo.takeSources(), []netip.AddrPort{srcA[0], srcB[0]}; !slices.Equal(got, sortedAddrPorts(want)) {
		t.Errorf("after interleaved rounds the server saw %v, want the same two sources %v", got, want)
	}

	publishedUDPEcho(t, ctx, a, pub)
	if got := echo.takeSources(); !slices.Equal(got, srcA) {
		t.Errorf("the bulk echo reached the server from %v, want only the first source's %v", got, srcA)
	}
}

func sortedAddrPorts(s []netip.AddrPort) []netip.AddrPort {
	s = slices.Clone(s)
	slices.SortFunc(s, netip.AddrPort.Compare)
	return s
}

// udpExchange sends msg on c and reports whether it came back within wait.
// Replies that differ (late echoes of earlier messages) are skipped.
func udpExchange(c *net.UDPConn, msg []byte, wait time.Duration) (bool, error) {
	if _, err := c.Write(msg); err != nil {
		return false, fmt.Errorf("send: %w", err)
	}
	c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 64<<10)
	for {
		n, err := c.Read(buf)
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("receive: %w", err)
		}
		if bytes.Equal(buf[:n], msg) {
			return true, nil
		}
	}
}

// mustExchange wants msg back on c, sending it up to udpEchoTries times.
func mustExchange(t *testing.T, c *net.UDPConn, msg []byte) {
	t.Helper()
	for range udpEchoTries {
		ok, err := udpExchange(c, msg, udpEchoWait)
		if err != nil {
			t.Fatalf("%q to %s: %v", msg, c.RemoteAddr(), err)
		}
		if ok {
			return
		}
	}
	t.Fatalf("%q to %s: no echo after %d tries", msg, c.RemoteAddr(), udpEchoTries)
}

// publishedUDPEcho sends udpEchoCount datagrams of 1..udpMaxPayload bytes,
// one at a time, on c (connected to the published port pub) and wants each
// back intact, as testUDPEcho does for outbound UDP: a datagram without an
// echo within udpEchoWait is sent again, up to udpEchoTries times, and a late
// echo of an earlier datagram must be intact too.
func publishedUDPEcho(t *testing.T, ctx context.Context, c *net.UDPConn, pub netip.AddrPort) {
	bySize := make(map[int]int, udpEchoCount)
	for i := range udpEchoCount {
		bySize[udpSize(i)] = i
	}
	start := time.Now()
	buf := make([]byte, 64<<10)
	var resent, late, lost int
	var lostFirst []int
	for i := range udpEchoCount {
		msg := udpPayload(i)
		got := false
		for try := 0; try < udpEchoTries && !got; try++ {
			if err := ctx.Err(); err != nil {
				t.Fatalf("datagram %d: %v", i, err)
			}
			if try > 0 {
				resent++
			}
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("send datagram %d (%d bytes): %v", i, len(msg), err)
			}
			c.SetReadDeadline(time.Now().Add(udpEchoWait))
			for !got {
				n, err := c.Read(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break
				}
				if err != nil {
					t.Fatalf("read echo of datagram %d: %v", i, err)
				}
				if bytes.Equal(buf[:n], msg) {
					got = true
					break
				}
				j, ok := bySize[n]
				if !ok || j > i || !bytes.Equal(buf[:n], udpPayload(j)) {
					t.Fatalf("waiting for datagram %d (%d bytes): got %d bytes that match nothing sent", i, len(msg), n)
				}
				late++
			}
		}
		if !got {
			lost++
			if len(lostFirst) < 10 {
				lostFirst = append(lostFirst, i)
			}
		}
	}
	t.Logf("%d datagrams of 1..%d bytes through %s in %v: %d echoed intact, %d resends (loss), %d late echoes, %d never echoed",
		udpEchoCount, udpMaxPayload, pub, time.Since(start).Round(time.Millisecond), udpEchoCount-lost, resent, late, lost)
	if lost > 0 {
		t.Errorf("%d of %d datagrams never echoed after %d tries each (first: %v)", lost, udpEchoCount, udpEchoTries, lostFirst)
	}
}
