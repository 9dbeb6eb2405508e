package main_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// floodPort is where the flood test's counting server listens.
const floodPort = 7010

// upstreamCounter is a server in the server namespace that counts the
// connections netstackd opens to it, and holds each until its far end
// closes it.
type upstreamCounter struct {
	accepted atomic.Int64
	ln       net.Listener
	wg       sync.WaitGroup
	mu       sync.Mutex
	conns    []net.Conn
}

func startUpstreamCounter(t *testing.T, tp *netnstest.Topology) *upstreamCounter {
	t.Helper()
	ln, err := tp.Server.Listen("tcp", serverAddr(netnstest.ServerIPv4, floodPort))
	if err != nil {
		t.Fatal(err)
	}
	u := &upstreamCounter{ln: ln}
	u.wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			u.accepted.Add(1)
			u.mu.Lock()
			u.conns = append(u.conns, c)
			u.mu.Unlock()
			u.wg.Go(func() { io.Copy(io.Discard, c) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		u.mu.Lock()
		for _, c := range u.conns {
			c.Close()
		}
		u.mu.Unlock()
		u.wg.Wait()
	})
	return u
}

// floodSYN sends n TCP SYNs from random forged source addresses through the
// TUN to the counting server, with hping3 from the client namespace, as the
// reproduction of issue 19 did.
func floodSYN(t *testing.T, tp *netnstest.Topology, n int) {
	t.Helper()
	r := tp.Client.Exec(t, 60*time.Second, "hping3", "-q", "-S", "--rand-source",
		"-p", fmt.Sprint(floodPort), "-c", fmt.Sprint(n), "-i", "u200", netnstest.ServerIPv4.String())
	// hping3 exits 1 when no reply came back, which is what forged sources
	// get: only a failure to run or to send counts.
	if r.ExitCode < 0 || !strings.Contains(r.Stdout+r.Stderr, fmt.Sprintf("%d packets transmitted", n)) {
		t.Fatalf("hping3 flood: %s", r)
	}
}

// TestIntegrationSYNFlood is issue 19's half-open flood turned into
// assertions: 1,100 SYNs from forged random sources used to make
// dial-first netstackd open an upstream connection for each of its 1,024
// handshake slots and fail every new connection for two minutes, and a
// SIGTERM then took 17 s and exited 1. Now the server sees at most
// --max-inflight connections, a real client connects within seconds, and
// SIGTERM right after a flood exits 0 within stopWithin.
func TestIntegrationSYNFlood(t *testing.T) {
	requireBinary(t)
	netnstest.RequireCommand(t, "hping3", "hping3")
	// The default table, as reproduced, and a small one, which the flood
	// overfills seventeen times.
	for _, maxInFlight := range []int{1024, 64} {
		t.Run(fmt.Sprintf("max-inflight-%d", maxInFlight), func(t *testing.T) {
			testSYNFlood(t, maxInFlight)
		})
	}
}

func testSYNFlood(t *testing.T, maxInFlight int) {
	tp := netnstest.New(t)
	up := startUpstreamCounter(t, tp)
	var args []string
	if maxInFlight != 1024 {
		args = []string{"--max-inflight", fmt.Sprint(maxInFlight)}
	}
	d := startNetstackd(t, tp, args...)

	floodSYN(t, tp, 1100)
	flooded := up.accepted.Load()
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	start := time.Now()
	c, err := tp.Client.DialContext(ctx, "tcp", serverAddr(netnstest.ServerIPv4, floodPort))
	took := time.Since(start)
	if err != nil {
		t.Fatalf("connect after the flood: %v (after %v)", err, took)
	}
	c.Close()
	t.Logf("after 1,100 forged SYNs the server had accepted %d connections; a real client connected %v later", flooded, took.Round(time.Millisecond))
	if took > 5*time.Second {
		t.Errorf("a real client took %v to connect after the flood, want a few seconds", took)
	}
	// The client's own connection is the one beyond the flood's.
	if got := up.accepted.Load() - 1; got > int64(maxInFlight) {
		t.Errorf("the server accepted %d connections for forged sources, want at most --max-inflight %d", got, maxInFlight)
	}

	// Again, and stop netstackd while its table is full of handshakes
	// half open.
	floodSYN(t, tp, 1100)
	start = time.Now()
	st, err := d.Stop(syscall.SIGTERM, stopWithin)
	took = time.Since(start)
	switch {
	case err != nil:
		t.Errorf("SIGTERM right after a SYN flood: %v", err)
	case st.ExitCode() != 0:
		t.Errorf("%s exited with %v after SIGTERM under a SYN flood, want status 0", d, st)
	default:
		t.Logf("%s exited 0 %v after SIGTERM right after a SYN flood", d, took.Round(time.Millisecond))
	}
}
