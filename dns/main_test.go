package dns

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// dnsmasq is a real DNS server on 127.0.0.1, run for one test.
type dnsmasq struct {
	addr string // host:port, UDP and TCP
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has exited
	out  *syncBuffer
}

// syncBuffer collects the output of a process for failure messages.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// startDnsmasq runs dnsmasq with args on a free loopback port, waits until
// it answers "ready.test" over TCP, and stops it in Cleanup. It skips the
// test when dnsmasq is not installed.
func startDnsmasq(t *testing.T, args ...string) *dnsmasq {
	t.Helper()
	bin, err := exec.LookPath("dnsmasq")
	if err != nil {
		if bin, err = exec.LookPath("/usr/sbin/dnsmasq"); err != nil {
			t.Skip("needs dnsmasq (Debian package dnsmasq-base) as a real DNS server")
		}
	}
	// The port is found free and then given to dnsmasq, which another
	// process may take in between: retry a few times.
	var last string
	for range 5 {
		port := freePort(t)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		base := []string{
			"--no-daemon", // foreground, no setuid, TCP served in-process
			"--conf-file=/dev/null", "--no-resolv", "--no-hosts", "--pid-file=",
			"--log-facility=-", "--listen-address=127.0.0.1", "--bind-interfaces",
			"--port=" + strconv.Itoa(port), "--host-record=ready.test,192.0.2.1",
		}
		d := &dnsmasq{addr: addr, done: make(chan struct{}), out: new(syncBuffer)}
		d.cmd = exec.Command(bin, append(base, args...)...)
		d.cmd.Stdout = d.out
		d.cmd.Stderr = d.out
		if err := d.cmd.Start(); err != nil {
			t.Fatalf("start dnsmasq: %v", err)
		}
		go func() { d.cmd.Wait(); close(d.done) }()
		if d.waitReady(t) {
			t.Cleanup(d.stop)
			return d
		}
		d.stop()
		last = d.out.String()
	}
	t.Fatalf("dnsmasq did not start; its output:\n%s", last)
	return nil
}

// waitReady polls dnsmasq with a query until it answers, it exits, or 10s
// pass.
func (d *dnsmasq) waitReady(t *testing.T) bool {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c := &dns.Client{Net: "tcp", Timeout: 500 * time.Millisecond}
	m := new(dns.Msg).SetQuestion("ready.test.", dns.TypeA)
	for {
		if _, _, err := c.ExchangeContext(ctx, m, d.addr); err == nil {
			return true
		}
		select {
		case <-d.done:
			return false
		case <-ctx.Done():
			return false
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// stop kills dnsmasq by its PID and waits for it; it may be called twice.
func (d *dnsmasq) stop() {
	select {
	case <-d.done:
		return
	default:
	}
	d.cmd.Process.Kill()
	<-d.done
}

// freePort returns a loopback port that was free for both TCP and UDP.
func freePort(t *testing.T) int {
	t.Helper()
	for range 20 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		l.Close()
		if err == nil {
			u.Close()
			return port
		}
	}
	t.Fatal("no free loopback port for TCP and UDP")
	return 0
}

// closedAddr returns a loopback address nothing listens on: dialing it is
// refused at once.
func closedAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return addr
}

// newServer builds a Server and closes it in Cleanup.
func newServer(t testing.TB, cfg Config) *Server {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// query packs a query for name and qtype with ID id, with an OPT record
// of UDP size edns when edns > 0.
func query(t testing.TB, id uint16, name string, qtype uint16, edns int) []byte {
	t.Helper()
	m := new(dns.Msg).SetQuestion(dns.Fqdn(name), qtype)
	m.Id = id
	if edns > 0 {
		m.SetEdns0(uint16(edns), false)
	}
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// parse unpacks a reply and checks the properties every reply has: it is a
// response, it answers query's ID and echoes its question exactly.
func parse(t testing.TB, query, reply []byte) *dns.Msg {
	t.Helper()
	if reply == nil {
		t.Fatal("no reply")
	}
	m := new(dns.Msg)
	if err := m.Unpack(reply); err != nil {
		t.Fatalf("reply does not parse: %v", err)
	}
	q := new(dns.Msg)
	if err := q.Unpack(query); err != nil {
		t.Fatal(err)
	}
	if !m.Response || m.Id != q.Id {
		t.Fatalf("reply: response %v, id %#x; want a response with id %#x", m.Response, m.Id, q.Id)
	}
	if len(m.Question) != 1 || m.Question[0] != q.Question[0] {
		t.Fatalf("reply question %v; want %v", m.Question, q.Question)
	}
	return m
}

// clock is a settable time source for the cache.
type clock struct {
	mu  sync.Mutex
	now time.Time
}

func newClock() *clock { return &clock{now: time.Unix(1_700_000_000, 0)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

// mapResolver is a Resolver over a map of absolute names, for the
// DirectResolver seam: it records the lookups it gets.
type mapResolver struct {
	mu      sync.Mutex
	addrs   map[string][]netip.Addr
	fail    error
	lookups []string
}

func (r *mapResolver) LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lookups = append(r.lookups, network+" "+host)
	if r.fail != nil {
		return nil, r.fail
	}
	var out []netip.Addr
	for _, a := range r.addrs[host] {
		if a.Is4() == (network == "ip4") {
			out = append(out, a)
		}
	}
	if len(out) == 0 {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	return out, nil
}

// countingDialer is a net.Dialer that records what it dials.
type countingDialer struct {
	mu    sync.Mutex
	dials []string
}

func (d *countingDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.mu.Lock()
	d.dials = append(d.dials, network+" "+address)
	d.mu.Unlock()
	var nd net.Dialer
	return nd.DialContext(ctx, network, address)
}

func (d *countingDialer) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.dials)
}

// logRecorder is a slog handler that keeps the records it gets.
type logRecorder struct {
	mu      sync.Mutex
	records []slog.Record
}

func (h *logRecorder) Enabled(context.Context, slog.Level) bool { return true }
func (h *logRecorder) Handle(_ context.Context, r slog.Record) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.records = append(h.records, r)
	return nil
}
func (h *logRecorder) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *logRecorder) WithGroup(string) slog.Handler      { return h }

func (h *logRecorder) count(level slog.Level) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, r := range h.records {
		if r.Level == level {
			n++
		}
	}
	return n
}

// debugLogger logs everything to nowhere, so that the debug paths run.
func debugLogger() *slog.Logger {
	return slog.New(slog.NewTextHandler(io.Discard, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

var errBroken = errors.New("resolver broken")
