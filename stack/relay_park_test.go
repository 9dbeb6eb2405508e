package stack

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

// waitGoroutinesPerFlow waits until the goroutines above base come to at
// most want per flow, and returns the last count seen.
func waitGoroutinesPerFlow(base, flows int, want float64) float64 {
	deadline := time.Now().Add(5 * time.Second)
	perFlow := 0.0
	for time.Now().Before(deadline) {
		perFlow = float64(runtime.NumGoroutine()-base) / float64(flows)
		if perFlow <= want {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return perFlow
}

func dialMany(t *testing.T, p *peer, port uint16, n int) []*clientConn {
	t.Helper()
	var conns []*clientConn
	for range n {
		c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		t.Cleanup(func() { c.Close() })
		conns = append(conns, c)
	}
	return conns
}

// TestIdleFlowsPark: an idle flow holds no goroutine of ours in either
// direction, and a parked flow still carries data both ways at once.
func TestIdleFlowsPark(t *testing.T) {
	p := newPeer(t, Config{parkAfter: 50 * time.Millisecond})
	port := listen(t, echo)
	const n = 40
	base := runtime.NumGoroutine()
	conns := dialMany(t, p, port, n)
	// The echo server holds one goroutine per connection: with both
	// directions parked that is all there is (3 per flow without parking,
	// 2 with only the client side parked).
	if perFlow := waitGoroutinesPerFlow(base, n, 1.2); perFlow > 1.2 {
		t.Errorf("%.2f goroutines per idle flow (with the echo server's), want about 1", perFlow)
	}
	for round := range 2 {
		for i, c := range conns {
			msg := []byte(fmt.Sprintf("round %d flow %d", round, i))
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("write: %v", err)
			}
			got := make([]byte, len(msg))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
				t.Fatalf("echo after idle: %q, %v", got, err)
			}
		}
		// And they park again.
		if perFlow := waitGoroutinesPerFlow(base, n, 1.2); perFlow > 1.2 {
			t.Errorf("round %d: %.2f goroutines per idle flow after traffic, want about 1", round, perFlow)
		}
	}
}

// TestParkedUpstreamSpeaks: a server that speaks after a silence wakes the
// parked upstream direction, and its FIN reaches the client.
func TestParkedUpstreamSpeaks(t *testing.T) {
	p := newPeer(t, Config{parkAfter: 30 * time.Millisecond})
	speak := make(chan struct{})
	port := listen(t, func(c *net.TCPConn) {
		<-speak
		fmt.Fprintf(c, "hello from %s", c.LocalAddr())
		c.CloseWrite()
		io.Copy(io.Discard, c)
	})
	const n = 20
	base := runtime.NumGoroutine()
	conns := dialMany(t, p, port, n)
	if perFlow := waitGoroutinesPerFlow(base, n, 1.2); perFlow > 1.2 {
		t.Fatalf("%.2f goroutines per idle flow, want about 1", perFlow)
	}
	close(speak)
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		if err != nil || !bytes.HasPrefix(got, []byte("hello from")) {
			t.Fatalf("read from a parked flow: %q, %v", got, err)
		}
	}
}

