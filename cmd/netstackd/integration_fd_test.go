package main_test

// Issue 19, item 6: with 1,024 descriptors, a client flooding UDP from
// thousands of source ports once made netstackd refuse every TCP flow and
// fail DNS for the whole UDP timeout, logging a warning per source. The
// tables are now sized against the open-file limit; this test floods and
// checks that the rest keeps working.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/netnstest"
)

const (
	fdLimit      = 1024 // netstackd's open-file limit, soft and hard
	floodSources = 2000 // distinct UDP source ports of the flood
	// floodFor covers more than one rate-limit period (10 s), so that the
	// count of warnings means something.
	floodFor   = 12 * time.Second
	floodRound = 250 * time.Millisecond // each source sends once a round
)

func TestIntegrationFDExhaustion(t *testing.T) {
	requireBinary(t)
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < floodSources+512 {
		t.Skipf("the flood needs %d sockets in the test process: open-file limit %d (%v)", floodSources, lim.Cur, err)
	}
	tp := netnstest.New(t)
	tp.StartServers(t)
	echo4 := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort)
	tp.StartUDPEcho(t, echo4)
	tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{dnsName: dnsNameAddr})
	dante := netip.AddrPortFrom(netnstest.ServerIPv4, udpDantePort)
	tp.StartDanteUDP(t, dante)

	// Remote mode: every query the stack answers costs a TCP connection
	// to the upstream, the case where DNS needs descriptors of its own.
	dnsArgs := []string{"--dns", "remote", "--dns-upstream", netip.AddrPortFrom(netnstest.ServerIPv4, 53).String()}
	t.Run("direct", func(t *testing.T) { testUDPFlood(t, tp, echo4, dnsArgs...) })
	// Through SOCKS5 an association costs two descriptors, the UDP
	// socket and the control connection: half as many fit.
	t.Run("dante", func(t *testing.T) {
		testUDPFlood(t, tp, echo4, append([]string{"--proxy", "socks5://" + dante.String()}, dnsArgs...)...)
	})
}

