package main_test

// Issue 19: what a client behind the TUN may not make netstackd reach.
// Its own addresses (the TUN's prefixes, the fake-IP ranges, the DNS
// address), which in host-wide mode made it dial into its own TUN until
// every handshake slot was taken; and in direct mode the loopback of its
// host, reached by a name that resolves there, unless --allow-host-loopback.

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// loopbackBody is what the service on the daemon namespace's loopback
// answers.
const loopbackBody = "netstackd's host loopback"

// Names the test resolver, or the daemon namespace's /etc/hosts, resolve to
// 127.0.0.1.
const (
	loopName      = "loop.test"
	loopHostsName = "hosts-loop.test"
)

// serveOnLoopback serves loopbackBody over HTTP on 127.0.0.1 in ns, a
// service of netstackd's host, and returns its port.
func serveOnLoopback(t *testing.T, ns netnstest.Netns) uint16 {
	t.Helper()
	ln, err := ns.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{
		Handler:     http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { fmt.Fprint(w, loopbackBody) }),
		ReadTimeout: 10 * time.Second,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		srv.Serve(ln)
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

// resolveLoopbackInDaemon makes netstackd's own lookups in ns (those of
// its Direct dialer) go to the test's dnsmasq, and puts loopHostsName in
// ns's /etc/hosts as 127.0.0.1: `ip netns exec` bind-mounts both over /etc.
func resolveLoopbackInDaemon(t *testing.T, ns netnstest.Netns, resolver netip.Addr) {
	t.Helper()
	ns.SetResolvConf(t, resolver) // removes the directory in its cleanup
	hosts := "127.0.0.1 localhost\n::1 localhost\n127.0.0.1 " + loopHostsName + "\n"
	if err := os.WriteFile(filepath.Join("/etc/netns", ns.Name, "hosts"), []byte(hosts), 0o644); err != nil {
		t.Fatal(err)
	}
}

// fetchByFakeName asks netstackd (at dnsAddr) for name's fake address from
// client, then fetches http://name:port/ there.
func fetchByFakeName(t *testing.T, client netnstest.Netns, name string, port uint16) *netnstest.Result {
	t.Helper()
	r := client.Exec(t, 15*time.Second, "dig", "+time=2", "+tries=2", "+short", "@"+dnsAddr.String(), name, "A")
	fake, err := netip.ParseAddr(strings.TrimSpace(r.Stdout))
	if err != nil || !fakeRange4.Contains(fake) {
		t.Fatalf("dig %s: want a fake address, got %q: %s", name, r.Stdout, r)
	}
	hostport := fmt.Sprintf("%s:%d", name, port)
	return client.Exec(t, 15*time.Second, "curl", "-sS", "-g", "--max-time", "10",
		"--resolve", hostport+":"+fake.String(), "http://"+hostport+"/")
}

// wantLoopbackRefused checks that r, a fetch of the loopback service by
// name, was refused (curl's exit 7) promptly, and that d logged why.
func wantLoopbackRefused(t *testing.T, r *netnstest.Result, log func() string) {
	t.Helper()
	if r.ExitCode != 7 || r.Elapsed > refuseWithin || strings.Contains(r.Stdout, loopbackBody) {
		t.Errorf("fetch of the host's loopback by name: exit %d after %v, want 7 (refused) within %v: %s",
			r.ExitCode, r.Elapsed.Round(time.Millisecond), refuseWithin, r)
	}
	if l := log(); !strings.Contains(l, "refused destination") || !strings.Contains(l, "dst=127.0.0.1") {
		t.Errorf("netstackd did not log the refusal of 127.0.0.1:\n%s", l)
	}
}

// TestIntegrationLoopbackRefused: in fake-ip + direct mode a name that
// resolves to 127.0.0.1 in netstackd's namespace, through its resolver or
// its /etc/hosts, is not dialed there; --allow-host-loopback dials it.
// Container mode (--netns), run, and host-wide mode.
func TestIntegrationLoopbackRefused(t *testing.T) {
	requireBinary(t)

	t.Run("container", func(t *testing.T) {
		tp := netnstest.New(t)
		tp.StartServers(t)
		tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{loopName: netip.MustParseAddr("127.0.0.1")})
		resolveLoopbackInDaemon(t, tp.Daemon, netnstest.ServerIPv4)
		port := serveOnLoopback(t, tp.Daemon)
		args := []string{"--dns", "fake-ip", "--dns-upstream", dnsUpstream.String()}

		d := startNetstackd(t, tp, args...)
		for _, name := range []string{loopName, loopHostsName} {
			wantLoopbackRefused(t, fetchByFakeName(t, tp.Client, name, port), d.Log)
		}
		// The refusal costs nothing else: an ordinary flow works.
		if r := curl(t, tp, 10*time.Second, httpURL(netnstest.ServerIPv4, "/")); r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET after the refusals = %q: %s", r.Stdout, r)
		}
		stopHostWide(t, d)

		startNetstackd(t, tp, append(args, "--allow-host-loopback")...)
		for _, name := range []string{loopName, loopHostsName} {
			if r := fetchByFakeName(t, tp.Client, name, port); r.ExitCode != 0 || r.Stdout != loopbackBody {
				t.Errorf("with --allow-host-loopback, %s = %q, want %q: %s", name, r.Stdout, loopbackBody, r)
			}
		}
	})

	t.Run("run", func(t *testing.T) {
		tp := netnstest.New(t)
		tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{loopName: netip.MustParseAddr("127.0.0.1")})
		resolveLoopbackInDaemon(t, tp.Daemon, netnstest.ServerIPv4)
		port := serveOnLoopback(t, tp.Daemon)
		url := fmt.Sprintf("http://%s:%d/", loopName, port)
		// run points the program's resolver at netstackd's DNS address.
		args := []string{"--dns", "fake-ip", "--dns-upstream", dnsUpstream.String(), "--log-level", "debug"}
		cmd := []string{"--", "curl", "-sS", "--max-time", curlMaxTime, url}

		r := runNetstackd(t, tp, nil, append(args, cmd...)...)
		if r.ExitCode != 7 || strings.Contains(r.Stdout, loopbackBody) {
			t.Errorf("curl %s inside run: exit %d, want 7 (refused): %s", url, r.ExitCode, r)
		}
		if !strings.Contains(r.Stderr, "refused destination") || !strings.Contains(r.Stderr, "dst=127.0.0.1") {
			t.Errorf("netstackd run did not log the refusal of 127.0.0.1: %s", r)
		}
		r = runNetstackd(t, tp, nil, append(append(args, "--allow-host-loopback"), cmd...)...)
		if r.ExitCode != 0 || r.Stdout != loopbackBody {
			t.Errorf("curl %s inside run with --allow-host-loopback = %q, exit %d; want %q: %s", url, r.Stdout, r.ExitCode, loopbackBody, r)
		}
	})

	t.Run("host-wide", func(t *testing.T) {
		tp := netnstest.NewUplink(t)
		tp.StartServers(t)
		tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{loopName: netip.MustParseAddr("127.0.0.1")})
		resolveLoopbackInDaemon(t, tp.Daemon, netnstest.ServerIPv4)
		port := serveOnLoopback(t, tp.Daemon)
		args := []string{"--dns", "fake-ip", "--dns-upstream", dnsUpstream.String()}

		p := startHostWide(t, tp, netstackdBin, args...)
		wantLoopbackRefused(t, fetchByFakeName(t, tp.Daemon, loopName, port), p.Log)
		wantBody(t, tp, httpURL(netnstest.ServerIPv4, "/"), netnstest.HelloBody)
		stopHostWide(t, p)

		p = startHostWide(t, tp, netstackdBin, append(args, "--allow-host-loopback")...)
		if r := fetchByFakeName(t, tp.Daemon, loopName, port); r.ExitCode != 0 || r.Stdout != loopbackBody {
			t.Errorf("with --allow-host-loopback, %s = %q, want %q: %s", loopName, r.Stdout, loopbackBody, r)
		}
		stopHostWide(t, p)
	})
}

