package stack

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/gverr"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// seqpacketDevice is a Device over SOCK_SEQPACKET socketpairs, one per
// queue: real kernel objects that keep packet boundaries as the queues of a
// TUN do, so the stack can be tested without root (the approach of gVisor's
// fdbased tests). A Read returns every packet already queued, up to the
// batch size, as tundev's does; far holds the other ends, for the test's
// client. It offers no offloads: every packet it writes is whole, with its
// checksums complete.
type seqpacketDevice struct {
	files []*os.File
	rcs   []syscall.RawConn
	far   []int
	batch int
	mtu   int
	// gate is held by a test while it writes a burst, so that the whole
	// burst is one read.
	gate    sync.Mutex
	closed  atomic.Bool
	events  chan device.Event
	endOnce sync.Once

	resets atomic.Int64   // TCP RSTs written
	writes []atomic.Int64 // packets written to each queue
}

var _ device.Device = (*seqpacketDevice)(nil)

// newSeqpacketDevice makes a device of queues socketpairs whose reads
// return up to batch packets. The far ends are the caller's to close.
func newSeqpacketDevice(t testing.TB, queues, batch, mtu int) *seqpacketDevice {
	t.Helper()
	d := &seqpacketDevice{
		batch:  batch,
		mtu:    mtu,
		events: make(chan device.Event, 1),
		writes: make([]atomic.Int64, queues),
	}
	for range queues {
		fds := packetPair(t)
		f := os.NewFile(uintptr(fds[0]), "stack-side")
		rc, err := f.SyscallConn()
		if err != nil {
			t.Fatalf("syscall conn: %v", err)
		}
		d.files = append(d.files, f)
		d.rcs = append(d.rcs, rc)
		d.far = append(d.far, fds[1])
	}
	return d
}

func (d *seqpacketDevice) Queues() int { return len(d.files) }

func (d *seqpacketDevice) Read(q int, bufs [][]byte, sizes []int, metas []device.Meta, offset int) (int, error) {
	count := 0
	var rerr error
	err := d.rcs[q].Read(func(fd uintptr) bool {
		d.gate.Lock()
		defer d.gate.Unlock()
		for count < min(len(bufs), d.batch) {
			n, err := unix.Read(int(fd), bufs[count][offset:])
			if err == unix.EAGAIN {
				break
			}
			if err == nil && n == 0 {
				err = io.EOF // the far end is closed
			}
			if err != nil {
				rerr = err
				return true
			}
			sizes[count] = n
			// Not Verified: the link checks the checksums.
			metas[count] = device.Meta{}
			count++
		}
		return count > 0
	})
	if d.closed.Load() {
		return count, os.ErrClosed
	}
	if err == nil {
		err = rerr
	}
	if err != nil {
		d.end(&device.Event{Kind: device.EventDown, Err: err})
	}
	return count, err
}

// end closes the event channel, once, after ev if it is not nil.
func (d *seqpacketDevice) end(ev *device.Event) {
	d.endOnce.Do(func() {
		if ev != nil {
			d.events <- *ev
		}
		close(d.events)
	})
}

func (d *seqpacketDevice) Write(pkts [][][]byte, metas []device.Meta) (int, error) {
	for i, pieces := range pkts {
		if m := metas[i]; m.GSO != device.GSONone || m.NeedsCsum {
			return i, fmt.Errorf("packet %d: offload %+v asked of a device without offloads", i, m)
		}
		pkt := bytes.Join(pieces, nil)
		q := flowQueueOf(pkt, len(d.files))
		if _, err := d.files[q].Write(pkt); err != nil {
			return i, err
		}
		d.writes[q].Add(1)
		if packet.TransportProtocol(pkt) == header.TCPProtocolNumber && header.IPVersion(pkt) == header.IPv4Version {
			if tcp := header.TCP(pkt[header.IPv4(pkt).HeaderLength():]); len(tcp) >= header.TCPMinimumSize && tcp.Flags().Contains(header.TCPFlagRst) {
				d.resets.Add(1)
			}
		}
	}
	return len(pkts), nil
}

// flowQueueOf picks the queue of a packet's flow from its addresses and
// ports, so that one flow stays on one queue.
func flowQueueOf(pkt []byte, queues int) int {
	if queues == 1 {
		return 0
	}
	h := fnv.New32a()
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		if ihl := int(pkt[0]&0xf) * 4; len(pkt) >= ihl+4 && ihl >= header.IPv4MinimumSize {
			h.Write(pkt[12:20])
			h.Write(pkt[ihl : ihl+4])
		}
	case header.IPv6Version:
		if len(pkt) >= header.IPv6MinimumSize+4 {
			h.Write(pkt[8 : header.IPv6MinimumSize+4])
		}
	}
	return int(h.Sum32() % uint32(queues))
}

