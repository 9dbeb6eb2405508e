package main_test

// DNS through netstackd: fake-ip answers over UDP and TCP, no query leaving
// the daemon's namespace, hostnames (not addresses) reaching the proxy,
// remote mode through the proxy with its cache, a pool far smaller than the
// names asked for, and flows to fake addresses that were never handed out.

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/netstackd/netstackd/internal/netnstest"
)

var (
	// dnsAddr is netstackd's default --dns-addr.
	dnsAddr = netip.MustParseAddr("198.18.0.2")
	// The default fake-ip ranges.
	fakeRange4 = netip.MustParsePrefix("198.19.0.0/16")
	fakeRange6 = netip.MustParsePrefix("fd00:1919::/96")
	// dnsUpstream is dnsmasq in the server namespace. netstackd is always
	// given it (or a resolver on the server's loopback): it must never fall
	// back to the host's resolver.
	dnsUpstream = netip.AddrPortFrom(netnstest.ServerIPv4, 53)
)

// Ports of the SOCKS servers in the DNS tests.
const loggingSocksPort = 1090

// dig runs dig in the client namespace against server and returns the
// result; args follow the server (name, type, options).
func dig(t *testing.T, tp *netnstest.Topology, server netip.Addr, args ...string) *netnstest.Result {
	t.Helper()
	a := append([]string{"dig", "+time=2", "+tries=2", "+short", "@" + server.String()}, args...)
	return tp.Client.Exec(t, 15*time.Second, a...)
}

// digAddr runs dig and wants exactly one address in the short answer.
func digAddr(t *testing.T, tp *netnstest.Topology, server netip.Addr, args ...string) netip.Addr {
	t.Helper()
	r := dig(t, tp, server, args...)
	out := strings.TrimSpace(r.Stdout)
	a, err := netip.ParseAddr(out)
	if r.Err != nil || err != nil {
		t.Fatalf("dig %s: want one address, got %q: %s", strings.Join(args, " "), out, r)
	}
	return a
}

// TestIntegrationDNSFakeIP: with a SOCKS proxy the default DNS mode is
// fake-ip. A and AAAA are answered from the fake ranges over UDP and TCP, no
// DNS packet leaves the daemon's namespace whatever server the client asks,
// and a flow to a fake address that was never handed out is reset and
// logged.
func TestIntegrationDNSFakeIP(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{dnsName: dnsNameAddr})
	tp.StartMicrosocks(t, socks4)
	d := startNetstackd(t, tp, "--socks", socks4.String(), "--dns-upstream", dnsUpstream.String())

	var first netip.Addr
	t.Run("a", func(t *testing.T) {
		first = digAddr(t, tp, dnsAddr, "example.test", "A")
		if !fakeRange4.Contains(first) {
			t.Errorf("example.test A = %s, want an address in %s", first, fakeRange4)
		}
	})
	t.Run("aaaa", func(t *testing.T) {
		if a := digAddr(t, tp, dnsAddr, "example.test", "AAAA"); !fakeRange6.Contains(a) {
			t.Errorf("example.test AAAA = %s, want an address in %s", a, fakeRange6)
		}
	})
	t.Run("tcp", func(t *testing.T) {
		a := digAddr(t, tp, dnsAddr, "+tcp", "example.test", "A")
		if !fakeRange4.Contains(a) || (first.IsValid() && a != first) {
			t.Errorf("example.test A over TCP = %s, want %s as over UDP (in %s)", a, first, fakeRange4)
		}
		if a := digAddr(t, tp, dnsAddr, "+tcp", "example.test", "AAAA"); !fakeRange6.Contains(a) {
			t.Errorf("example.test AAAA over TCP = %s, want an address in %s", a, fakeRange6)
		}
	})
	t.Run("no-leak", func(t *testing.T) { testNoDNSLeak(t, tp) })
	t.Run("unmapped-fake", func(t *testing.T) {
		// Handed out in order from the start of the range: a handful of
		// names came nowhere near this one.
		const never = "198.19.3.250"
		r := curl(t, tp, 10*time.Second, "http://"+never+":80/")
		if r.ExitCode != 7 || r.Elapsed > refuseWithin {
			t.Errorf("curl to the never handed out %s: exit %d after %v, want 7 within %v: %s",
				never, r.ExitCode, r.Elapsed.Round(time.Millisecond), refuseWithin, r)
		}
		if log := d.Log(); !strings.Contains(log, "no name for fake address "+never) {
			t.Errorf("netstackd's log does not mention the flow to %s:\n%s", never, log)
		}
	})
	t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
}

