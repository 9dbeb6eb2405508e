package main_test

// Host-wide mode end to end: netstackd takes the default routes of its own
// namespace. Everything runs in the uplink topology of internal/netnstest
// (a host namespace whose only way out is a veth to a server namespace), never
// in the machine's own namespace.

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// The defaults host-wide mode uses: table 28275, rules at 28270 and 28271,
// mark 0x6e73.
const (
	hwTableRule = "not from all fwmark 0x6e73 lookup 28275"
	hwMainRule  = "28270:\tfrom all lookup main suppress_prefixlength 0"
)

var (
	hwSocks    = netip.AddrPortFrom(netnstest.ProxyIPv4, netnstest.SocksPort)
	whoamiPort = uint16(8081)
	whoami4    = netip.AddrPortFrom(netnstest.OtherIPv4, whoamiPort)
	whoami6    = netip.AddrPortFrom(netnstest.OtherIPv6, whoamiPort)
)

// startHostWide runs `bin --route 0.0.0.0/0 --route ::/0 args...` in tp's
// host namespace and returns once it reported READY=1 (sd_notify), which it
// does after its rules are in place and privileges are dropped.
func startHostWide(t *testing.T, tp *netnstest.Topology, bin string, args ...string) *netnstest.Process {
	t.Helper()
	notify := netnstest.ListenNotify(t)
	t.Setenv("NOTIFY_SOCKET", notify.Path)
	full := append([]string{bin, "--route", "0.0.0.0/0", "--route", "::/0", "--log-level", "debug"}, args...)
	var p *netnstest.Process
	t.Cleanup(func() {
		if p != nil && strings.Contains(p.Log(), "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race:\n%s", p, p.Log())
		}
	})
	p = tp.Daemon.Start(t, full...)
	start := time.Now()
	notify.WaitReady(netnstest.TestContext(t, 20*time.Second), t, p)
	t.Logf("%s ready after %v: %s", p, time.Since(start).Round(time.Millisecond), strings.Join(full[1:], " "))
	return p
}

// stopHostWide ends p with SIGTERM and checks it exited 0 in time.
func stopHostWide(t *testing.T, p *netnstest.Process) {
	t.Helper()
	st, err := p.Stop(syscall.SIGTERM, stopWithin)
	if err != nil || st == nil || st.ExitCode() != 0 {
		t.Errorf("SIGTERM: exit %v, %v\n%s", st, err, p.Log())
	}
}

// hwCurl runs curl in the host namespace, where host-wide mode applies.
func hwCurl(t *testing.T, tp *netnstest.Topology, args ...string) *netnstest.Result {
	t.Helper()
	a := append([]string{"curl", "-sS", "-g", "--max-time", "10"}, args...)
	return tp.Daemon.Exec(t, 15*time.Second, a...)
}

// wantBody fetches url from the host namespace and checks the body.
func wantBody(t *testing.T, tp *netnstest.Topology, url, want string) {
	t.Helper()
	if r := hwCurl(t, tp, url); r.ExitCode != 0 || r.Stdout != want {
		t.Errorf("curl %s = %q, want %q: %s", url, r.Stdout, want, r)
	}
}

func hasRequest(reqs []netnstest.SOCKS5Request, hostport netip.AddrPort) bool {
	for _, r := range reqs {
		if r.Host == hostport.Addr().String() && r.Port == hostport.Port() {
			return true
		}
	}
	return false
}

