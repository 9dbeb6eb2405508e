package proxy

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// groupInterval is the health-check interval of the tests' groups: short,
// so that a return is seen quickly, and the bound the tests hold it to.
const groupInterval = 200 * time.Millisecond

// restartable is a real microsocks on a fixed loopback port that a test
// stops and starts again, as an operator's proxy dies and comes back.
type restartable struct {
	t    *testing.T
	path string
	port int
	addr string
	d    *daemon
}

func newRestartable(t *testing.T) *restartable {
	path := lookBinary(t, "microsocks", "/usr/bin/microsocks", "microsocks")
	port := freePort(t)
	r := &restartable{t: t, path: path, port: port, addr: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
	r.start()
	t.Cleanup(func() { r.stop() })
	return r
}

func (r *restartable) start() {
	r.t.Helper()
	cmd := exec.Command(r.path, "-i", "127.0.0.1", "-p", strconv.Itoa(r.port))
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		r.t.Fatalf("start microsocks: %v", err)
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	r.d = &daemon{addr: r.addr, stopFn: func() { stopGroup(cmd.Process.Pid, exited) }}
	if !waitListening(r.addr, exited, 5*time.Second) {
		r.d.stop()
		r.t.Fatalf("microsocks did not listen on %s", r.addr)
	}
}

func (r *restartable) stop() {
	if r.d != nil {
		r.d.stop()
	}
}

// echoServer is a loopback TCP server that echoes, the flows' destination.
func echoServer(t *testing.T) string {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, ln, func(c net.Conn) { io.Copy(c, c) })
	return ln.Addr().String()
}

// dialVia dials dst through g and checks the conn carries bytes; it
// returns the member's name.
func dialVia(t *testing.T, g *Group, dst string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, name, err := g.DialUpstream(ctx, "tcp", dst)
	if err != nil {
		return name, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatalf("write via %s: %v", name, err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo via %s: %q %v", name, buf, err)
	}
	return name, nil
}

type downs struct {
	mu    sync.Mutex
	names []string
}

func (d *downs) add(name string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.names = append(d.names, name)
}

func (d *downs) list() []string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]string(nil), d.names...)
}

func startGroup(t *testing.T, onDown func(string), members ...Upstream) *Group {
	t.Helper()
	return startGroupLogs(t, onDown, nil, members...)
}

func startGroupLogs(t *testing.T, onDown func(string), logs io.Writer, members ...Upstream) *Group {
	t.Helper()
	cfg := GroupConfig{Members: members, Interval: groupInterval, ProbeTimeout: time.Second, OnDown: onDown}
	if logs != nil {
		cfg.Logger = slog.New(slog.NewTextHandler(logs, nil))
	}
	g, err := NewGroup(cfg)
	if err != nil {
		t.Fatal(err)
	}
	g.Start()
	t.Cleanup(g.Close)
	return g
}