// TestParkedHalfCloseBounded: after the client's FIN, a parked upstream
// that never answers is given HalfCloseIdle, then the flow is reset both
// ways.
func TestParkedHalfCloseBounded(t *testing.T) {
	const idle = 400 * time.Millisecond
	p := newPeer(t, Config{parkAfter: 50 * time.Millisecond, HalfCloseIdle: idle})
	var upstreamErr error
	var wg sync.WaitGroup
	wg.Add(1)
	reset := make(chan struct{})
	port := listen(t, func(c *net.TCPConn) {
		defer wg.Done()
		// Take the FIN, then stay silent until the client has seen the
		// reset; then writes must fail.
		io.ReadAll(c)
		<-reset
		// Our reset of this side follows the client's by a moment.
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); {
			if _, err := c.Write([]byte("late")); err != nil {
				upstreamErr = err
				return
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
	c := dialMany(t, p, port, 1)[0]
	time.Sleep(100 * time.Millisecond) // let both directions park first
	start := time.Now()
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := c.Read(make([]byte, 1))
	took := time.Since(start)
	if err == nil || errors.Is(err, io.EOF) || took > 5*time.Second {
		t.Fatalf("client read after %v: %v, want a reset after about %v", took, err, idle)
	}
	if took < idle {
		t.Errorf("flow reset after %v, before its bound of %v", took, idle)
	}
	close(reset)
	wg.Wait()
	if !errors.Is(upstreamErr, syscall.ECONNRESET) && !errors.Is(upstreamErr, syscall.EPIPE) {
		t.Errorf("upstream saw %v, want a reset", upstreamErr)
	}
}

// TestCloseResetsParkedFlows: Close wakes flows parked in both directions
// (a socket closed in our epoll set gives no event) and resets each.
func TestCloseResetsParkedFlows(t *testing.T) {
	p := newPeer(t, Config{parkAfter: 30 * time.Millisecond})
	port := listen(t, echo)
	const n = 20
	base := runtime.NumGoroutine()
	dialMany(t, p, port, n)
	if perFlow := waitGoroutinesPerFlow(base, n, 1.2); perFlow > 1.2 {
		t.Fatalf("%.2f goroutines per idle flow, want about 1", perFlow)
	}
	p.closeWithin(t, 5*time.Second, "parked flows")
	if got := p.dev.resets.Load(); got != n {
		t.Errorf("%d resets written by Close, want %d", got, n)
	}
}

// TestParkWakeStress drives flows through many park and wake cycles at
// once, in both directions, ending each with a half-close from either
// side: a wake racing a park must neither be lost (the flow stalls) nor
// start a second loop (gVisor's waiter list is corrupted, and Notify
// spins).
func TestParkWakeStress(t *testing.T) {
	p := newPeer(t, Config{parkAfter: time.Millisecond, HalfCloseIdle: 5 * time.Second})
	port := listen(t, func(c *net.TCPConn) {
		buf := make([]byte, 64)
		for i := 0; ; i++ {
			n, err := c.Read(buf)
			if err != nil {
				c.CloseWrite()
				return
			}
			if i%7 == 3 {
				time.Sleep(time.Duration(i%3) * time.Millisecond)
			}
			if _, err := c.Write(buf[:n]); err != nil {
				return
			}
		}
	})
	const flows, msgs = 24, 60
	var wg sync.WaitGroup
	errs := make(chan error, flows)
	for f := range flows {
		wg.Go(func() {
			c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			c.SetDeadline(time.Now().Add(30 * time.Second))
			for i := range msgs {
				msg := []byte(fmt.Sprintf("f%d m%d", f, i))
				if _, err := c.Write(msg); err != nil {
					errs <- fmt.Errorf("flow %d write %d: %w", f, i, err)
					return
				}
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					errs <- fmt.Errorf("flow %d echo %d: %q, %v", f, i, got, err)
					return
				}
				if (i+f)%5 == 0 {
					time.Sleep(time.Duration((i+f)%4) * time.Millisecond)
				}
			}
			c.CloseWrite()
			if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
				errs <- fmt.Errorf("flow %d after FIN: %q, %v", f, rest, err)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestParkedClientHalfCloseBounded: after the upstream's FIN, a client that
// neither sends nor closes is given HalfCloseIdle, then both sides see a
// reset: the parked client side is bounded by its timer.
func TestParkedClientHalfCloseBounded(t *testing.T) {
	const idle = 300 * time.Millisecond
	p := newPeer(t, Config{parkAfter: 50 * time.Millisecond, HalfCloseIdle: idle})
	upstreamErr := make(chan error, 1)
	port := listen(t, func(c *net.TCPConn) {
		c.Write([]byte("bye"))
		c.CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		_, err := io.ReadAll(c)
		upstreamErr <- err
	})
	c := dialMany(t, p, port, 1)[0]
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "bye" {
		t.Fatalf("read to the upstream's FIN: %q, %v", got, err)
	}
	start := time.Now()
	// The client stays silent; the flow must not stay open for ever.
	select {
	case err := <-upstreamErr:
		took := time.Since(start)
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("upstream read ended with %v, want a reset", err)
		}
		if took > 5*time.Second {
			t.Errorf("reset after %v, want about %v", took, idle)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the lingering client side was never bounded")
	}
}
