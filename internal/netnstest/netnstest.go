// Package netnstest builds throwaway network topologies for end-to-end tests
// of netstackd: three network namespaces joined so that no test packet can
// leave the machine, Go servers listening inside them, and bounded helpers to
// run commands and processes (curl, socat, microsocks, netstackd) there.
//
// The topology is
//
//	server ns (Server)          daemon ns (Daemon)              client ns (Client)
//	192.0.2.2/24   ── veth ──   192.0.2.1/24                    lo only; netstackd
//	2001:db8:1::2/64            2001:db8:1::1/64                creates its TUN here
//	test servers, microsocks    netstackd runs here;            with default routes;
//	                            blackholes for its own pool     curl, socat, Go dials
//
// None of the namespaces has a default route, so whatever a client asks
// netstackd to reach, its outbound sockets can only reach the server
// namespace; the daemon namespace also blackholes netstackd's own address
// pools (198.18.0.0/15, 198.19.0.0/16, fd00:1898::/64, fd00:1919::/96) so a
// flow can never loop back into the TUN.
//
// Every namespace is named with a per-process prefix and deleted in
// t.Cleanup, every command is bounded by a timeout, and every process the
// helpers start is ended by its PID in t.Cleanup (and, should the test binary
// die first, by the kernel through PR_SET_PDEATHSIG).
//
// For tests of TUN devices and links there are bare namespaces
// (NewBareNetns), `ip` bounded by a timeout (IP), rtnetlink handles acting
// inside a namespace (NetlinkHandle), and UDP packets built and parsed by
// hand (UDPPacket, ParseUDP). The package imports no netstackd package, so
// the tests of every package, internal ones included, can use it.
//
// A helper that needs a program the machine lacks skips its test, naming the
// Debian package to install (RequireCommand); so does every helper when not
// root. scripts/deps.sh installs them all.
package netnstest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Addresses of the topology. They come from the documentation ranges
// (RFC 5737, RFC 3849) and exist only inside the namespaces New creates.
var (
	ServerIPv4 = netip.MustParseAddr("192.0.2.2")
	DaemonIPv4 = netip.MustParseAddr("192.0.2.1")
	ServerIPv6 = netip.MustParseAddr("2001:db8:1::2")
	DaemonIPv6 = netip.MustParseAddr("2001:db8:1::1")
)

// Blackholes are the routes New installs in the daemon namespace: the
// addresses netstackd gives its TUN and hands out, which must never be
// dialled from the daemon's namespace.
var Blackholes = []netip.Prefix{
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("198.19.0.0/16"),
	netip.MustParsePrefix("fd00:1898::/64"),
	netip.MustParsePrefix("fd00:1919::/96"),
}

// CommandTimeout bounds the setup and teardown commands the helpers run.
const CommandTimeout = 15 * time.Second

// namePrefix starts the name of every namespace this package creates; the
// test binary's PID follows, so concurrent runs never share a namespace.
const namePrefix = "nsdt"

// Veth ends: the interface in the server namespace and the one in the
// daemon namespace.
const (
	ServerLink = "to-daemon"
	DaemonLink = "to-server"
)

// RequireRoot skips t unless the test runs as root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
}

// Netns is a named network namespace under /run/netns.
type Netns struct {
	Name string // for `ip -n NAME` and `ip netns exec NAME`
	Path string // /run/netns/NAME, for setns(2) and netstackd --netns
}

func (n Netns) String() string { return n.Name }

// Topology is the three namespaces New builds.
type Topology struct {
	Server Netns // test servers and SOCKS servers
	Daemon Netns // netstackd
	Client Netns // netstackd's TUN and the clients
}

var topoSeq atomic.Int64