// testUDPFlood starts netstackd with args and a 1,024 open-file limit, and
// floods UDP to echo4 from floodSources ports while it checks that TCP, DNS
// and an association opened before keep working.
func testUDPFlood(t *testing.T, tp *netnstest.Topology, echo4 netip.AddrPort, args ...string) {
	d := startNetstackdLimited(t, tp, fdLimit, args...)
	maxUDP := loggedInt(t, d, "max_udp_flows")
	if maxUDP <= 0 || maxUDP >= floodSources {
		t.Fatalf("max_udp_flows %d with a %d limit, want a cap well below %d sources", maxUDP, fdLimit, floodSources)
	}

	// An association open before the flood: established traffic that
	// must keep working through it.
	established, err := tp.Client.ListenPacket("udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer established.Close()
	if err := udpRoundTrip(established, echo4, "before"); err != nil {
		t.Fatalf("established association before the flood: %v", err)
	}

	// The flood: every source sends once a round, so its association
	// stays active, until stop.
	socks := make([]net.PacketConn, 0, floodSources)
	defer func() {
		for _, c := range socks {
			c.Close()
		}
	}()
	for range floodSources {
		c, err := tp.Client.ListenPacket("udp4", ":0")
		if err != nil {
			t.Fatalf("flood socket %d: %v (the test's own open-file limit?)", len(socks), err)
		}
		socks = append(socks, c)
	}
	dst := net.UDPAddrFromAddrPort(echo4)
	stop := make(chan struct{})
	var sent atomic.Int64
	var flooding sync.WaitGroup
	flooding.Go(func() {
		tick := time.NewTicker(floodRound)
		defer tick.Stop()
		for {
			for _, c := range socks {
				if _, err := c.WriteTo([]byte("flood"), dst); err == nil {
					sent.Add(1)
				}
			}
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	})
	var peak atomic.Int64
	var sampling sync.WaitGroup
	sampling.Go(func() {
		for {
			if n := countFDs(d.PID()); int64(n) > peak.Load() {
				peak.Store(int64(n))
			}
			select {
			case <-stop:
				return
			case <-time.After(50 * time.Millisecond):
			}
		}
	})
	end := time.Now().Add(floodFor)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		flooding.Wait()
		sampling.Wait()
	}()

	// The checks start once the flood has filled the table, or (were the
	// table not sized against the limit) the descriptors: netstackd says
	// so.
	ctx := netnstest.TestContext(t, 10*time.Second)
	if err := netnstest.Poll(ctx, 20*time.Millisecond, func() (bool, error) {
		log := d.Log()
		return strings.Contains(log, "udp table full") || strings.Contains(log, "out of file descriptors"), nil
	}); err != nil {
		t.Fatalf("the flood filled neither the udp table nor the descriptors: %v\n%s", err, d.Log())
	}
	tcpOK, tcpTotal, dnsOK, dnsTotal, udpOK, udpTotal := 0, 0, 0, 0, 0, 0
	for time.Now().Before(end) {
		tcpTotal++
		if err := tcpEcho(t, tp, netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.EchoPort)); err != nil {
			t.Errorf("tcp during the flood: %v", err)
		} else {
			tcpOK++
		}
		dnsTotal++
		// A stub resolver sends again what the flood's load may drop:
		// one retry, as resolv.conf's default attempts allow.
		r := tp.Client.Exec(t, 10*time.Second, "dig", "+time=2", "+tries=2", "+short", "@"+dnsAddr.String(), dnsName, "A")
		if got := strings.TrimSpace(r.Stdout); r.Err != nil || got != dnsNameAddr.String() {
			t.Errorf("dig @%s %s during the flood = %q, want %s: %s", dnsAddr, dnsName, got, dnsNameAddr, r)
		} else {
			dnsOK++
		}
		udpTotal++
		if err := udpRoundTrip(established, echo4, fmt.Sprint("during ", udpTotal)); err != nil {
			t.Errorf("established association during the flood: %v", err)
		} else {
			udpOK++
		}
		time.Sleep(500 * time.Millisecond) // paced checks, not a wait for a state
	}
	close(stop)
	flooding.Wait()
	sampling.Wait()

	if r := tp.Client.Exec(t, 5*time.Second, "ip", "-s", "link", "show", tunName); r.Err == nil {
		t.Logf("tun counters after the flood:\n%s", r.Stdout)
	}
	log := d.Log()
	full := strings.Count(log, "udp table full of active associations")
	outOfFDs := strings.Count(log, "out of file descriptors")
	t.Logf("flood: %d sources, %d datagrams in %v; max_udp_flows %d; netstackd's peak descriptors %d of %d; "+
		"tcp %d/%d, dns %d/%d, established udp %d/%d; %q lines %d, %q lines %d",
		floodSources, sent.Load(), floodFor, maxUDP, peak.Load(), fdLimit, tcpOK, tcpTotal, dnsOK, dnsTotal, udpOK, udpTotal,
		"udp table full", full, "out of file descriptors", outOfFDs)
	if p := peak.Load(); p == 0 || p >= fdLimit-16 {
		t.Errorf("netstackd's peak descriptors %d, want some, and below the %d limit with room to spare", p, fdLimit)
	}
	if full == 0 {
		t.Errorf("no warning that the UDP table was full: did the flood reach the cap?")
	}
	// One line per 10 s period at most, however many sources were refused.
	if maxLines := int(floodFor/(10*time.Second)) + 2; full > maxLines || outOfFDs > maxLines {
		t.Errorf("%d table-full and %d out-of-descriptor warnings in %v, want at most %d each", full, outOfFDs, floodFor, maxLines)
	}
	if !regexp.MustCompile(`udp table full[^\n]*suppressed=\d+`).MatchString(log) && full > 1 {
		t.Errorf("the repeated table-full warning does not count the suppressed ones")
	}
}

// startNetstackdLimited is startNetstackd with the open-file limit set to
// nofile, soft and hard, so that netstackd cannot raise it.
func startNetstackdLimited(t *testing.T, tp *netnstest.Topology, nofile uint64, extra ...string) *netnstest.Process {
	t.Helper()
	args := append([]string{netstackdBin, "--netns", tp.Client.Path, "--log-level", "info"}, extra...)
	p := tp.Daemon.StartLimited(t, nofile, args...)
	ctx := netnstest.TestContext(t, 20*time.Second)
	err := netnstest.Poll(ctx, 20*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, errors.New("netstackd exited")
		default:
		}
		return tp.Client.HasDefaultRoute(ctx, false, tunName)
	})
	if err != nil {
		t.Fatalf("netstackd not ready: %v\n%s", err, p.Log())
	}
	return p
}

// loggedInt is the value of key in netstackd's "open files" line.
func loggedInt(t *testing.T, p *netnstest.Process, key string) int {
	t.Helper()
	m := regexp.MustCompile(`msg="open files".* ` + key + `=(\d+)`).FindStringSubmatch(p.Log())
	if m == nil {
		t.Fatalf("no %s in netstackd's \"open files\" line:\n%s", key, p.Log())
	}
	var n int
	fmt.Sscan(m[1], &n)
	return n
}

// countFDs is the number of descriptors process pid holds; 0 if unknown.
func countFDs(pid int) int {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return 0
	}
	return len(ents)
}