// waitState polls until member name is in state, within bound.
func waitState(t *testing.T, g *Group, name, state string, bound time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < bound {
		for _, s := range g.States() {
			if s.Name == name && s.State == state {
				return time.Since(start)
			}
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s not %s within %s: %+v", name, state, bound, g.States())
	return 0
}

// TestGroupFailover: with two real microsocks, dials go to the first; once
// it is killed the next dial goes to the second at once; when it returns,
// dials go back to it within the health-check interval (plus a probe).
// Each change of state is logged once: answering at info, not at warn.
func TestGroupFailover(t *testing.T) {
	a, b := newRestartable(t), newRestartable(t)
	dst := echoServer(t)
	var down downs
	var logs syncBuffer
	g := startGroupLogs(t, down.add, &logs, Upstream{Name: "a", Dialer: SOCKS5{Server: a.addr}}, Upstream{Name: "b", Dialer: SOCKS5{Server: b.addr}})
	waitState(t, g, "a", "up", 5*time.Second)
	if ok, why := g.Usable(); !ok {
		t.Fatalf("Usable: %s", why)
	}
	if name, err := dialVia(t, g, dst); err != nil || name != "a" {
		t.Fatalf("dial: via %q, %v; want a", name, err)
	}

	a.stop()
	start := time.Now()
	name, err := dialVia(t, g, dst)
	if err != nil || name != "b" {
		t.Fatalf("dial with a dead: via %q, %v; want b", name, err)
	}
	t.Logf("failover dial took %s", time.Since(start))
	if got := down.list(); len(got) != 1 || got[0] != "a" {
		t.Errorf("OnDown calls %v, want [a]", got)
	}

	a.start()
	took := waitState(t, g, "a", "up", groupInterval+2*time.Second)
	t.Logf("a seen up again %s after its restart (interval %s)", took, groupInterval)
	if name, err := dialVia(t, g, dst); err != nil || name != "a" {
		t.Fatalf("dial after a returned: via %q, %v; want a", name, err)
	}
	time.Sleep(3 * groupInterval) // more probes that agree: no more lines
	out := logs.String()
	if up, down := strings.Count(out, `msg="proxy answers" upstream=a `), strings.Count(out, "level=WARN msg=\"proxy does not answer"); up != 2 || down != 1 {
		t.Errorf("%d answering and %d not-answering lines for a, want 2 and 1 (one per change):\n%s", up, down, out)
	}
}

// TestGroupAllDown: with every member dead, a dial fails at once with
// ErrNoUpstream (no dial timeout is waited for), and Usable names each
// member with its reason.
func TestGroupAllDown(t *testing.T) {
	a, b := newRestartable(t), newRestartable(t)
	g := startGroup(t, nil, Upstream{Name: "a", Dialer: SOCKS5{Server: a.addr}}, Upstream{Name: "b", Dialer: SOCKS5{Server: b.addr}})
	waitState(t, g, "a", "up", 5*time.Second)
	waitState(t, g, "b", "up", 5*time.Second)
	a.stop()
	b.stop()
	dst := echoServer(t)
	for i := range 2 { // the first tries both, the second neither
		start := time.Now()
		_, _, err := g.DialUpstream(t.Context(), "tcp", dst)
		took := time.Since(start)
		if !errors.Is(err, ErrNoUpstream) || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("dial %d: %v, want ErrNoUpstream, and ECONNREFUSED from the members", i, err)
		}
		if took > 500*time.Millisecond {
			t.Errorf("dial %d took %s: not at once", i, took)
		}
		t.Logf("dial %d failed after %s: %v", i, took, err)
	}
	ok, why := g.Usable()
	if ok {
		t.Fatal("Usable with every member down")
	}
	for _, want := range []string{"a (", "b (", "down", "refused"} {
		if !strings.Contains(why, want) {
			t.Errorf("Usable reason %q lacks %q", why, want)
		}
	}
}

// TestGroupDestinationErrorKeepsMember: the proxy refusing a destination
// says nothing about the proxy: the member stays up and the dial is not
// retried through the next one.
func TestGroupDestinationErrorKeepsMember(t *testing.T) {
	a, b := newRestartable(t), newRestartable(t)
	g := startGroup(t, nil, Upstream{Name: "a", Dialer: SOCKS5{Server: a.addr}}, Upstream{Name: "b", Dialer: SOCKS5{Server: b.addr}})
	waitState(t, g, "a", "up", 5*time.Second)
	closed := "127.0.0.1:" + strconv.Itoa(freePort(t))
	_, name, err := g.DialUpstream(t.Context(), "tcp", closed)
	if err == nil || name != "a" || errors.Is(err, ErrNoUpstream) {
		t.Fatalf("dial to a closed port: via %q, %v; want a's refusal", name, err)
	}
	if s := g.States()[0]; s.State != "up" || s.DialErrors != 1 {
		t.Errorf("a after a refused destination: %+v, want up with one dial error", s)
	}
}

// TestGroupUDPMembers: UDP goes to the first member that carries it;
// SOCKS4 does not.
func TestGroupUDPMembers(t *testing.T) {
	g := startGroup(t, nil, Upstream{Name: "s4", Dialer: SOCKS4{Server: "127.0.0.1:1"}}, Upstream{Name: "d", Dialer: Direct{}})
	pc, name, err := g.ListenUpstream(t.Context(), "udp", "127.0.0.1:0")
	if err != nil || name != "d" {
		t.Fatalf("ListenUpstream: via %q, %v; want d", name, err)
	}
	pc.Close()
	g2 := startGroup(t, nil, Upstream{Name: "s4", Dialer: SOCKS4{Server: "127.0.0.1:1"}})
	if _, _, err := g2.ListenUpstream(t.Context(), "udp", ""); !errors.Is(err, ErrNoUpstream) || !errors.Is(err, errors.ErrUnsupported) {
		t.Errorf("ListenUpstream with no UDP member: %v", err)
	}
}

// TestNewGroupNames: names must be given and unique.
func TestNewGroupNames(t *testing.T) {
	for _, ms := range [][]Upstream{nil, {{Name: "", Dialer: Direct{}}}, {{Name: "a", Dialer: Direct{}}, {Name: "a", Dialer: Direct{}}}} {
		if _, err := NewGroup(GroupConfig{Members: ms}); err == nil {
			t.Errorf("NewGroup(%v): no error", ms)
		}
	}
}

// TestGroupBackoff: a dead member behind one that is up is checked with
// backoff (Interval doubling to MaxBackoff); once the member before it goes
// down it is checked at once, and then every Interval.
func TestGroupBackoff(t *testing.T) {
	alive := listen(t, "tcp4", "127.0.0.1:0") // HTTP CONNECT's probe is a connect
	serve(t, alive, func(c net.Conn) {})
	// b accepts and hangs up: every probe of it fails, and is counted.
	var probes atomic.Int32
	hangup := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, hangup, func(c net.Conn) { probes.Add(1) })
	const interval = 50 * time.Millisecond
	g, err := NewGroup(GroupConfig{Members: []Upstream{
		{Name: "a", Dialer: HTTPConnect{Server: alive.Addr().String()}},
		{Name: "b", Dialer: SOCKS5{Server: hangup.Addr().String()}},
	}, Interval: interval, MaxBackoff: 8 * interval})
	if err != nil {
		t.Fatal(err)
	}
	g.Start()
	t.Cleanup(g.Close)
	waitState(t, g, "a", "up", 5*time.Second)
	waitState(t, g, "b", "down", 5*time.Second)
	// In 30 intervals: probes at 0, 2, 6, 14, 22, 30 intervals with
	// backoff; 30 without.
	time.Sleep(30 * interval)
	if n := probes.Load(); n > 8 {
		t.Errorf("b probed %d times in %v with a up: no backoff", n, 30*interval)
	}
	alive.Close()
	waitState(t, g, "a", "down", 5*time.Second)
	before := probes.Load()
	time.Sleep(10 * interval)
	if n := probes.Load() - before; n < 6 {
		t.Errorf("b probed %d times in %v once a was down, want about 10: backoff kept though it is needed now", n, 10*interval)
	}
}

