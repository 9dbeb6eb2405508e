package stack

import (
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// TestSendToSlowUpstream sends a bulk stream from the client to an upstream
// that reads slowly, so the socket fills over and over: every byte arrives
// once and in order, and the client's FIN arrives after the last one. On a
// link of MTU 65000 the segments' views are written straight from gVisor;
// at 1500 they are gathered.
func TestSendToSlowUpstream(t *testing.T) {
	for _, mtu := range []int{65000, 1500} {
		t.Run(map[int]string{65000: "long-views", 1500: "short-views"}[mtu], func(t *testing.T) {
			p := newPeerMTU(t, Config{}, mtu)
			type result struct {
				sum [32]byte
				n   int
				err error
			}
			got := make(chan result, 1)
			port := listen(t, func(c *net.TCPConn) {
				_ = c.SetReadBuffer(32 << 10)
				sum, n, err := slowDigest(c)
				got <- result{sum, n, err}
			})
			c := p.dialServer(t, port)
			data := make([]byte, 8<<20)
			rand.NewChaCha8([32]byte{3}).Read(data)
			if _, err := c.Write(data); err != nil {
				t.Fatalf("write: %v", err)
			}
			if err := c.CloseWrite(); err != nil {
				t.Fatalf("close write: %v", err)
			}
			select {
			case r := <-got:
				if r.err != nil {
					t.Fatalf("upstream read: %v after %d bytes", r.err, r.n)
				}
				if r.n != len(data) || r.sum != sha256.Sum256(data) {
					t.Fatalf("upstream got %d bytes (digest match %v), want %d", r.n, r.sum == sha256.Sum256(data), len(data))
				}
			case <-time.After(60 * time.Second):
				t.Fatalf("upstream did not get the stream and its FIN")
			}
		})
	}
}

// TestSendUpstreamResetMidStream checks that an upstream that resets while
// the client is still sending resets the client too.
func TestSendUpstreamResetMidStream(t *testing.T) {
	p := newPeerMTU(t, Config{}, 65000)
	port := listen(t, func(c *net.TCPConn) {
		_, _ = io.CopyN(io.Discard, c, 1<<20)
		_ = c.SetLinger(0)
	})
	c := p.dialServer(t, port)
	_ = c.SetWriteDeadline(time.Now().Add(30 * time.Second))
	chunk := make([]byte, 256<<10)
	var werr error
	for range 256 { // 64 MiB at most
		if _, werr = c.Write(chunk); werr != nil {
			break
		}
	}
	if werr == nil || errors.Is(werr, os.ErrDeadlineExceeded) {
		t.Fatalf("client write: %v after the upstream reset; want a reset", werr)
	}
	if le := c.ep.LastError(); le != nil {
		if _, ok := le.(*tcpip.ErrConnectionReset); !ok {
			t.Fatalf("client endpoint error %v, want connection reset", le)
		}
	}
}

// TestReceiveToSlowClient sends a bulk stream from the upstream to a client
// that reads slowly, so gVisor's send buffer fills over and over and the
// socket's bytes wait in the socket: every byte arrives once and in order,
// then the FIN.
func TestReceiveToSlowClient(t *testing.T) {
	for _, mtu := range []int{65000, 1500} {
		t.Run(fmt.Sprintf("mtu=%d", mtu), func(t *testing.T) {
			p := newPeerMTU(t, Config{}, mtu)
			data := make([]byte, 8<<20)
			rand.NewChaCha8([32]byte{5}).Read(data)
			port := listen(t, func(c *net.TCPConn) {
				// Writes of many sizes: the socket holds odd amounts.
				rng := rand.New(rand.NewPCG(1, 2))
				for rest := data; len(rest) > 0; {
					n := min(len(rest), 1+rng.IntN(200<<10))
					if _, err := c.Write(rest[:n]); err != nil {
						return
					}
					rest = rest[n:]
				}
				c.CloseWrite()
				io.Copy(io.Discard, c)
			})
			c := p.dialServer(t, port)
			_ = c.SetReadDeadline(time.Now().Add(60 * time.Second))
			sum, total, err := slowDigest(c)
			if err != nil {
				t.Fatalf("client read: %v after %d bytes", err, total)
			}
			if total != len(data) || sum != sha256.Sum256(data) {
				t.Fatalf("client got %d bytes (digest match %v), want %d", total, sum == sha256.Sum256(data), len(data))
			}
		})
	}
}

// TestReceiveUpstreamResetMidStream checks that an upstream that resets in
// the middle of a download resets the client, rather than ending the stream
// with a FIN that would pass the cut-off data for whole.
func TestReceiveUpstreamResetMidStream(t *testing.T) {
	p := newPeerMTU(t, Config{}, 65000)
	port := listen(t, func(c *net.TCPConn) {
		// Wait for the client's byte: a reset before the relay's dial has
		// finished fails the dial, and the client sees a refusal instead.
		if _, err := c.Read(make([]byte, 1)); err != nil {
			return
		}
		chunk := make([]byte, 64<<10)
		for range 16 {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
		_ = c.SetLinger(0)
	})
	c := p.dialServer(t, port)
	if _, err := c.Write([]byte{1}); err != nil {
		t.Fatalf("client write: %v", err)
	}
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if err == nil {
		t.Fatalf("client read %d bytes and a FIN; want a reset", n)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("client read %d bytes, then nothing: %v", n, err)
	}
}

// dialServer connects the client to a loopback server's port through the
// stack, and closes the connection when the test ends.
func (p *peer) dialServer(t *testing.T, port uint16) *clientConn {
	t.Helper()
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// slowDigest reads r to EOF slowly, so that what sends to it fills its
// buffers, and returns the digest of what it read.
func slowDigest(r io.Reader) (sum [32]byte, total int, err error) {
	h := sha256.New()
	buf := make([]byte, 4<<10)
	for {
		n, err := r.Read(buf)
		h.Write(buf[:n])
		total += n
		if err != nil {
			h.Sum(sum[:0])
			if errors.Is(err, io.EOF) {
				err = nil
			}
			return sum, total, err
		}
		if total%(1<<20) < n {
			time.Sleep(5 * time.Millisecond) // a slow reader: the sender's buffers fill
		}
	}
}