// leakDigs is how many queries testNoDNSLeak sends from the client.
const leakDigs = 20

// testNoDNSLeak captures port 53 in the daemon namespace while the client
// asks 20 names: over UDP and TCP, of netstackd's address and of dnsmasq's
// real address, which the daemon namespace could reach. netstackd answers
// all of them itself, so the capture holds nothing but one query the test
// sends from the daemon namespace at the end, which proves it captured.
func testNoDNSLeak(t *testing.T, tp *netnstest.Topology) {
	pcap := filepath.Join(t.TempDir(), "dns.pcap")
	dump := tp.Daemon.Start(t, "tcpdump", "-i", "any", "-n", "-U", "--immediate-mode", "-Z", "root", "-c", "1000", "-w", pcap, "port", "53")
	ctx, cancel := context.WithTimeout(t.Context(), netnstest.CommandTimeout)
	defer cancel()
	err := netnstest.Poll(ctx, 20*time.Millisecond, func() (bool, error) {
		return strings.Contains(dump.Log(), "listening on"), nil
	})
	if err != nil {
		t.Fatalf("tcpdump not capturing: %v\n%s", err, dump.Log())
	}

	for i := range leakDigs {
		server := dnsAddr
		if i%2 == 1 {
			server = netnstest.ServerIPv4 // a real resolver, reachable from the daemon namespace
		}
		args := []string{fmt.Sprintf("leak-%d.test", i), "A"}
		if i%4 >= 2 {
			args = append(args, "+tcp")
		}
		if a := digAddr(t, tp, server, args...); !fakeRange4.Contains(a) {
			t.Errorf("dig @%s %s = %s, want a fake address: the query was not answered by netstackd", server, strings.Join(args, " "), a)
		}
	}
	// The positive control, sent from the daemon namespace itself from a
	// port of its own, by which its query and answer are told apart.
	const controlPort = 35353
	control := fmt.Sprintf("%s.%d", netnstest.DaemonIPv4, controlPort) // as tcpdump -n prints it
	r := tp.Daemon.Exec(t, 15*time.Second, "dig", "+time=2", "+tries=2", "+short",
		"-b", fmt.Sprintf("%s#%d", netnstest.DaemonIPv4, controlPort), "@"+netnstest.ServerIPv4.String(), "control."+dnsName, "A")
	if strings.TrimSpace(r.Stdout) != dnsNameAddr.String() {
		t.Errorf("control query from the daemon namespace = %q, want %s: %s", r.Stdout, dnsNameAddr, r)
	}

	// --immediate-mode and -U put each packet in the file as it comes:
	// wait for the control's query and answer to show, then stop.
	var rd *netnstest.Result
	netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
		rd = tp.Daemon.Exec(t, 15*time.Second, "tcpdump", "-r", pcap, "-n", "-tt")
		return strings.Count(rd.Stdout, control) >= 2, nil
	})
	if _, err := dump.Stop(syscall.SIGTERM, netnstest.StopGrace); err != nil {
		t.Errorf("stop tcpdump: %v", err)
	}
	rd = tp.Daemon.Exec(t, 15*time.Second, "tcpdump", "-r", pcap, "-n", "-tt")
	if rd.Err != nil {
		t.Fatalf("read the capture: %s", rd)
	}
	var leaked []string
	controls := 0
	for _, line := range strings.Split(strings.TrimSpace(rd.Stdout), "\n") {
		switch {
		case line == "":
		case strings.Contains(line, control):
			controls++
		default:
			leaked = append(leaked, line)
		}
	}
	if controls == 0 {
		t.Errorf("the capture does not hold the control query: it proves nothing:\n%s\n%s", rd.Stdout, dump.Log())
	}
	if len(leaked) > 0 {
		t.Errorf("%d port-53 packets in the daemon namespace besides the control query:\n%s", len(leaked), strings.Join(leaked, "\n"))
	}
	t.Logf("%d client queries: %d port-53 packets of theirs in %s; %d packets of the control query captured", leakDigs, len(leaked), tp.Daemon, controls)
}