func (d *seqpacketDevice) BatchSize() int                    { return d.batch }
func (d *seqpacketDevice) MTU() int                          { return d.mtu }
func (d *seqpacketDevice) Capabilities() device.Capabilities { return device.Capabilities{} }
func (d *seqpacketDevice) Events() <-chan device.Event       { return d.events }

func (d *seqpacketDevice) Close() error {
	d.closed.Store(true)
	for _, f := range d.files {
		f.Close()
	}
	d.end(nil)
	return nil
}

// redirectDialer dials every flow's destination port on loopback instead, so
// the far end is a real socket served by the test.
type redirectDialer struct {
	net.Dialer
	mu   sync.Mutex
	dsts []string
}

func (d *redirectDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	d.mu.Lock()
	d.dsts = append(d.dsts, address)
	d.mu.Unlock()
	_, port, err := net.SplitHostPort(address)
	if err != nil {
		return nil, err
	}
	return d.Dialer.DialContext(ctx, network, net.JoinHostPort("127.0.0.1", port))
}

// peer is a client-side gVisor stack wired to a Stack under test through a
// socketpair: the client's TCP is a real TCP implementation, not a fake.
type peer struct {
	client *gstack.Stack
	st     *Stack
	dialer *redirectDialer
	dev    *seqpacketDevice
}

// newClientStack is the client's side of a test: a gVisor stack with the
// client addresses, a default route, and an fdbased link over fds (one per
// queue; it spreads flows over them by hash).
func newClientStack(t testing.TB, fds []int) *gstack.Stack {
	t.Helper()
	return newClientStackMTU(t, fds, 1500)
}

func newClientStackMTU(t testing.TB, fds []int, mtu uint32) *gstack.Stack {
	t.Helper()
	client := gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	linkEP, err := fdbased.New(&fdbased.Options{FDs: fds, MTU: mtu})
	if err != nil {
		t.Fatalf("fdbased: %v", err)
	}
	if terr := client.CreateNIC(1, linkEP); terr != nil {
		t.Fatalf("client nic: %v", terr)
	}
	for _, a := range []netip.Addr{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("fd00:1898::1")} {
		proto := ipv4.ProtocolNumber
		if a.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if terr := client.AddProtocolAddress(1, pa, gstack.AddressProperties{}); terr != nil {
			t.Fatalf("client address: %v", terr)
		}
	}
	client.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: 1},
		{Destination: header.IPv6EmptySubnet, NIC: 1},
	})
	return client
}

// packetPair is a SOCK_SEQPACKET socketpair with room for bursts of
// full-size packets each way; fds[0], the stack's side, is non-blocking.
func packetPair(t testing.TB) [2]int {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatalf("nonblock: %v", err)
	}
	return [2]int{fds[0], fds[1]}
}

// newTestStack starts the stack under test on dev, with its logs on stderr
// under -v.
func newTestStack(t testing.TB, cfg Config, dev Device, dialer Dialer) *Stack {
	t.Helper()
	cfg.Device = dev
	cfg.Dialer = dialer
	if cfg.Logger == nil && testing.Verbose() {
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	st, err := New(cfg)
	if err != nil {
		t.Fatalf("new stack: %v", err)
	}
	return st
}

func newPeer(t testing.TB, cfg Config) *peer {
	t.Helper()
	return newPeerMTU(t, cfg, 1500)
}

// newPeerMTU is newPeer on a link of the given MTU: up to 65535, where one
// packet carries what a TSO segment would.
func newPeerMTU(t testing.TB, cfg Config, mtu int) *peer {
	t.Helper()
	dev := newSeqpacketDevice(t, 1, 1, mtu)
	far := dev.far[0]

	p := &peer{dialer: &redirectDialer{}, dev: dev}
	var dialer Dialer = p.dialer
	if cfg.Dialer != nil { // a test's own, around p.dialer
		dialer = cfg.Dialer
	}
	p.st = newTestStack(t, cfg, dev, dialer)

	p.client = newClientStackMTU(t, []int{far}, uint32(mtu))
	t.Cleanup(func() {
		p.st.Close()
		p.client.Close()
		p.client.Wait()
		unix.Close(far)
	})
	return p
}

// clientConn is a connection from the client stack, with the endpoint kept so
// that the test can reset it.
type clientConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
}

func (p *peer) dial(t testing.TB, dst netip.AddrPort) (*clientConn, error) {
	return p.dialFrom(t, 0, dst, 10*time.Second)
}

