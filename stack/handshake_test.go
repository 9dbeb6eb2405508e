package stack

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// gatedDialer holds every dial until the test opens the gate (or the dial's
// context ends), so a test can act while an upstream is still being
// reached. It reports each dial that has begun on entered.
type gatedDialer struct {
	redirectDialer
	entered chan string
	gate    chan struct{}
}

func newGatedDialer() *gatedDialer {
	return &gatedDialer{entered: make(chan string, 16), gate: make(chan struct{})}
}

func (d *gatedDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.entered <- address
	select {
	case <-d.gate:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return d.redirectDialer.DialContext(ctx, network, address)
}

func (d *gatedDialer) waitEntered(t *testing.T) {
	t.Helper()
	select {
	case <-d.entered:
	case <-time.After(5 * time.Second):
		t.Fatal("no upstream dial began")
	}
}

type dialOutcome struct {
	c   *clientConn
	err error
}

func dialAsync(t *testing.T, p *peer, dst netip.AddrPort) <-chan dialOutcome {
	ch := make(chan dialOutcome, 1)
	go func() {
		c, err := p.dial(t, dst)
		ch <- dialOutcome{c, err}
	}()
	return ch
}

// With AcceptFirst the client's connect returns while the upstream is still
// being dialed; what it sends meanwhile, FIN included, reaches the upstream
// once the dial completes, and the reply comes back.
func TestAcceptFirstConnectsBeforeUpstream(t *testing.T) {
	d := newGatedDialer()
	p := newPeer(t, Config{AcceptFirst: true, Dialer: d})
	port := listen(t, echo)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)

	res := dialAsync(t, p, dst)
	d.waitEntered(t)
	var c *clientConn
	select {
	case r := <-res:
		if r.err != nil {
			t.Fatalf("dial: %v", r.err)
		}
		c = r.c
	case <-time.After(5 * time.Second):
		t.Fatal("connect did not return while the upstream dial was held")
	}
	defer c.Close()
	want := bytes.Repeat([]byte("early bytes "), 1000)
	if _, err := c.Write(want); err != nil {
		t.Fatalf("write before the upstream is reached: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	close(d.gate)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("echo: got %d bytes, want the %d sent before the upstream was reached", len(got), len(want))
	}
}

// Without AcceptFirst the SYN is answered only once the upstream is
// reached: while the dial is held, connect does not return.
func TestDialFirstWaitsForUpstream(t *testing.T) {
	d := newGatedDialer()
	p := newPeer(t, Config{Dialer: d})
	port := listen(t, echo)
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)

	res := dialAsync(t, p, dst)
	d.waitEntered(t)
	select {
	case r := <-res:
		if r.c != nil {
			r.c.Close()
		}
		t.Fatalf("connect returned (err %v) while the upstream dial was held", r.err)
	case <-time.After(300 * time.Millisecond):
	}
	close(d.gate)
	r := <-res
	if r.err != nil {
		t.Fatalf("dial after the upstream was reached: %v", r.err)
	}
	r.c.Close()
}

// With AcceptFirst a refused upstream cannot refuse the SYN any more: the
// client's connection opens and is then reset.
func TestAcceptFirstRefusedUpstreamResetsClient(t *testing.T) {
	p := newPeer(t, Config{AcceptFirst: true})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close() // nothing listens there now

	// gonet and goError report gVisor's reset by its text.
	isReset := func(err error) bool {
		return err != nil && strings.Contains(err.Error(), (&tcpip.ErrConnectionReset{}).String())
	}
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if isReset(err) {
		return // the reset came before the client saw its handshake complete
	}
	if err != nil {
		t.Fatalf("dial: %v, want the handshake completed (or reset) before the upstream refuses", err)
	}
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, err = io.ReadAll(c)
	if !isReset(err) {
		t.Fatalf("read ended with %v, want a reset", err)
	}
}

// Close while an AcceptFirst flow's upstream is still being dialed ends the
// dial and resets the client, and returns without waiting for the dial
// timeout.
func TestAcceptFirstCloseDuringDial(t *testing.T) {
	d := newGatedDialer()
	p := newPeer(t, Config{AcceptFirst: true, Dialer: d, DialTimeout: time.Minute})
	port := listen(t, echo)
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	d.waitEntered(t)

	closed := make(chan struct{})
	go func() {
		p.st.Close()
		close(closed)
	}()
	select {
	case <-closed:
	case <-time.After(5 * time.Second):
		t.Fatal("Close waited for a held dial")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadAll(c); err == nil {
		t.Fatal("read ended with EOF, want a reset")
	}
}

// Both handshake orders carry a bulk echo intact.
func TestAcceptFirstEcho(t *testing.T) {
	p := newPeer(t, Config{AcceptFirst: true})
	port := listen(t, echo)
	to := netip.AddrPortFrom(netip.MustParseAddr("2001:db8::2"), port)
	if err := echoFlow(t, p, to, 7, 2<<20); err != nil {
		t.Fatal(err)
	}
}
