package tcprelay

import (
	"log/slog"
	"net"
	"syscall"
	"testing"
	"time"
)

type chanWaiter chan struct{}

func (c chanWaiter) pollReady() {
	select {
	case c <- struct{}{}:
	default:
	}
}

func loopbackPair(t *testing.T) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err = ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func rawConn(t *testing.T, c syscall.Conn) syscall.RawConn {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	return rc
}

// TestUpstreamPoller: an armed socket reports once when data comes (and
// at once when data is already there), not again until re-armed, and
// disarm takes it out of the set.
func TestUpstreamPoller(t *testing.T) {
	p, err := newUpstreamPoller(slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	a, b := loopbackPair(t)
	w := make(chanWaiter, 1)
	id := p.register(w)
	defer p.unregister(id)
	rc := rawConn(t, a)

	expect := func(what string, want bool) {
		t.Helper()
		wait := 50 * time.Millisecond
		if want {
			wait = 5 * time.Second
		}
		select {
		case <-w:
			if !want {
				t.Fatalf("%s: reported, want silence", what)
			}
		case <-time.After(wait):
			if want {
				t.Fatalf("%s: not reported", what)
			}
		}
	}
	if err := p.arm(rc, id, true); err != nil {
		t.Fatalf("arm: %v", err)
	}
	expect("armed, nothing sent", false)
	b.Write([]byte("x"))
	expect("data", true)
	b.Write([]byte("y"))
	expect("one-shot: more data before re-arming", false)
	if err := p.arm(rc, id, false); err != nil {
		t.Fatalf("re-arm: %v", err)
	}
	expect("re-armed with data already there", true)
	a.Read(make([]byte, 10))
	if err := p.arm(rc, id, false); err != nil {
		t.Fatalf("re-arm: %v", err)
	}
	p.disarm(rc)
	b.Write([]byte("z"))
	expect("disarmed", false)
	// A closed socket is gone from the set: re-arming another socket on
	// the same registration works.
	c, d := loopbackPair(t)
	if err := p.arm(rawConn(t, c), id, true); err != nil {
		t.Fatalf("arm a second socket: %v", err)
	}
	d.CloseWrite()
	expect("FIN", true)
}