// dialRefused dials addr from ns and wants ECONNREFUSED (netstackd's reset
// in reply to the SYN) within refuseWithin.
func dialRefused(t *testing.T, ns netnstest.Netns, addr netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c, err := ns.DialContext(ctx, "tcp", addr.String())
	took := time.Since(start)
	if err == nil {
		c.Close()
		t.Errorf("connect to %s, netstackd's own address, succeeded", addr)
		return
	}
	if !errors.Is(err, syscall.ECONNREFUSED) || took > refuseWithin {
		t.Errorf("connect to %s: %v after %v, want ECONNREFUSED within %v", addr, err, took.Round(time.Millisecond), refuseWithin)
	}
}

// udpRefused sends datagrams from ns to addr on a connected socket and
// wants ECONNREFUSED: netstackd answers port unreachable instead of sending
// them. Looping into the TUN, or leaving, nothing would answer.
func udpRefused(t *testing.T, ns netnstest.Netns, addr netip.AddrPort) {
	t.Helper()
	network := "udp4"
	if addr.Addr().Is6() {
		network = "udp6"
	}
	var c net.Conn
	err := ns.Do(func() error {
		var err error
		c, err = net.DialUDP(network, nil, net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var rerr error
	for range 5 {
		// A pending ICMP error fails the next write or read.
		if _, rerr = c.Write([]byte("loop?")); rerr != nil {
			break
		}
		c.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
		if _, rerr = c.Read(make([]byte, 64)); rerr != nil && !isTimeout(rerr) {
			break
		}
	}
	if !errors.Is(rerr, syscall.ECONNREFUSED) {
		t.Errorf("UDP to %s: %v, want ECONNREFUSED from netstackd's port unreachable", addr, rerr)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// TestIntegrationHostWideSelfLoop: in host-wide direct mode netstackd's
// marked sockets are routed by the main table, which holds the TUN's own
// prefixes. A connect to an address there, to the fake-IP range or to the
// DNS address (on another port than 53) is reset at once instead of being
// dialed into the TUN again, over and over, and legitimate flows keep
// working right after each one: the original loop filled all 1,024
// handshake slots. Datagrams there are refused too, not sent.
func TestIntegrationHostWideSelfLoop(t *testing.T) {
	requireBinary(t)
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	tp.StartWhoami(t, whoami4, whoami6)
	p := startHostWide(t, tp, netstackdBin, "--dns-upstream", dnsUpstream.String())

	own := []netip.AddrPort{
		netip.MustParseAddrPort("198.18.5.5:80"),      // the TUN's IPv4 prefix
		netip.MustParseAddrPort("[fd00:1898::5]:80"),  // the TUN's IPv6 prefix
		netip.MustParseAddrPort("198.19.3.250:80"),    // a fake address never handed out
		netip.MustParseAddrPort("[fd00:1919::7]:443"), // the IPv6 fake range
		netip.AddrPortFrom(dnsAddr, 80),               // the DNS address, not its port 53
	}
	const rounds = 5
	for i := range rounds {
		for _, dst := range own {
			dialRefused(t, tp.Daemon, dst)
			wantBody(t, tp, "http://"+whoami4.String()+"/", netnstest.UplinkHostIPv4.String())
		}
		if t.Failed() {
			t.Fatalf("round %d of %d failed", i+1, rounds)
		}
	}
	wantBody(t, tp, "http://"+whoami6.String()+"/", netnstest.UplinkHostIPv6.String())

	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.18.5.5:9999"), netip.MustParseAddrPort("[fd00:1898::5]:9999")} {
		udpRefused(t, tp.Daemon, dst)
	}

	log := p.Log()
	for _, dst := range own {
		if !strings.Contains(log, "dst="+dst.Addr().String()) {
			t.Errorf("netstackd logged nothing about %s", dst.Addr())
		}
	}
	if n := strings.Count(log, `msg="refused destination"`); n < rounds*len(own)+2 {
		t.Errorf("%d refusals logged at debug level, want at least %d", n, rounds*len(own)+2)
	}
	if n := strings.Count(log, "level=INFO msg=\"refused a destination"); n != 1 {
		t.Errorf("%d refusals logged at info level within a few seconds, want 1 (rate-limited)", n)
	}
	stopHostWide(t, p)
}

// TestIntegrationHostWideSelfLoopProxy: through a proxy the proxy decides
// where a flow may go, but an address of netstackd's own is refused before
// the proxy is asked: it exists only inside netstackd.
func TestIntegrationHostWideSelfLoopProxy(t *testing.T) {
	requireBinary(t)
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	socks := tp.StartLoggingSOCKS5(t, hwSocks, nil)
	p := startHostWide(t, tp, netstackdBin, "--socks", hwSocks.String(), "--dns-upstream", dnsUpstream.String())

	own := []netip.AddrPort{
		netip.MustParseAddrPort("198.18.5.5:80"),
		netip.MustParseAddrPort("[fd00:1898::5]:80"),
		netip.MustParseAddrPort("198.19.3.250:80"), // fake, never handed out
		netip.AddrPortFrom(dnsAddr, 80),
	}
	for range 3 {
		for _, dst := range own {
			dialRefused(t, tp.Daemon, dst)
			wantBody(t, tp, httpURL(netnstest.ServerIPv4, "/"), netnstest.HelloBody)
		}
	}
	for _, dst := range own {
		if hasRequest(socks.Requests(), dst) {
			t.Errorf("the proxy was asked for %s, netstackd's own address", dst)
		}
	}
	if !hasRequest(socks.Requests(), netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.HTTPPort)) {
		t.Errorf("the proxy saw none of the legitimate flows: %v", socks.Requests())
	}
	udpRefused(t, tp.Daemon, netip.MustParseAddrPort("198.18.5.5:9999"))
	stopHostWide(t, p)
}

// TestIntegrationFwmarkUser: --fwmark with --user outside host-wide mode
// cannot work (the mark needs CAP_NET_ADMIN, which --user drops there): it
// is a usage error naming both, before anything is set up, where it used to
// start, say ready, and fail every dial with EPERM.
func TestIntegrationFwmarkUser(t *testing.T) {
	requireBinary(t)
	uid, _ := throwawayUser(t)
	client := netnstest.NewNetns(t)
	ns := netnstest.NewNetns(t)
	for _, args := range [][]string{
		{"--fwmark", "0x10", "--user", uid},
		{"--netns", client.Path, "--fwmark", "0x10", "--user", uid},
	} {
		r := ns.Exec(t, 10*time.Second, append([]string{netstackdBin}, args...)...)
		stderr := strings.TrimSuffix(r.Stderr, "\n")
		if r.ExitCode != 2 || strings.Contains(stderr, "\n") || !strings.Contains(stderr, "--fwmark") || !strings.Contains(stderr, "--user") {
			t.Errorf("netstackd %s: exit %d, stderr %q; want exit 2 and one line naming --fwmark and --user", strings.Join(args, " "), r.ExitCode, r.Stderr)
		}
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		for _, n := range []netnstest.Netns{ns, client} {
			if ok, err := n.HasLink(ctx, tunName); ok || err != nil {
				t.Errorf("the refused start left %s in %s (err %v)", tunName, n, err)
			}
		}
		cancel()
	}
}