// New builds the server, daemon and client namespaces described in the
// package comment and deletes them in t.Cleanup, also when t fails. It skips
// t when not root or without ip. The veth between server and daemon is up
// when New returns.
func New(t testing.TB) *Topology {
	t.Helper()
	RequireRoot(t)
	RequireCommand(t, "ip", "iproute2")
	sweepStale(t)
	seq := topoSeq.Add(1)
	mk := func(role string) Netns {
		t.Helper()
		return newNetns(t, fmt.Sprintf("%s-%d-%d-%s", namePrefix, os.Getpid(), seq, role))
	}
	tp := &Topology{Server: mk("srv"), Daemon: mk("dmn"), Client: mk("cli")}

	s, d := tp.Server.Name, tp.Daemon.Name
	// Created inside the server namespace with its peer placed straight into
	// the daemon namespace: the pair never appears in the caller's namespace.
	mustIP(t, "-n", s, "link", "add", ServerLink, "type", "veth", "peer", "name", DaemonLink, "netns", d)
	mustIP(t, "-n", s, "addr", "add", ServerIPv4.String()+"/24", "dev", ServerLink)
	mustIP(t, "-n", s, "addr", "add", ServerIPv6.String()+"/64", "dev", ServerLink, "nodad")
	mustIP(t, "-n", d, "addr", "add", DaemonIPv4.String()+"/24", "dev", DaemonLink)
	mustIP(t, "-n", d, "addr", "add", DaemonIPv6.String()+"/64", "dev", DaemonLink, "nodad")
	for _, p := range Blackholes {
		fam := "-4"
		if p.Addr().Is6() {
			fam = "-6"
		}
		mustIP(t, "-n", d, fam, "route", "add", "blackhole", p.String())
	}
	mustIP(t, "-n", s, "link", "set", ServerLink, "up")
	mustIP(t, "-n", d, "link", "set", DaemonLink, "up")

	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	for _, c := range []struct{ ns, link string }{{s, ServerLink}, {d, DaemonLink}} {
		if err := Poll(ctx, 20*time.Millisecond, func() (bool, error) {
			out, err := ipOutput(ctx, "-n", c.ns, "-o", "link", "show", "dev", c.link)
			return err == nil && strings.Contains(out, "LOWER_UP"), nil
		}); err != nil {
			t.Fatalf("veth %s in %s did not come up: %v", c.link, c.ns, err)
		}
	}
	return tp
}

// NewNetns creates one namespace with only lo, up, and deletes it in
// t.Cleanup. It skips t when not root or without ip. NewBareNetns leaves lo
// down and takes a name prefix.
func NewNetns(t testing.TB) Netns {
	t.Helper()
	RequireRoot(t)
	RequireCommand(t, "ip", "iproute2")
	sweepStale(t)
	return newNetns(t, fmt.Sprintf("%s-%d-%d-one", namePrefix, os.Getpid(), topoSeq.Add(1)))
}

func newNetns(t testing.TB, name string) Netns {
	t.Helper()
	mustIP(t, "netns", "add", name)
	t.Cleanup(func() { deleteNetns(t, name) })
	mustIP(t, "-n", name, "link", "set", "lo", "up")
	return Netns{Name: name, Path: "/run/netns/" + name}
}

// Poll calls cond every interval until it reports true or an error, or ctx
// ends. It returns nil once cond is true, cond's error, or ctx's error.
func Poll(ctx context.Context, interval time.Duration, cond func() (bool, error)) error {
	tick := time.NewTicker(interval)
	defer tick.Stop()
	for {
		ok, err := cond()
		if err != nil {
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-tick.C:
		}
	}
}

// TestContext returns a context that ends after d, or when the test ends, or
// shortly before the test binary's deadline (go test -timeout) so that
// cleanups still have time to run and report.
func TestContext(t *testing.T, d time.Duration) context.Context {
	ctx := t.Context()
	if dl, ok := t.Deadline(); ok {
		reserve := min(30*time.Second, time.Until(dl)/5)
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, dl.Add(-reserve))
		t.Cleanup(cancel)
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	t.Cleanup(cancel)
	return ctx
}

func ipOutput(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return string(out), nil
}

func mustIP(t testing.TB, args ...string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	if _, err := ipOutput(ctx, args...); err != nil {
		t.Fatal(err)
	}
}

func deleteNetns(t testing.TB, name string) {
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	if _, err := ipOutput(ctx, "netns", "del", name); err != nil {
		t.Errorf("delete namespace: %v", err)
	}
}

// staleName matches the names New, NewUplink, NewNetns and NewBareNetns
// give: prefix, PID, sequence number, role or the caller's prefix.
var staleName = regexp.MustCompile(`^` + namePrefix + `-([0-9]+)-[0-9]+-[a-z0-9]+$`)

// sweepStale deletes namespaces that an earlier test binary created and could
// not delete because it was killed (go test -timeout panics without running
// cleanups). Only names of this package whose PID no longer runs are touched.
func sweepStale(t testing.TB) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	out, err := ipOutput(ctx, "netns", "list")
	if err != nil {
		t.Logf("list namespaces: %v", err)
		return
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		m := staleName.FindStringSubmatch(f[0])
		if m == nil {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() || unix.Kill(pid, 0) != unix.ESRCH {
			continue
		}
		t.Logf("deleting namespace %s left by dead test process %d", f[0], pid)
		if _, err := ipOutput(ctx, "netns", "del", f[0]); err != nil {
			t.Logf("delete stale namespace: %v", err)
		}
	}
}