// onlyAtProxy is a name only dnsmasq in the server namespace knows.
const onlyAtProxy = "only-at-proxy.test"

// TestIntegrationDNSOnlyAtProxy: a name that only the proxy's side can
// resolve works in the client, because in fake-ip mode the name, not an
// address, reaches the proxy. microsocks resolves it with getaddrinfo
// against dnsmasq in the server namespace; the daemon namespace has no
// working resolver at all. A logging SOCKS5 server then shows that the
// request carries the name (address type "domain name"), never an address.
func TestIntegrationDNSOnlyAtProxy(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	// Before anything starts in them: ip netns exec mounts these over
	// /etc/resolv.conf for every program it starts.
	tp.Server.SetResolvConf(t, netnstest.ServerIPv4)
	tp.Client.SetResolvConf(t, dnsAddr)
	tp.Daemon.SetResolvConf(t, netip.MustParseAddr("127.0.0.1")) // nothing listens there
	resolver := tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{onlyAtProxy: netnstest.ServerIPv4})
	tp.StartMicrosocks(t, socks4)
	logging := netip.AddrPortFrom(netnstest.ServerIPv4, loggingSocksPort)
	logSocks := tp.StartLoggingSOCKS5(t, logging, map[string]netip.Addr{onlyAtProxy: netnstest.ServerIPv4})
	url := "http://" + onlyAtProxy + ":" + strconv.Itoa(netnstest.HTTPPort) + "/"

	t.Run("control", func(t *testing.T) {
		// The daemon namespace cannot resolve the name itself.
		if r := tp.Daemon.Exec(t, 15*time.Second, "getent", "hosts", onlyAtProxy); r.ExitCode == 0 {
			t.Errorf("%s resolves in the daemon namespace: %s", onlyAtProxy, r)
		}
	})
	t.Run("microsocks", func(t *testing.T) {
		d := startNetstackd(t, tp, "--socks", socks4.String(), "--dns-upstream", dnsUpstream.String())
		r := curl(t, tp, 10*time.Second, url)
		if r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET %s through microsocks = %q, want %q: %s", url, r.Stdout, netnstest.HelloBody, r)
		}
		// microsocks, in the server namespace, asked dnsmasq.
		if log := resolver.Log(); !strings.Contains(log, "] "+onlyAtProxy+" from "+netnstest.ServerIPv4.String()) {
			t.Errorf("dnsmasq did not log microsocks asking for %s:\n%s", onlyAtProxy, log)
		}
		testStop(t, tp, d, syscall.SIGTERM)
	})
	t.Run("hostname-reaches-proxy", func(t *testing.T) {
		d := startNetstackd(t, tp, "--socks", logging.String(), "--dns-upstream", dnsUpstream.String())
		r := curl(t, tp, 10*time.Second, url)
		if r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET %s through the logging SOCKS5 server = %q, want %q: %s", url, r.Stdout, netnstest.HelloBody, r)
		}
		reqs := logSocks.Requests()
		if len(reqs) == 0 {
			t.Fatalf("the logging SOCKS5 server saw no request")
		}
		for _, req := range reqs {
			if req.ATYP != netnstest.ATYPDomain || req.Host != onlyAtProxy || req.Port != netnstest.HTTPPort {
				t.Errorf("SOCKS5 request %v, want address type %d (domain name) %s:%d", req, netnstest.ATYPDomain, onlyAtProxy, netnstest.HTTPPort)
			}
		}
		t.Logf("SOCKS5 requests: %v", reqs)
		testStop(t, tp, d, syscall.SIGTERM)
	})
}

