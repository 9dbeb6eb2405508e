package stack

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

// The stack declares the device it consumes; a TUN of several queues fits
// it, queues and all.
var _ Device = (*tundev.Device)(nil)

// TestLinkQueuesTUN serves a real four-queue TUN in a namespace of its own:
// parallel TCP flows and UDP flows from inside the namespace all get
// through, the kernel spreads them over every queue, and Close stops the
// dispatcher of every queue.
func TestLinkQueuesTUN(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a multi-queue TUN in a network namespace")
	}
	const queues, tcpFlows, udpFlows, size = 4, 16, 16, 512 << 10
	_, nsPath := netnstest.NewBareNetns(t, "mqstack")
	dev, err := tundev.Create(tundev.Config{
		Name:      fmt.Sprintf("mqs%d", os.Getpid()%1_000_000),
		NetnsPath: nsPath,
		Addrs:     []netip.Prefix{netip.MustParsePrefix("198.18.0.1/15")},
		Routes:    []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0")},
		Queues:    queues,
	})
	if err != nil {
		t.Fatalf("create tun: %v", err)
	}
	before := dispatchers()
	st, err := New(Config{Device: dev, Dialer: &redirectDialer{}, UDP: &loopbackUDP{}})
	if err != nil {
		dev.Close()
		t.Fatalf("new stack: %v", err)
	}
	t.Cleanup(func() { st.Close() })
	if err := dev.Up(); err != nil {
		t.Fatalf("up: %v", err)
	}
	if got := waitDispatchers(before+queues) - before; got != queues {
		t.Fatalf("%d dispatchers running, want %d", got, queues)
	}

	tcpPort := listen(t, echo)
	udpPort := udpEcho(t)
	ctx, cancel := context.WithTimeout(t.Context(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	errs := make(chan error, tcpFlows+udpFlows)
	for i := range tcpFlows {
		wg.Go(func() {
			errs <- tunEchoTCP(ctx, nsPath, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), tcpPort), i, size)
		})
	}
	for i := range udpFlows {
		wg.Go(func() {
			errs <- tunEchoUDP(ctx, nsPath, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.3"), udpPort), i)
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	reads := st.link.QueueReads()
	t.Logf("packets read per queue: %v", reads)
	for q, n := range reads {
		if n == 0 {
			t.Errorf("queue %d read nothing: %v", q, reads)
		}
	}
	if err := st.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if got := waitDispatchers(before) - before; got != 0 {
		t.Errorf("%d dispatchers still running after Close", got)
	}
}

// tunEchoTCP connects from inside the namespace at nsPath to dst and checks
// that size bytes come back as sent.
func tunEchoTCP(ctx context.Context, nsPath string, dst netip.AddrPort, seed, size int) error {
	var c net.Conn
	err := netnstest.Netns{Name: nsPath, Path: nsPath}.Do(func() error {
		var err error
		c, err = (&net.Dialer{}).DialContext(ctx, "tcp", dst.String())
		return err
	})
	if err != nil {
		return fmt.Errorf("tcp flow %d: dial %s: %w", seed, dst, err)
	}
	defer c.Close()
	if d, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(d)
	}
	data := bytes.Repeat([]byte{byte(seed), byte(seed >> 8), 0x5a}, size/3)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.(*net.TCPConn).CloseWrite()
		}
		werr <- err
	}()
	got, err := readAll(c)
	if err := <-werr; err != nil {
		return fmt.Errorf("tcp flow %d: write: %w", seed, err)
	}
	if err != nil {
		return fmt.Errorf("tcp flow %d: read: %w", seed, err)
	}
	if !bytes.Equal(got, data) {
		return fmt.Errorf("tcp flow %d: echo of %d bytes differs (%d back)", seed, len(data), len(got))
	}
	return nil
}

func readAll(c net.Conn) ([]byte, error) {
	var b bytes.Buffer
	_, err := b.ReadFrom(c)
	return b.Bytes(), err
}

// tunEchoUDP sends datagrams from a socket inside the namespace to dst and
// waits for each echo, resending a lost one a few times.
func tunEchoUDP(ctx context.Context, nsPath string, dst netip.AddrPort, seed int) error {
	var c *net.UDPConn
	err := netnstest.Netns{Name: nsPath, Path: nsPath}.Do(func() error {
		var err error
		c, err = net.ListenUDP("udp4", nil)
		return err
	})
	if err != nil {
		return fmt.Errorf("udp flow %d: listen: %w", seed, err)
	}
	defer c.Close()
	buf := make([]byte, 2048)
	for i := range 20 {
		msg := fmt.Appendf(nil, "flow %d datagram %d", seed, i)
		for try := 0; ; try++ {
			if ctx.Err() != nil || try == 5 {
				return fmt.Errorf("udp flow %d: no echo of datagram %d", seed, i)
			}
			if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
				return fmt.Errorf("udp flow %d: send: %w", seed, err)
			}
			_ = c.SetReadDeadline(time.Now().Add(time.Second))
			n, err := c.Read(buf)
			if err == nil && bytes.Equal(buf[:n], msg) {
				break
			}
		}
	}
	return nil
}