// udpRoundTrip sends msg from c to dst and waits for the echo, a few tries.
func udpRoundTrip(c net.PacketConn, dst netip.AddrPort, msg string) error {
	buf := make([]byte, 512)
	for range 3 {
		if _, err := c.WriteTo([]byte(msg), net.UDPAddrFromAddrPort(dst)); err != nil {
			return err
		}
		c.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, _, err := c.ReadFrom(buf)
			if err != nil {
				break // timed out: send again
			}
			if string(buf[:n]) == msg {
				return nil
			}
		}
	}
	return fmt.Errorf("no echo of %q from %s", msg, dst)
}

// tcpEcho connects through netstackd to an echo server and round-trips a
// line.
func tcpEcho(t *testing.T, tp *netnstest.Topology, dst netip.AddrPort) error {
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := tp.Client.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	msg := []byte("hello through the flood\n")
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return fmt.Errorf("read echo: %w", err)
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

// TestIntegrationRunFileLimit checks the other side of the open-file limit:
// netstackd serves with the soft limit raised (Go's runtime raises it to
// hard-1 before main, and netstackd leaves it there, fdlimit.go), while the
// program `netstackd run` starts gets the soft limit netstackd was given,
// as it would have without netstackd. Calling Setrlimit in netstackd would
// make the runtime stop restoring it, and the program would see 4095.
func TestIntegrationRunFileLimit(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	r := runNetstackd(t, tp, []string{"prlimit", "--nofile=1024:4096", "--"},
		"--dns", "off", "--log-level", "info", "--", "sh", "-c", "ulimit -Sn; ulimit -Hn")
	if got := strings.Fields(r.Stdout); r.ExitCode != 0 || len(got) != 2 || got[0] != "1024" || got[1] != "4096" {
		t.Errorf("the program's open-file limit, soft and hard = %q, want 1024 and 4096: %s", r.Stdout, r)
	}
	if !regexp.MustCompile(`msg="open files" limit=4095 hard=4096 `).MatchString(r.Stderr) {
		t.Errorf("netstackd does not say it serves with the raised limit 4095 of 4096:\n%s", r.Stderr)
	}
}

// TestIntegrationFDExhaustionTCP holds more TCP flows open than the
// open-file limit leaves room for: netstackd admits exactly its max_flows,
// resets the rest at once, stays below the limit, and says so in a line or
// two, not one per flow.
func TestIntegrationFDExhaustionTCP(t *testing.T) {
	requireBinary(t)
	const over = 50 // flows beyond the cap
	var lim unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < 3*fdLimit {
		t.Skipf("the test holds both ends of about %d flows: open-file limit %d (%v)", fdLimit, lim.Cur, err)
	}
	tp := netnstest.New(t)
	srv := tp.StartServers(t)
	d := startNetstackdLimited(t, tp, fdLimit, "--dns", "off")
	maxFlows := loggedInt(t, d, "max_flows")
	if maxFlows <= 0 || maxFlows >= fdLimit {
		t.Fatalf("max_flows %d with a %d limit, want a cap below it", maxFlows, fdLimit)
	}

	echoAt := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.EchoPort)
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	admitted, refused, peak := 0, 0, 0
	for i := range maxFlows + over {
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		c, err := tp.Client.DialContext(ctx, "tcp", echoAt.String())
		cancel()
		if err != nil {
			// Reset in reply to the SYN: connection refused.
			refused++
			continue
		}
		conns = append(conns, c)
		// Each admitted flow carries bytes: a flow that only looked open
		// would not echo.
		c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := fmt.Appendf(nil, "flow %d\n", i)
		got := make([]byte, len(msg))
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("flow %d: write: %v", i, err)
		}
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("flow %d: no echo: %v", i, err)
		}
		admitted++
		if i%50 == 0 {
			peak = max(peak, countFDs(d.PID()))
		}
	}
	peak = max(peak, countFDs(d.PID()))
	log := d.Log()
	limitLines := strings.Count(log, "flow limit reached")
	t.Logf("max_flows %d: %d flows admitted, %d refused; netstackd's peak descriptors %d of %d; server holds %d; %d flow-limit lines",
		maxFlows, admitted, refused, peak, fdLimit, srv.OpenConns(), limitLines)
	if admitted != maxFlows || refused != over {
		t.Errorf("%d flows admitted and %d refused, want %d and %d", admitted, refused, maxFlows, over)
	}
	if peak >= fdLimit-16 {
		t.Errorf("netstackd's peak descriptors %d, want below the %d limit with room to spare", peak, fdLimit)
	}
	if limitLines < 1 || limitLines > 2 {
		t.Errorf("%d flow-limit warnings for %d refused flows, want 1 or 2", limitLines, over)
	}
	if strings.Contains(log, "out of file descriptors") {
		t.Errorf("netstackd ran out of descriptors:\n%s", log)
	}
}