// dialFrom connects from a chosen client port (0: any).
func (p *peer) dialFrom(t testing.TB, port uint16, dst netip.AddrPort, timeout time.Duration) (*clientConn, error) {
	t.Helper()
	proto := ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	var wq waiter.Queue
	ep, terr := p.client.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		t.Fatalf("client endpoint: %v", terr)
	}
	entry, done := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	if port != 0 {
		ep.SocketOptions().SetReuseAddress(true)
		if terr := ep.Bind(tcpip.FullAddress{Port: port}); terr != nil {
			ep.Close()
			return nil, gverr.Error("bind", terr)
		}
	}
	addr := tcpip.FullAddress{Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port()}
	terr = ep.Connect(addr)
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-done:
		case <-time.After(timeout):
			ep.Close()
			return nil, errors.New("connect timed out")
		}
		terr = ep.LastError()
	}
	if terr != nil {
		ep.Close()
		return nil, gverr.Error("connect", terr)
	}
	return &clientConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep}, nil
}

// listen starts a loopback TCP server whose handler runs once per connection.
func listen(t testing.TB, handle func(c *net.TCPConn)) uint16 {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen: %v", err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer c.Close()
				handle(c)
			})
		}
	})
	return uint16(ln.Addr().(*net.TCPAddr).Port)
}

func echo(c *net.TCPConn) {
	io.Copy(c, c)
	c.CloseWrite()
}

func TestEchoLarge(t *testing.T) {
	for _, dst := range []string{"192.0.2.2", "2001:db8::2"} {
		t.Run(dst, func(t *testing.T) {
			p := newPeer(t, Config{})
			port := listen(t, echo)
			to := netip.AddrPortFrom(netip.MustParseAddr(dst), port)
			if err := echoFlow(t, p, to, 1, 4<<20); err != nil {
				t.Fatal(err)
			}
			if p.dialer.dsts[0] != to.String() {
				t.Errorf("dialed %q, want %q", p.dialer.dsts[0], to.String())
			}
		})
	}
}

// echoFlow sends size patterned bytes over one connection through the
// stack and checks that the echo matches.
func echoFlow(t testing.TB, p *peer, dst netip.AddrPort, seed, size int) error {
	c, err := p.dial(t, dst)
	if err != nil {
		return fmt.Errorf("flow %d: dial %s: %w", seed, dst, err)
	}
	defer c.Close()
	data := make([]byte, size)
	rand.NewChaCha8([32]byte{byte(seed)}).Read(data)
	errc := make(chan error, 1)
	go func() {
		_, err := c.Write(data)
		if err == nil {
			err = c.CloseWrite()
		}
		errc <- err
	}()
	_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
	got, err := io.ReadAll(c)
	if werr := <-errc; werr != nil {
		return fmt.Errorf("flow %d: write: %w", seed, werr)
	}
	if err != nil {
		return fmt.Errorf("flow %d: read echo: %w", seed, err)
	}
	if sha256.Sum256(got) != sha256.Sum256(data) {
		return fmt.Errorf("flow %d: echo differs: got %d bytes, want %d", seed, len(got), len(data))
	}
	return nil
}

// closeWithin closes the stack under test and fails the test if Close
// takes longer than d.
func (p *peer) closeWithin(t *testing.T, d time.Duration, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() {
		p.st.Close()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(d):
		t.Fatalf("Close did not return with %s", what)
	}
}

// TestHalfClose checks that data sent after the client's FIN still arrives,
// and that the upstream sees EOF rather than a reset.
func TestHalfClose(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, func(c *net.TCPConn) {
		got, err := io.ReadAll(c)
		if err != nil {
			return
		}
		// Answer only after the client's FIN, and in several writes.
		sum := sha256.Sum256(got)
		for range 3 {
			c.Write(sum[:])
		}
	})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	msg := bytes.Repeat([]byte("half-close "), 10000)
	if _, err := c.Write(msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	if err := c.CloseWrite(); err != nil {
		t.Fatalf("close write: %v", err)
	}
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("read after half-close: %v", err)
	}
	sum := sha256.Sum256(msg)
	want := bytes.Repeat(sum[:], 3)
	if !bytes.Equal(got, want) {
		t.Fatalf("reply after FIN: got %d bytes, want %d", len(got), len(want))
	}
}

func TestUpstreamRefusedResetsClient(t *testing.T) {
	p := newPeer(t, Config{})
	// A port that was just free: nothing listens there.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()

	start := time.Now()
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded, want connection refused")
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial error %v, want ECONNREFUSED (a RST in reply to the SYN)", err)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("refusal took %v", d)
	}
}