// TestGroupConnectTimeout: a proxy server that does not accept within the
// dial's deadline is marked down; a dial the caller cancels marks nothing.
func TestGroupConnectTimeout(t *testing.T) {
	server := fullBacklog(t)
	// Not started: no check changes a's state behind the test's back.
	g, err := NewGroup(GroupConfig{Members: []Upstream{
		{Name: "a", Dialer: SOCKS5{Server: server}},
		{Name: "b", Dialer: Direct{}},
	}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if _, _, err := g.DialUpstream(ctx, "tcp", "127.0.0.1:1"); err == nil {
		t.Fatal("dial with a cancelled context succeeded")
	}
	if s := g.States()[0]; s.State != "unknown" {
		t.Fatalf("a after a cancelled dial: %+v, want still unknown", s)
	}
	ctx, cancel = context.WithTimeout(t.Context(), 200*time.Millisecond)
	defer cancel()
	if _, name, err := g.DialUpstream(ctx, "tcp", "127.0.0.1:1"); err == nil || name != "a" {
		t.Fatalf("dial through a server that does not accept: via %q, %v", name, err)
	}
	if s := g.States()[0]; s.State != "down" {
		t.Fatalf("a after a connect that timed out: %+v, want down", s)
	}
}

// fullBacklog is a loopback listener (backlog 0) whose accept queue the
// test fills and nobody empties: the kernel drops further SYNs, so a
// connect to it hangs, as to a server behind a black hole.
func fullBacklog(t *testing.T) string {
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, err := syscall.Getsockname(fd)
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(sa.(*syscall.SockaddrInet4).Port))
	for range 16 {
		c, err := net.DialTimeout("tcp4", addr, 200*time.Millisecond)
		if err != nil {
			return addr // this one hung: the queue is full
		}
		t.Cleanup(func() { c.Close() })
	}
	t.Fatalf("the accept queue of %s never filled", addr)
	return ""
}

// TestGroupOnly: a member on its own (a rule's proxy:NAME) is dialed even
// when an earlier member is up, is not failed over from: with it dead the
// dial fails at once, and the group's other members are not tried.
func TestGroupOnly(t *testing.T) {
	a, b := newRestartable(t), newRestartable(t)
	dst := echoServer(t)
	g := startGroup(t, nil, Upstream{Name: "a", Dialer: SOCKS5{Server: a.addr}}, Upstream{Name: "b", Dialer: SOCKS5{Server: b.addr}})
	waitState(t, g, "a", "up", 5*time.Second)
	waitState(t, g, "b", "up", 5*time.Second)
	if _, ok := g.Only("c"); ok {
		t.Fatal("Only found a member that does not exist")
	}
	onlyB, ok := g.Only("b")
	if !ok {
		t.Fatal("no member b")
	}
	c, name, err := onlyB.DialUpstream(t.Context(), "tcp", dst)
	if err != nil || name != "b" {
		t.Fatalf("dial through b alone: via %q, %v", name, err)
	}
	c.Close()
	b.stop()
	for range 2 {
		start := time.Now()
		_, name, err = onlyB.DialUpstream(t.Context(), "tcp", dst)
		if err == nil || name == "a" {
			t.Fatalf("dial through a dead b alone: via %q, %v; want a failure, not a", name, err)
		}
		if took := time.Since(start); took > 500*time.Millisecond {
			t.Errorf("failure took %s: not at once", took)
		}
	}
	if _, _, err := onlyB.DialUpstream(t.Context(), "tcp", dst); !errors.Is(err, ErrNoUpstream) {
		t.Errorf("dial with b known down: %v, want ErrNoUpstream", err)
	}
}
