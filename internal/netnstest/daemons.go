package netnstest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/miekg/dns"
)

// TinyproxyPort is where tests usually ask StartTinyproxy to listen.
const TinyproxyPort = 8888

// StartTinyproxy runs tinyproxy, an HTTP proxy that serves CONNECT to any
// port, in the server namespace at at, and returns once it accepts
// connections from the daemon namespace.
func (tp *Topology) StartTinyproxy(t testing.TB, at netip.AddrPort) *Process {
	t.Helper()
	RequireCommand(t, "tinyproxy", "tinyproxy")
	conf := filepath.Join(t.TempDir(), "tinyproxy.conf")
	// No ConnectPort line: CONNECT to every port is allowed.
	text := fmt.Sprintf(`Port %d
Listen %s
Timeout 600
MaxClients 100
Allow 0.0.0.0/0
Allow ::/0
LogLevel Info
`, at.Port(), at.Addr())
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	p := tp.Server.Start(t, "tinyproxy", "-d", "-c", conf)
	tp.waitListening(t, p, at)
	return p
}

// StartDanteUDP runs danted in the server namespace at at with CONNECT,
// BIND and UDP ASSOCIATE allowed for every client and destination, and
// returns once it accepts connections from the daemon namespace. Dante also
// answers SOCKS4 (not 4a) on the same port. Unlike StartDante, which
// allows CONNECT only, this one relays UDP.
func (tp *Topology) StartDanteUDP(t testing.TB, at netip.AddrPort) *Process {
	t.Helper()
	RequireCommand(t, "danted", "dante-server")
	dir := t.TempDir()
	conf := filepath.Join(dir, "danted.conf")
	text := fmt.Sprintf(`logoutput: stderr
internal: %s port = %d
external: %s
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 0/0 to: 0/0
 log: connect error }
socks pass { from: 0/0 to: 0/0
 command: bind connect udpassociate
 protocol: tcp udp
 log: connect error }
socks pass { from: 0/0 to: 0/0
 command: bindreply udpreply
 log: connect error }
`, at.Addr(), at.Port(), ServerLink)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	p := tp.Server.Start(t, "danted", "-f", conf, "-N", "1", "-p", filepath.Join(dir, "danted.pid"))
	tp.waitListening(t, p, at)
	return p
}

// StartDnsmasq runs dnsmasq in the server namespace on listen port 53,
// answering only for the names in records (and their subdomains) with a
// TTL of 300 s, forwarding nothing and reading neither /etc/hosts nor
// /etc/resolv.conf. It logs every query to its log. It returns once a query
// from inside the server namespace is answered.
func (tp *Topology) StartDnsmasq(t testing.TB, listen netip.Addr, records map[string]netip.Addr) *Process {
	t.Helper()
	RequireCommand(t, "dnsmasq", "dnsmasq-base")
	args := []string{"dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
		"--listen-address=" + listen.String(), "--bind-interfaces", "--port=53", "--pid-file=",
		"--local-ttl=300", "--log-queries", "--log-facility=-", "--user=root"}
	names := make([]string, 0, len(records))
	for name := range records {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		args = append(args, fmt.Sprintf("--address=/%s/%s", name, records[name]))
	}
	p := tp.Server.Start(t, args...)

	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	server := netip.AddrPortFrom(listen, 53)
	err := Poll(ctx, 20*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("%s exited: %v", p, p.err)
		default:
		}
		qctx, qcancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer qcancel()
		_, err := tp.Server.Query(qctx, server, "probe.invalid", dns.TypeA, false)
		return err == nil, nil
	})
	if err != nil {
		t.Fatalf("dnsmasq on %s not answering in %s: %v\n%s", server, tp.Server, err, p.Log())
	}
	return p
}

// Query sends one query for name and qtype to server from n, over TCP or
// UDP, and returns the reply. It gives up when ctx ends (with no deadline,
// after 5 s).
func (n Netns) Query(ctx context.Context, server netip.AddrPort, name string, qtype uint16, tcp bool) (*dns.Msg, error) {
	network := "udp"
	if tcp {
		network = "tcp"
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
	}
	c, err := n.DialContext(ctx, network, server.String())
	if err != nil {
		return nil, err
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	c.SetDeadline(dl)
	co := &dns.Conn{Conn: c}
	q := new(dns.Msg)
	q.SetQuestion(dns.Fqdn(name), qtype)
	if err := co.WriteMsg(q); err != nil {
		return nil, fmt.Errorf("query %s: %w", name, err)
	}
	for {
		r, err := co.ReadMsg()
		if err != nil {
			return nil, fmt.Errorf("query %s: %w", name, err)
		}
		if r.Id == q.Id {
			return r, nil
		}
	}
}

// SetResolvConf makes `ip netns exec` give programs in n a resolv.conf
// naming servers: it writes /etc/netns/NAME/resolv.conf, which ip bind-mounts
// over /etc/resolv.conf for every program it starts from then on. t's
// cleanup removes the file, the directory, and /etc/netns if that is left
// empty.
func (n Netns) SetResolvConf(t testing.TB, servers ...netip.Addr) {
	t.Helper()
	dir := filepath.Join("/etc/netns", n.Name)
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("remove %s: %v", dir, err)
		}
		// Fails, as it should, while another namespace's directory is there.
		if err := os.Remove("/etc/netns"); err != nil && !errors.Is(err, os.ErrNotExist) && !errors.Is(err, syscall.ENOTEMPTY) {
			t.Errorf("remove /etc/netns: %v", err)
		}
	})
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	b.WriteString("options timeout:2 attempts:2\n")
	if err := os.WriteFile(filepath.Join(dir, "resolv.conf"), []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
}
