package netnstest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// The uplink topology stands for one machine on a network, for host-wide
// mode, where netstackd takes the default routes of its own namespace:
//
//	server ns (Server)                          host ns (Daemon)
//	lo: 192.0.2.2-4/32,                         netstackd with --route 0.0.0.0/0 and ::/0,
//	    2001:db8:1::2/128, 2001:db8:1::3/128    and the clients (curl, ping) beside it
//	198.51.100.1/24 ── veth (uplink) ────────── 198.51.100.2/24
//	2001:db8:99::1/64                           2001:db8:99::2/64
//	                                            default via 198.51.100.1 / 2001:db8:99::1
//
// The servers' addresses are off-link for the host, reached only by its
// default routes, which is what host-wide mode takes over. The server
// namespace has no route beyond the uplink's prefix, and nothing leaves the
// two namespaces.

// Addresses of the uplink topology (RFC 5737 and RFC 3849 ranges).
var (
	UplinkServerIPv4 = netip.MustParseAddr("198.51.100.1")
	UplinkHostIPv4   = netip.MustParseAddr("198.51.100.2")
	UplinkServerIPv6 = netip.MustParseAddr("2001:db8:99::1")
	UplinkHostIPv6   = netip.MustParseAddr("2001:db8:99::2")
	// OtherIPv4 and OtherIPv6 are second off-link server addresses, for
	// destinations a test treats apart (excluded from the TUN, say).
	OtherIPv4 = netip.MustParseAddr("192.0.2.3")
	OtherIPv6 = netip.MustParseAddr("2001:db8:1::3")
	// ProxyIPv4 is a third off-link server address, for a proxy server
	// apart from the servers it relays to.
	ProxyIPv4 = netip.MustParseAddr("192.0.2.4")
)

// Veth ends of the uplink topology.
const (
	UplinkServerLink = "to-host"
	UplinkHostLink   = "uplink"
)

// NewUplink builds the uplink topology and deletes it in t.Cleanup. The
// returned Topology's Server is the server namespace and its Daemon the host
// namespace; Client is unset. The host namespace allows ping sockets to
// every group (net.ipv4.ping_group_range) and uses loose reverse-path
// filtering. StartServers, StartMicrosocks, StartLoggingSOCKS5,
// StartDnsmasq and StartUDPEcho work on it as on New's topology. It skips t
// when not root or without ip.
func NewUplink(t testing.TB) *Topology {
	t.Helper()
	RequireRoot(t)
	RequireCommand(t, "ip", "iproute2")
	sweepStale(t)
	seq := topoSeq.Add(1)
	mk := func(role string) Netns {
		t.Helper()
		return newNetns(t, fmt.Sprintf("%s-%d-%d-%s", namePrefix, os.Getpid(), seq, role))
	}
	tp := &Topology{Server: mk("srv"), Daemon: mk("dmn")}
	s, h := tp.Server.Name, tp.Daemon.Name
	mustIP(t, "-n", s, "link", "add", UplinkServerLink, "type", "veth", "peer", "name", UplinkHostLink, "netns", h)
	mustIP(t, "-n", s, "addr", "add", UplinkServerIPv4.String()+"/24", "dev", UplinkServerLink)
	mustIP(t, "-n", s, "addr", "add", UplinkServerIPv6.String()+"/64", "dev", UplinkServerLink, "nodad")
	for _, a := range []netip.Addr{ServerIPv4, OtherIPv4, ProxyIPv4, ServerIPv6, OtherIPv6} {
		mustIP(t, "-n", s, "addr", "add", netip.PrefixFrom(a, a.BitLen()).String(), "dev", "lo")
	}
	mustIP(t, "-n", h, "addr", "add", UplinkHostIPv4.String()+"/24", "dev", UplinkHostLink)
	mustIP(t, "-n", h, "addr", "add", UplinkHostIPv6.String()+"/64", "dev", UplinkHostLink, "nodad")
	mustIP(t, "-n", s, "link", "set", UplinkServerLink, "up")
	mustIP(t, "-n", h, "link", "set", UplinkHostLink, "up")
	mustIP(t, "-n", h, "route", "add", "default", "via", UplinkServerIPv4.String(), "dev", UplinkHostLink)
	mustIP(t, "-n", h, "-6", "route", "add", "default", "via", UplinkServerIPv6.String(), "dev", UplinkHostLink)
	tp.Daemon.Sysctl(t, "net.ipv4.ping_group_range", "0 2147483647")
	tp.Daemon.Sysctl(t, "net.ipv4.conf.all.rp_filter", "2")

	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	for _, c := range []struct{ ns, link string }{{s, UplinkServerLink}, {h, UplinkHostLink}} {
		if err := Poll(ctx, 20*time.Millisecond, func() (bool, error) {
			out, err := ipOutput(ctx, "-n", c.ns, "-o", "link", "show", "dev", c.link)
			return err == nil && strings.Contains(out, "LOWER_UP"), nil
		}); err != nil {
			t.Fatalf("veth %s in %s did not come up: %v", c.link, c.ns, err)
		}
		// The kernel adds the IPv6 link-local address (and its local
		// route) once the link is up, after its own DAD: wait for it,
		// so that routing state taken now stays as it is.
		if err := Poll(ctx, 20*time.Millisecond, func() (bool, error) {
			out, err := ipOutput(ctx, "-n", c.ns, "-6", "-o", "addr", "show", "dev", c.link, "scope", "link")
			return err == nil && strings.Contains(out, "fe80:") && !strings.Contains(out, "tentative"), nil
		}); err != nil {
			t.Fatalf("veth %s in %s got no IPv6 link-local address: %v", c.link, c.ns, err)
		}
	}
	return tp
}

