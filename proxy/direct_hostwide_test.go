package proxy

import (
	"context"
	"errors"
	"net"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Host-wide mode relies on every socket netstackd opens to the outside going
// through Direct's Control (which sets SO_MARK) and every name it looks up
// going through Direct's Resolver (whose own sockets are marked): these tests
// check that FromURL and Direct keep both on every path.

// controlCounter is a Control func that counts the sockets it sees.
type controlCounter struct{ n atomic.Int64 }

func (c *controlCounter) control(network, address string, rc syscall.RawConn) error {
	c.n.Add(1)
	return nil
}

// refusingResolver is a pure-Go resolver whose DNS sockets are never
// opened: its Dial records that it was asked, and fails.
func refusingResolver(asked *atomic.Int64) *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			asked.Add(1)
			return nil, errors.New("test resolver: no DNS here")
		},
	}
}

// TestHostWideFromURLKeepsDirect: for direct:// FromURL returns the forward
// Direct itself, so its Control reaches the flow's socket; for a proxy URL
// the forward Direct dials the proxy server.
func TestHostWideFromURLKeepsDirect(t *testing.T) {
	var cc controlCounter
	fwd := Direct{Control: cc.control}
	for _, raw := range []string{"direct://", "direct", "DIRECT"} {
		d, err := FromURL(raw, fwd)
		if err != nil {
			t.Fatalf("FromURL(%q): %v", raw, err)
		}
		got, ok := d.(Direct)
		if !ok || got.Control == nil {
			t.Fatalf("FromURL(%q) = %#v, want the forward Direct with its Control", raw, d)
		}
	}
	d, err := FromURL("direct://", nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := d.(Direct); !ok || got.Control != nil {
		t.Errorf("FromURL(direct://, nil) = %#v, want Direct{}", d)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serve(t, ln, func(net.Conn) {})
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	direct, _ := FromURL("direct://", fwd)
	c, err := direct.DialContext(ctx, "tcp", ln.Addr().String())
	if err != nil {
		t.Fatalf("dial direct: %v", err)
	}
	c.Close()
	if n := cc.n.Load(); n != 1 {
		t.Errorf("Control saw %d sockets for one direct dial, want 1", n)
	}

	// The proxy server's socket goes through the forward Direct too; the
	// listener closes at once, so the handshake fails, after the dial.
	for _, scheme := range []string{"socks5", "socks4", "http"} {
		before := cc.n.Load()
		d, err := FromURL(scheme+"://"+ln.Addr().String(), fwd)
		if err != nil {
			t.Fatalf("FromURL %s: %v", scheme, err)
		}
		if c, err := d.DialContext(ctx, "tcp", "192.0.2.1:80"); err == nil {
			c.Close()
			t.Errorf("%s dial through a server that closes at once succeeded", scheme)
		}
		if cc.n.Load() != before+1 {
			t.Errorf("%s: Control saw %d sockets for the server dial, want 1", scheme, cc.n.Load()-before)
		}
	}
}

// TestHostWideDirectResolver: names given to DialContext and to WriteTo of a
// ListenPacket conn are looked up with Direct.Resolver, whose sockets are
// then marked as well; net.DefaultResolver is not used.
func TestHostWideDirectResolver(t *testing.T) {
	var asked atomic.Int64
	var cc controlCounter
	d := Direct{Control: cc.control, Resolver: refusingResolver(&asked)}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()

	if c, err := d.DialContext(ctx, "tcp", "netstackd-test.example:80"); err == nil {
		c.Close()
		t.Fatal("dial to a name the resolver refuses succeeded")
	}
	if asked.Load() == 0 {
		t.Errorf("DialContext to a name did not ask Direct.Resolver")
	}

	asked.Store(0)
	pc, err := d.ListenPacket(ctx, "udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if cc.n.Load() == 0 {
		t.Errorf("ListenPacket did not pass its socket to Control")
	}
	if _, err := pc.WriteTo([]byte("x"), nameAddr("netstackd-test.example:9")); err == nil {
		t.Errorf("WriteTo a name the resolver refuses succeeded")
	}
	if asked.Load() == 0 {
		t.Errorf("WriteTo a name did not ask Direct.Resolver")
	}
}

// nameAddr is a net.Addr that holds "host:port" with a name.
type nameAddr string

func (a nameAddr) Network() string { return "udp" }
func (a nameAddr) String() string  { return string(a) }