// TestIntegrationHostWide drives host-wide mode through a logging SOCKS5
// server and directly: everything the host sends goes through the TUN, the
// proxy and netstackd's own sockets do not loop, --exclude'd destinations
// bypass it, and after exit (also after SIGKILL and a restart) the rules and
// routing tables are exactly as before.
func TestIntegrationHostWide(t *testing.T) {
	requireBinary(t)
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	tp.StartWhoami(t, whoami4, whoami6)
	socks := tp.StartLoggingSOCKS5(t, hwSocks, nil)
	before := tp.Daemon.RoutingState(t)

	t.Run("socks5", func(t *testing.T) {
		p := startHostWide(t, tp, netstackdBin, "--socks", hwSocks.String(),
			"--exclude", netip.PrefixFrom(netnstest.OtherIPv4, 32).String(), "--exclude", netip.PrefixFrom(netnstest.OtherIPv6, 128).String())
		rules := tp.Daemon.Exec(t, netnstest.CommandTimeout, "ip", "rule", "show").Stdout
		if !strings.Contains(rules, hwMainRule) || !strings.Contains(rules, hwTableRule) {
			t.Errorf("ip rule lacks host-wide mode's rules:\n%s", rules)
		}
		// The proxy server is excluded by itself, beside --exclude.
		table := tp.Daemon.Exec(t, netnstest.CommandTimeout, "ip", "route", "show", "table", "28275").Stdout
		for _, want := range []string{"default dev netstack0", "throw " + netnstest.ProxyIPv4.String(), "throw " + netnstest.OtherIPv4.String()} {
			if !strings.Contains(table, want) {
				t.Errorf("table 28275 lacks %q:\n%s", want, table)
			}
		}

		// Through the TUN to the proxy, both families: the proxy logs each.
		for _, ip := range []netip.Addr{netnstest.ServerIPv4, netnstest.ServerIPv6} {
			wantBody(t, tp, httpURL(ip, "/"), netnstest.HelloBody)
			if dst := netip.AddrPortFrom(ip, netnstest.HTTPPort); !hasRequest(socks.Requests(), dst) {
				t.Errorf("the proxy saw no CONNECT to %s: %v", dst, socks.Requests())
			}
		}

		// netstackd's connection to the proxy carries the mark, and
		// leaves by the uplink.
		testProxyConnMarked(t, tp)

		// Excluded: straight out of the uplink, the proxy never asked.
		for _, c := range []struct {
			dst  netip.AddrPort
			from netip.Addr
		}{{whoami4, netnstest.UplinkHostIPv4}, {whoami6, netnstest.UplinkHostIPv6}} {
			wantBody(t, tp, "http://"+c.dst.String()+"/", c.from.String())
			if hasRequest(socks.Requests(), c.dst) {
				t.Errorf("the excluded %s went through the proxy", c.dst)
			}
		}
		stopHostWide(t, p)
		if after := tp.Daemon.RoutingState(t); after != before {
			t.Errorf("routing state after exit differs:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("direct", func(t *testing.T) {
		echo := tp.StartUDPEcho(t, netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort))
		tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{"hostwide.test": netnstest.OtherIPv4})
		p := startHostWide(t, tp, netstackdBin, "--dns-upstream", netip.AddrPortFrom(netnstest.ServerIPv4, 53).String())

		// A direct flow: netstackd's own dial is marked, or it would
		// come back into the TUN; the stack logs the flow it relayed.
		wantBody(t, tp, "http://"+whoami4.String()+"/", netnstest.UplinkHostIPv4.String())
		wantBody(t, tp, "http://"+whoami6.String()+"/", netnstest.UplinkHostIPv6.String())
		for _, dst := range []netip.AddrPort{whoami4, whoami6} {
			if !strings.Contains(p.Log(), "dst="+dst.String()) {
				t.Errorf("netstackd logged no flow to %s: it did not cross the TUN", dst)
			}
		}

		// UDP from a marked socket: the echo sees the uplink address.
		testHostWideUDP(t, tp, echo)

		// DNS: the query enters the TUN (port 53 of any address is
		// netstackd's), goes upstream over TCP from a marked socket.
		r := tp.Daemon.Exec(t, 15*time.Second, "dig", "+short", "+time=3", "+tries=1", "@"+netnstest.OtherIPv4.String(), "hostwide.test", "A")
		if strings.TrimSpace(r.Stdout) != netnstest.OtherIPv4.String() {
			t.Errorf("dig hostwide.test = %q, want %s: %s", r.Stdout, netnstest.OtherIPv4, r)
		}

		// Ping from a marked ping socket: a real reply from the server,
		// and silence from an address nobody has (netstackd answering
		// itself would answer both).
		if r := tp.Daemon.Exec(t, 10*time.Second, "ping", "-c", "1", "-W", "3", netnstest.ServerIPv4.String()); r.ExitCode != 0 {
			t.Errorf("ping %s through the TUN failed: %s", netnstest.ServerIPv4, r)
		}
		if r := tp.Daemon.Exec(t, 10*time.Second, "ping", "-c", "1", "-W", "1", "192.0.2.99"); r.ExitCode == 0 {
			t.Errorf("ping 192.0.2.99 (nobody's) was answered: echo requests are not forwarded for real")
		}
		stopHostWide(t, p)
		if after := tp.Daemon.RoutingState(t); after != before {
			t.Errorf("routing state after exit differs:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})

	t.Run("sigkill-restart", func(t *testing.T) {
		p := startHostWide(t, tp, netstackdBin, "--socks", hwSocks.String())
		if err := p.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if p.Wait(stopWithin) == nil {
			t.Fatal("netstackd still running after SIGKILL")
		}
		stale := tp.Daemon.RoutingState(t)
		if stale == before || !strings.Contains(stale, hwTableRule) {
			t.Fatalf("SIGKILL left nothing behind, so the test proves nothing:\n%s", stale)
		}
		// Without its TUN the stale rules route nothing into a dead
		// device: the host keeps its connectivity meanwhile.
		wantBody(t, tp, "http://"+whoami4.String()+"/", netnstest.UplinkHostIPv4.String())

		p = startHostWide(t, tp, netstackdBin, "--socks", hwSocks.String())
		if !strings.Contains(p.Log(), `level=INFO msg="removed stale host-wide routing`) {
			t.Errorf("the restarted netstackd did not report removing stale state:\n%s", p.Log())
		}
		n := strings.Count(tp.Daemon.Exec(t, netnstest.CommandTimeout, "ip", "-4", "rule", "show").Stdout, "lookup 28275")
		if n != 1 {
			t.Errorf("%d IPv4 rules for table 28275 after the restart, want 1", n)
		}
		wantBody(t, tp, httpURL(netnstest.ServerIPv4, "/"), netnstest.HelloBody)
		stopHostWide(t, p)
		if after := tp.Daemon.RoutingState(t); after != before {
			t.Errorf("routing state after SIGKILL, restart and exit differs:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
}

// testProxyConnMarked holds a flow open through the proxy and checks, with
// ss, that netstackd's socket to the proxy carries the mark and its source is
// the uplink address.
func testProxyConnMarked(t *testing.T, tp *netnstest.Topology) {
	t.Helper()
	ctx := netnstest.TestContext(t, 20*time.Second)
	c, err := tp.Daemon.DialContext(ctx, "tcp", netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.EchoPort).String())
	if err != nil {
		t.Fatalf("dial the echo server through the TUN: %v", err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("ping\n")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := c.Read(buf); err != nil || string(buf) != "ping\n" {
		t.Fatalf("echo through the TUN: %q, %v", buf, err)
	}
	r := tp.Daemon.Exec(t, netnstest.CommandTimeout, "ss", "-tnHe", "state", "established", "dst", hwSocks.String())
	lines := strings.Split(strings.TrimSpace(r.Stdout), "\n")
	if r.ExitCode != 0 || len(lines) == 0 || lines[0] == "" {
		t.Fatalf("ss found no connection to the proxy %s: %s", hwSocks, r)
	}
	for _, l := range lines {
		if !strings.Contains(l, "fwmark:0x6e73") || !strings.Contains(l, netnstest.UplinkHostIPv4.String()+":") {
			t.Errorf("connection to the proxy without the mark or not from the uplink: %s", l)
		}
	}
}

// testHostWideUDP sends a datagram from the host namespace to the UDP echo
// through the TUN; netstackd's marked socket sends it from the uplink.
func testHostWideUDP(t *testing.T, tp *netnstest.Topology, echo *netnstest.UDPEcho) {
	t.Helper()
	dst := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort)
	pc, err := tp.Daemon.ListenPacket("udp4", ":0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	buf := make([]byte, 64)
	var got bool
	for range 5 {
		if _, err := pc.WriteTo([]byte("hostwide"), net.UDPAddrFromAddrPort(dst)); err != nil {
			t.Fatal(err)
		}
		pc.SetReadDeadline(time.Now().Add(time.Second))
		if n, _, err := pc.ReadFrom(buf); err == nil && string(buf[:n]) == "hostwide" {
			got = true
			break
		}
	}
	if !got {
		t.Fatalf("no UDP echo from %s through the TUN", dst)
	}
	srcs := echo.Sources(dst)
	if len(srcs) == 0 || srcs[0].Addr() != netnstest.UplinkHostIPv4 {
		t.Errorf("UDP echo saw sources %v, want the uplink address %s", srcs, netnstest.UplinkHostIPv4)
	}
}

// noCgoNetstackd builds netstackd with CGO_ENABLED=0 into t's temporary
// directory: only such a build can keep CAP_NET_ADMIN on every thread across
// --user. The race detector needs cgo, so this build runs without it.
func noCgoNetstackd(t *testing.T) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Minute)
	defer cancel()
	gomod, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "netstackd")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/netstackd")
	cmd.Dir = filepath.Dir(strings.TrimSpace(string(gomod)))
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build with CGO_ENABLED=0: %v\n%s", err, out)
	}
	return bin
}

// procStatus reads the fields of /proc/PID/status, or of one of its threads.
func procStatus(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	st := map[string]string{}
	for line := range strings.Lines(string(b)) {
		if k, v, ok := strings.Cut(line, ":"); ok {
			st[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return st
}

// checkCredentials checks every thread of pid: uid and gid (real, effective,
// saved, filesystem), no supplementary groups, the effective, permitted and
// ambient capabilities, and no_new_privs.
func checkCredentials(t *testing.T, pid int, uid, gid, capEff string) {
	t.Helper()
	tasks, err := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", pid))
	if err != nil || len(tasks) == 0 {
		t.Fatalf("threads of %d: %v", pid, err)
	}
	for _, path := range tasks {
		st := procStatus(t, path)
		for k, want := range map[string]string{
			"Uid":        strings.Repeat(uid+" ", 3) + uid,
			"Gid":        strings.Repeat(gid+" ", 3) + gid,
			"Groups":     "",
			"CapEff":     capEff,
			"CapPrm":     capEff,
			"CapAmb":     "0000000000000000",
			"NoNewPrivs": "1",
		} {
			if st[k] != want {
				t.Errorf("%s: %s %q, want %q", path, k, st[k], want)
			}
		}
	}
	t.Logf("%d threads of %d: uid %s gid %s CapEff %s NoNewPrivs 1", len(tasks), pid, uid, gid, capEff)
}

// TestIntegrationHostWideUser: with --user, netstackd runs as that user once
// set up, every thread keeping CAP_NET_ADMIN in host-wide mode (for SO_MARK
// and to remove its rules on exit) and nothing otherwise; traffic flows, and
// the host-wide instance still removes its rules on exit.
func TestIntegrationHostWideUser(t *testing.T) {
	requireBinary(t)
	uid, gid := throwawayUser(t)
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	tp.StartWhoami(t, whoami4)
	before := tp.Daemon.RoutingState(t)

	t.Run("host-wide", func(t *testing.T) {
		bin := noCgoNetstackd(t)
		p := startHostWide(t, tp, bin, "--user", uid)
		checkCredentials(t, p.PID(), uid, gid, "0000000000001000") // CAP_NET_ADMIN (12)
		wantBody(t, tp, "http://"+whoami4.String()+"/", netnstest.UplinkHostIPv4.String())
		wantBody(t, tp, httpURL(netnstest.ServerIPv6, "/"), netnstest.HelloBody)
		if !strings.Contains(p.Log(), "dst="+whoami4.String()) {
			t.Errorf("netstackd logged no flow to %s: it did not cross the TUN", whoami4)
		}
		if r := tp.Daemon.Exec(t, 10*time.Second, "ping", "-c", "1", "-W", "3", netnstest.ServerIPv4.String()); r.ExitCode != 0 {
			t.Errorf("ping through the TUN as uid %s failed: %s", uid, r)
		}
		stopHostWide(t, p)
		if after := tp.Daemon.RoutingState(t); after != before {
			t.Errorf("routing state after exit as uid %s differs:\nbefore:\n%s\nafter:\n%s", uid, before, after)
		}
	})

	t.Run("cgo-refused", func(t *testing.T) {
		// The test binary's netstackd has cgo (the race detector needs
		// it): it cannot keep a capability on every thread, and says so
		// before setting anything up.
		r := tp.Daemon.Exec(t, netnstest.CommandTimeout, netstackdBin, "--route", "0.0.0.0/0", "--user", uid)
		if r.ExitCode != 2 || !strings.Contains(r.Stderr, "CGO_ENABLED=0") {
			t.Errorf("host-wide --user with a cgo build: exit %d, want 2 and a word on CGO_ENABLED=0: %s", r.ExitCode, r)
		}
		if after := tp.Daemon.RoutingState(t); after != before {
			t.Errorf("the refused start changed the routing state")
		}
	})

	t.Run("netns", func(t *testing.T) {
		// Not host-wide: every capability goes. Any build can do that,
		// so this one runs the usual (race, cgo) binary.
		client := netnstest.NewNetns(t)
		notify := netnstest.ListenNotify(t)
		t.Setenv("NOTIFY_SOCKET", notify.Path)
		p := tp.Daemon.Start(t, netstackdBin, "--netns", client.Path, "--user", uid+":"+gid, "--dns", "off")
		notify.WaitReady(netnstest.TestContext(t, 20*time.Second), t, p)
		checkCredentials(t, p.PID(), uid, gid, "0000000000000000")
		r := client.Exec(t, 15*time.Second, "curl", "-sS", "-g", "--max-time", "10", "http://"+whoami4.String()+"/")
		if r.ExitCode != 0 || r.Stdout != netnstest.UplinkHostIPv4.String() {
			t.Errorf("curl from the served namespace = %q, want %s: %s", r.Stdout, netnstest.UplinkHostIPv4, r)
		}
		stopHostWide(t, p)
		if ok, err := client.HasLink(t.Context(), tunName); ok || err != nil {
			t.Errorf("the TUN is still in the namespace after exit (%v)", err)
		}
	})
}
