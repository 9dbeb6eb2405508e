package proxy

import (
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// TestDirectSocketConn: the conn Direct makes for an address is the socket
// the relay needs: it half-closes and keeps receiving, resets with linger 0,
// and reports errors as net's conn does (the cause inside, net.ErrClosed once
// closed, io.EOF bare).
func TestDirectSocketConn(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	dial := func(t *testing.T) (socket, net.Conn) {
		t.Helper()
		c, err := Direct{}.DialContext(t.Context(), "tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, ok := c.(*socketConn); !ok {
			t.Fatalf("an address literal was dialed as %T, not with Direct's own socket", c)
		}
		peer, err := ln.Accept()
		if err != nil {
			c.Close()
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close(); peer.Close() })
		return c.(socket), peer
	}

	t.Run("half-close", func(t *testing.T) {
		c, peer := dial(t)
		if err := c.CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := peer.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Fatalf("peer read %d, %v after CloseWrite, want EOF", n, err)
		}
		exchange(t, peer, c, "still open this way")
		if _, err := c.Write([]byte("x")); !errors.Is(err, syscall.EPIPE) {
			t.Errorf("write after CloseWrite: %v, want EPIPE", err)
		}
		peer.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, err := c.Read(make([]byte, 1)); n != 0 || err != io.EOF {
			t.Errorf("read after the peer closed: %d, %v, want a bare io.EOF", n, err)
		}
	})

	t.Run("reset", func(t *testing.T) {
		c, peer := dial(t)
		if err := c.SetLinger(0); err != nil {
			t.Fatalf("SetLinger: %v", err)
		}
		c.Close()
		peer.SetReadDeadline(time.Now().Add(5 * time.Second))
		if _, err := peer.Read(make([]byte, 1)); !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("peer read after linger-0 close: %v, want ECONNRESET", err)
		}
	})

	t.Run("reset by the peer", func(t *testing.T) {
		c, peer := dial(t)
		peer.(*net.TCPConn).SetLinger(0)
		peer.Close()
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, err := c.Read(make([]byte, 1))
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("read after the peer's reset: %v, want ECONNRESET", err)
		}
		if _, ok := errors.AsType[*net.OpError](err); !ok {
			t.Errorf("read error %#v, want a *net.OpError", err)
		}
	})

	t.Run("deadline", func(t *testing.T) {
		c, _ := dial(t)
		c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
		_, err := c.Read(make([]byte, 1))
		if ne, ok := errors.AsType[net.Error](err); !ok || !ne.Timeout() {
			t.Fatalf("read past the deadline: %v, want a net.Error timeout", err)
		}
	})

	t.Run("closed", func(t *testing.T) {
		c, _ := dial(t)
		c.Close()
		for name, err := range map[string]error{
			"read":       func() error { _, err := c.Read(make([]byte, 1)); return err }(),
			"write":      func() error { _, err := c.Write([]byte("x")); return err }(),
			"close":      c.Close(),
			"CloseWrite": c.CloseWrite(),
			"SetLinger":  c.SetLinger(0),
		} {
			if !errors.Is(err, net.ErrClosed) {
				t.Errorf("%s after Close: %v, want net.ErrClosed", name, err)
			}
		}
	})
}
