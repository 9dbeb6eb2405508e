package proxy

import (
	"net"
	"sync"
	"syscall"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// socket is what every dialer here hands back, and the relay needs: the
// kernel's socket itself, which can half-close, reset and give its
// descriptor.
type socket interface {
	net.Conn
	syscall.Conn
	CloseWrite() error
	SetLinger(sec int) error
}

// listen listens on network and address (a loopback one) until the test
// ends.
func listen(t *testing.T, network, address string) net.Listener {
	t.Helper()
	ln, err := net.Listen(network, address)
	if err != nil {
		t.Fatalf("listen %s %s: %v", network, address, err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

// serve runs handle on its own goroutine for every conn ln accepts. When the
// test ends it closes ln and every conn still open, and waits for the
// handlers, so that none outlives the test.
func serve(t testing.TB, ln net.Listener, handle func(net.Conn)) {
	t.Helper()
	var (
		wg     sync.WaitGroup
		mu     sync.Mutex
		conns  = make(map[net.Conn]struct{})
		closed bool
	)
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			if closed {
				mu.Unlock()
				c.Close()
				return
			}
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				defer func() {
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
					c.Close()
				}()
				handle(c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		closed = true
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}

// echo copies what it reads back until EOF, then half-closes, so a client
// that half-closes first still gets every byte back.
func echo(c net.Conn) {
	buf := make([]byte, 4096)
	for {
		n, err := c.Read(buf)
		if n > 0 {
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
		if err != nil {
			break
		}
	}
	c.(socket).CloseWrite()
}

// startEcho runs an echo server on 127.0.0.1 and returns its port.
func startEcho(t *testing.T) int {
	t.Helper()
	ln := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, ln, echo)
	return ln.Addr().(*net.TCPAddr).Port
}

// hasIPv6Loopback reports whether ::1 is configured, by listening on it.
func hasIPv6Loopback() bool {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		return false
	}
	ln.Close()
	return true
}

// freePort returns a loopback port that nothing listened on a moment ago,
// for a server we cannot hand a listener to, or a target that refuses.
func freePort(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}