// TestIntegrationDNSRemote: in remote mode every query goes to the upstream
// over TCP through the proxy. The upstream listens on the server
// namespace's loopback, which only the proxy (in that namespace) can reach.
// Answers are cached: with the upstream stopped, a name asked before is
// still answered, a new one is not.
func TestIntegrationDNSRemote(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	const name = "remote.test"
	want := netip.MustParseAddr("192.0.2.77")
	loopback := netip.MustParseAddr("127.0.0.1")
	upstream := tp.StartDnsmasq(t, loopback, map[string]netip.Addr{name: want})
	tp.StartMicrosocks(t, socks4)
	d := startNetstackd(t, tp, "--socks", socks4.String(), "--dns", "remote",
		"--dns-upstream", netip.AddrPortFrom(loopback, 53).String())

	t.Run("udp", func(t *testing.T) {
		if a := digAddr(t, tp, dnsAddr, name, "A"); a != want {
			t.Errorf("%s A = %s, want %s from dnsmasq", name, a, want)
		}
		// dnsmasq saw it come from its own loopback: from the proxy.
		if log := upstream.Log(); !strings.Contains(log, "query[A] "+name+" from 127.0.0.1") {
			t.Errorf("dnsmasq did not log the query from the proxy on its loopback:\n%s", log)
		}
	})
	t.Run("tcp", func(t *testing.T) {
		if a := digAddr(t, tp, dnsAddr, "+tcp", name, "A"); a != want {
			t.Errorf("%s A over TCP = %s, want %s", name, a, want)
		}
	})
	t.Run("cached", func(t *testing.T) {
		if _, err := upstream.Stop(syscall.SIGTERM, netnstest.StopGrace); err != nil {
			t.Fatalf("stop dnsmasq: %v", err)
		}
		if a := digAddr(t, tp, dnsAddr, name, "A"); a != want {
			t.Errorf("%s A with the upstream stopped = %s, want %s from the cache", name, a, want)
		}
		// A name not asked before cannot be answered: the cache, not
		// something else, answered the first.
		r := dig(t, tp, dnsAddr, "uncached."+name, "A")
		if out := strings.TrimSpace(r.Stdout); out != "" && !strings.HasPrefix(out, ";;") {
			t.Errorf("uncached.%s answered %q with the upstream stopped", name, out)
		}
	})
	t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
}

// Bounds of TestIntegrationDNSManyNames.
const (
	manyNames       = 10000
	manyConcurrency = 32
	manyMaxRSS      = 150 << 20
	manyTries       = 3
	manyWait        = time.Second
)