func TestUpstreamResetReachesClient(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, func(c *net.TCPConn) {
		buf := make([]byte, 5)
		io.ReadFull(c, buf)
		c.SetLinger(0) // close with RST
	})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	c.Write([]byte("hello"))
	_, err = io.ReadAll(c)
	if err == nil {
		t.Fatal("read ended with EOF, want a reset")
	}
	if le := c.ep.LastError(); le != nil {
		if _, ok := le.(*tcpip.ErrConnectionReset); !ok {
			t.Fatalf("client endpoint error %v, want connection reset", le)
		}
	}
}

func TestClientResetReachesUpstream(t *testing.T) {
	p := newPeer(t, Config{})
	upErr := make(chan error, 1)
	started := make(chan struct{})
	port := listen(t, func(c *net.TCPConn) {
		// Wait for the first bytes, so the reset hits an established flow.
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil {
			upErr <- err
			return
		}
		close(started)
		_, err := io.Copy(io.Discard, c)
		upErr <- err
	})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	c.Write([]byte("data"))
	select {
	case <-started:
	case err := <-upErr:
		t.Fatalf("upstream never got the first bytes: %v", err)
	}
	c.ep.Abort()
	select {
	case err := <-upErr:
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("upstream read ended with %v, want ECONNRESET", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("upstream never saw the reset")
	}
}

func TestCloseResetsFlows(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, echo)
	var conns []*clientConn
	for range 20 {
		c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		conns = append(conns, c)
	}
	p.closeWithin(t, 5*time.Second, "flows open")
	// Every flow's reset was written before the device closed
	// (link.FlushOutbound), so no client waits for a timeout. (Whether this
	// client stack reads them after its peer closed is its own business;
	// the namespace test checks a kernel client sees ECONNRESET.)
	if got := p.dev.resets.Load(); got != int64(len(conns)) {
		t.Errorf("%d resets written by Close, want %d", got, len(conns))
	}
}

// TestReconnectSamePortAfterServerClose covers a client that reuses its port
// right after a connection the server closed first: our side of the old flow
// is in TIME_WAIT, and gVisor drops a new SYN for it unless TIME_WAIT is
// short (found by bench/connrate: whole seconds lost per reused port).
func TestReconnectSamePortAfterServerClose(t *testing.T) {
	p := newPeer(t, Config{})
	port := listen(t, func(c *net.TCPConn) {
		c.Write([]byte("bye"))
		c.CloseWrite() // the server closes first
		io.Copy(io.Discard, c)
	})
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port)
	const clientPort = 40001
	c, err := p.dialFrom(t, clientPort, dst, 5*time.Second)
	if err != nil {
		t.Fatalf("first dial: %v", err)
	}
	if _, err := io.ReadAll(c); err != nil {
		t.Fatalf("read: %v", err)
	}
	c.Close()
	start := time.Now()
	var c2 *clientConn
	for time.Since(start) < 5*time.Second {
		// The client's own stack may still hold the port for a moment.
		if c2, err = p.dialFrom(t, clientPort, dst, 500*time.Millisecond); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("reconnect from port %d failed for %v: %v", clientPort, time.Since(start), err)
	}
	c2.Close()
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("reconnect from the same port took %v", d)
	}
}

// pipeDialer reaches every destination with an in-memory pipe: an upstream
// that is not a socket, whose far end the test holds.
type pipeDialer struct{ far chan net.Conn }

func (d pipeDialer) DialContext(context.Context, string, string) (net.Conn, error) {
	near, far := net.Pipe()
	d.far <- far
	return near, nil
}

// TestNonSocketUpstreamResets: an upstream that is not a syscall.Conn
// cannot be relayed (the relay parks and polls its descriptor), so the
// flow is reset, and the upstream closed, rather than left hanging.
func TestNonSocketUpstreamResets(t *testing.T) {
	d := pipeDialer{far: make(chan net.Conn, 1)}
	p := newPeer(t, Config{Dialer: d})
	c, err := p.dial(t, netip.MustParseAddrPort("192.0.2.2:80"))
	switch {
	case err != nil:
		// Reset in reply to the SYN.
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dial to a non-socket upstream: %v, want a reset", err)
		}
	default:
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
		// gonet reports gVisor's error by its text alone.
		if _, err := io.ReadAll(c); err == nil || !strings.Contains(err.Error(), "connection reset") {
			t.Errorf("read: %v, want a reset", err)
		}
	}
	far := <-d.far
	defer far.Close()
	_ = far.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := far.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && !errors.Is(err, io.ErrClosedPipe) {
		t.Errorf("upstream read: %v, want it closed", err)
	}
}