// Sysctl sets key (net.ipv4.conf.all.rp_filter, say) to value in n. Only
// per-namespace keys (net.*) make sense.
func (n Netns) Sysctl(t testing.TB, key, value string) {
	t.Helper()
	path := "/proc/sys/" + strings.ReplaceAll(key, ".", "/")
	err := n.Do(func() error {
		// /proc/sys/net shows the namespace of the thread that opens it.
		return os.WriteFile(path, []byte(value), 0o644)
	})
	if err != nil {
		t.Fatalf("sysctl %s=%q in %s: %v", key, value, n, err)
	}
}

// RoutingState is everything policy routing can change in n: the rules and
// every routing table, both families, one sorted line each (a link made
// anew lists its routes in another order).
func (n Netns) RoutingState(t testing.TB) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	var lines []string
	for _, fam := range []string{"-4", "-6"} {
		for _, what := range [][]string{{"rule", "show"}, {"route", "show", "table", "all"}} {
			out, err := ipOutput(ctx, append([]string{"-n", n.Name, fam}, what...)...)
			if err != nil {
				t.Fatal(err)
			}
			for l := range strings.Lines(out) {
				lines = append(lines, fam+" "+strings.TrimSpace(l))
			}
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// Whoami is an HTTP server in the server namespace that answers every GET
// with the address the request came from, so a test can tell which way a
// connection went.
type Whoami struct {
	srv *http.Server
	wg  sync.WaitGroup
}

// StartWhoami serves on each of at in the server namespace until t's
// cleanup, which closes the listeners and connections and waits for the
// server goroutines.
func (tp *Topology) StartWhoami(t testing.TB, at ...netip.AddrPort) *Whoami {
	t.Helper()
	w := &Whoami{srv: &http.Server{
		Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
			ap, err := netip.ParseAddrPort(r.RemoteAddr)
			if err != nil {
				http.Error(rw, err.Error(), http.StatusInternalServerError)
				return
			}
			io.WriteString(rw, ap.Addr().Unmap().String())
		}),
		ReadHeaderTimeout: 10 * time.Second,
		ErrorLog:          log.New(io.Discard, "", 0),
	}}
	t.Cleanup(w.close)
	for _, a := range at {
		ln, err := tp.Server.Listen("tcp", a.String())
		if err != nil {
			t.Fatal(err)
		}
		w.wg.Go(func() { w.srv.Serve(ln) })
	}
	return w
}

func (w *Whoami) close() {
	w.srv.Close()
	w.wg.Wait()
}

// NotifySocket is a systemd-style notification socket (sd_notify(3)) that
// a test hands to a daemon in NOTIFY_SOCKET, to learn when it is ready.
type NotifySocket struct {
	Path string
	conn *net.UnixConn
}

// ListenNotify opens a notification socket that any user may send to (a
// daemon may have switched user before it reports), closed in t.Cleanup.
func ListenNotify(t testing.TB) *NotifySocket {
	t.Helper()
	dir, err := os.MkdirTemp("", "netnstest-notify-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path := dir + "/notify"
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := os.Chmod(path, 0o666); err != nil {
		t.Fatal(err)
	}
	return &NotifySocket{Path: path, conn: conn}
}

// WaitReady reads notifications until one holds READY=1, and fails t if
// none does before ctx ends or p exits.
func (s *NotifySocket) WaitReady(ctx context.Context, t testing.TB, p *Process) {
	t.Helper()
	if err := s.Ready(ctx, p.Done()); err != nil {
		t.Fatalf("%s: %v\n%s", p, err, p.Log())
	}
}

// Ready reads notifications until one holds READY=1. It fails when ctx
// ends or exited is closed first.
func (s *NotifySocket) Ready(ctx context.Context, exited <-chan struct{}) error {
	buf := make([]byte, 4096)
	for {
		select {
		case <-exited:
			return errors.New("exited before it reported READY=1")
		default:
		}
		if ctx.Err() != nil {
			return fmt.Errorf("no READY=1: %w", context.Cause(ctx))
		}
		// Short reads, so that an exit is noticed soon.
		s.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		n, err := s.conn.Read(buf)
		if err != nil {
			continue
		}
		for line := range strings.Lines(string(buf[:n])) {
			if strings.TrimSpace(line) == "READY=1" {
				return nil
			}
		}
	}
}