// TestIntegrationDNSManyNames asks 10,000 distinct names of a fake-ip pool
// of about a thousand addresses: every answer is in the pool, netstackd's
// memory stays bounded, and once the pool has been recycled, a name asked
// before gets a valid address again that really stands for it (a flow to
// it reaches the proxy as that name).
func TestIntegrationDNSManyNames(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{dnsName: dnsNameAddr})
	logging := netip.AddrPortFrom(netnstest.ServerIPv4, loggingSocksPort)
	logSocks := tp.StartLoggingSOCKS5(t, logging, nil)
	pool := netip.MustParsePrefix("198.19.0.0/22")
	d := startNetstackd(t, tp, "--socks", logging.String(), "--fake-ip-range", pool.String(),
		"--dns-upstream", dnsUpstream.String())

	// Sample the daemon's resident memory while it works.
	var rssMax int64
	stopRSS := make(chan struct{})
	var rssWG sync.WaitGroup
	rssWG.Go(func() {
		tick := time.NewTicker(50 * time.Millisecond)
		defer tick.Stop()
		for {
			if rss, err := vmRSS(d.PID()); err == nil {
				rssMax = max(rssMax, rss)
			}
			select {
			case <-stopRSS:
				return
			case <-tick.C:
			}
		}
	})
	rssStop := sync.OnceFunc(func() { close(stopRSS); rssWG.Wait() })
	t.Cleanup(rssStop)

	ctx := netnstest.TestContext(t, 90*time.Second)
	server := netip.AddrPortFrom(dnsAddr, 53)
	name := func(i int) string { return fmt.Sprintf("n%05d.many.test", i) }
	answers := make([]netip.Addr, manyNames)
	errs := make([]error, manyNames)
	var retries sync.Map // i → tries beyond the first
	start := time.Now()
	next := make(chan int)
	var wg sync.WaitGroup
	for range manyConcurrency {
		wg.Go(func() {
			// One socket per worker, as a stub resolver with a few
			// sockets would send.
			c, err := tp.Client.DialContext(ctx, "udp", server.String())
			if err != nil {
				for i := range next {
					errs[i] = err
				}
				return
			}
			defer c.Close()
			co := &dns.Conn{Conn: c}
			for i := range next {
				answers[i], errs[i] = queryA(co, name(i), func(n int) { retries.Store(i, n) })
			}
		})
	}
	for i := range manyNames {
		if ctx.Err() != nil {
			break
		}
		next <- i
	}
	close(next)
	wg.Wait()
	took := time.Since(start)

	resent := 0
	retries.Range(func(_, v any) bool { resent += v.(int); return true })
	bad, failed := 0, 0
	distinct := make(map[netip.Addr]bool)
	var firstErr error
	for i, a := range answers {
		switch {
		case errs[i] != nil:
			failed++
			if firstErr == nil {
				firstErr = fmt.Errorf("%s: %w", name(i), errs[i])
			}
		case !pool.Contains(a):
			bad++
			if firstErr == nil {
				firstErr = fmt.Errorf("%s: %s is outside %s", name(i), a, pool)
			}
		default:
			distinct[a] = true
		}
	}
	t.Logf("%d queries in %v (%.0f/s, %d resent): %d unanswered, %d outside %s, %d distinct addresses",
		manyNames, took.Round(time.Millisecond), manyNames/took.Seconds(), resent, failed, bad, pool, len(distinct))
	if failed > 0 || bad > 0 {
		t.Errorf("%d of %d queries unanswered and %d answered outside %s; first: %v", failed, manyNames, bad, pool, firstErr)
	}

	t.Run("recycled", func(t *testing.T) {
		// name(0) was recycled long ago; asked again it gets an address
		// that stands for it.
		c, err := tp.Client.DialContext(ctx, "udp", server.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		a, err := queryA(&dns.Conn{Conn: c}, name(0), nil)
		if err != nil || !pool.Contains(a) {
			t.Fatalf("%s asked again: %v, %v; want an address in %s", name(0), a, err, pool)
		}
		t.Logf("%s: first %s, now %s", name(0), answers[0], a)
		dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		if conn, err := tp.Client.DialContext(dctx, "tcp", netip.AddrPortFrom(a, 80).String()); err == nil {
			conn.Close() // the logging server knows no names: it refuses
		}
		reqs := logSocks.Requests()
		if len(reqs) == 0 || reqs[len(reqs)-1].Host != name(0) || reqs[len(reqs)-1].ATYP != netnstest.ATYPDomain {
			t.Errorf("a flow to %s reached the proxy as %v, want the name %s", a, reqs, name(0))
		}
	})

	rssStop()
	if rss, err := vmRSS(d.PID()); err == nil {
		rssMax = max(rssMax, rss)
	}
	t.Logf("netstackd VmRSS peak %.1f MiB (race detector %v)", float64(rssMax)/(1<<20), raceEnabled)
	if rssMax == 0 || rssMax > manyMaxRSS {
		t.Errorf("netstackd VmRSS peaked at %.1f MiB, want at most %d MiB", float64(rssMax)/(1<<20), manyMaxRSS>>20)
	}
}

// queryA asks name's A record on co, which is connected to the resolver,
// sending again up to manyTries times, and returns the one address of the
// answer. retried, if not nil, is told how many resends there were.
func queryA(co *dns.Conn, name string, retried func(int)) (netip.Addr, error) {
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), dns.TypeA)
	var err error
	for try := range manyTries {
		if try > 0 && retried != nil {
			retried(try)
		}
		if err = co.WriteMsg(q); err != nil {
			return netip.Addr{}, err
		}
		co.SetReadDeadline(time.Now().Add(manyWait))
		for {
			var r *dns.Msg
			r, err = co.ReadMsg()
			if err != nil {
				break
			}
			if r.Id != q.Id {
				continue // a late answer to an earlier query of this socket
			}
			if r.Rcode != dns.RcodeSuccess || len(r.Answer) != 1 {
				return netip.Addr{}, fmt.Errorf("rcode %s, %d answers", dns.RcodeToString[r.Rcode], len(r.Answer))
			}
			rr, ok := r.Answer[0].(*dns.A)
			if !ok {
				return netip.Addr{}, fmt.Errorf("answer %v is not an A record", r.Answer[0])
			}
			a, _ := netip.AddrFromSlice(rr.A.To4())
			return a, nil
		}
		if !os.IsTimeout(err) {
			return netip.Addr{}, err
		}
	}
	return netip.Addr{}, fmt.Errorf("no answer after %d tries: %w", manyTries, err)
}

// vmRSS reads the resident set size of process pid from /proc.
func vmRSS(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(v) // "12345 kB"
			if len(f) == 2 && f[1] == "kB" {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				return kb << 10, err
			}
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}
