package stack

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
)

// UDPDialer opens the far side of a UDP association: a packet conn that
// sends to any "host:port" given to WriteTo and reports the true source of
// what it receives. net.ListenConfig and every proxy dialer that carries UDP
// fit it.
type UDPDialer interface {
	ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error)
}

const (
	// udpPendingMax bounds the datagrams held for an association whose
	// upstream is still being opened (a SOCKS5 UDP ASSOCIATE takes a round
	// trip or two).
	udpPendingMax = 64
	// udpFailedHold is how long a client source whose association could not
	// be opened is answered with ICMP errors before a new attempt.
	udpFailedHold = 5 * time.Second
	// udpHeadroom is room in front of a received datagram for the IP and
	// UDP headers of the packet that carries it to the client.
	udpHeadroom = ipv6HeaderLen + udpHeaderLen
	// maxDNSInFlight bounds intercepted DNS queries being answered at once;
	// beyond it queries are dropped and the client retries.
	maxDNSInFlight = 256
)

var udpBufs = sync.Pool{New: func() any { b := make([]byte, udpHeadroom+maxPacket); return &b }}

// udpTable is the NAT table for UDP: one association per client source
// address and port (endpoint-independent mapping, RFC 4787 REQ-1), whatever
// the destinations, so STUN, QUIC migration and peer-to-peer work.
type udpTable struct {
	st      *Stack
	dialer  UDPDialer
	timeout time.Duration
	max     int

	mu     sync.Mutex
	assocs map[netip.AddrPort]*udpAssoc
	closed bool
	wg     sync.WaitGroup // one per association

	dnsSlots     chan struct{} // DNS queries being answered
	droppedDNS   atomic.Uint64
	droppedQueue atomic.Uint64 // datagrams dropped while an association opened
	droppedBig   atomic.Uint64 // replies too large for the link MTU

	// Batched I/O on kernel sockets (udp_batch.go).
	tx           udpTx
	rxBatches    sync.Pool // *udpRxBatch
	smallBufOnce sync.Once
	sendCalls    atomic.Uint64 // sendmmsg calls
	sent         atomic.Uint64 // datagrams they sent
	droppedSend  atomic.Uint64 // datagrams a full or failing socket did not take
	recvCalls    atomic.Uint64 // recvmmsg calls that returned datagrams or an error
	received     atomic.Uint64 // datagrams they returned
	rxHeld       atomic.Int64  // receive batches borrowed now
}

// udpAssoc is one client source's association.
type udpAssoc struct {
	t      *udpTable
	client netip.AddrPort
	log    *slog.Logger
	last   atomic.Int64 // unix nanoseconds of the last datagram either way
	ctx    context.Context
	cancel context.CancelFunc

	ready   chan struct{} // closed once conn is open or failed is set
	conn    net.PacketConn
	udpConn *net.UDPConn    // conn, when it is a real socket: the fast path
	rc      syscall.RawConn // udpConn's, for batched I/O
	family  int             // udpConn's address family
	failed  bool

	// Guarded by t.tx.mu: this association's datagrams in the send queue,
	// and whether its socket refused UDP GSO.
	txQueued       bool
	noGSO          bool
	txHead, txTail int32

	fakes fakeDests // fake destinations sent to, by name

	mu      sync.Mutex
	pending []pendingDatagram
	quote   []byte // the start of the client's first packet, for ICMP errors
}

type pendingDatagram struct {
	dst     netip.AddrPort
	payload []byte
}

func newUDPTable(st *Stack, dialer UDPDialer, timeout time.Duration, max int) *udpTable {
	t := &udpTable{st: st, dialer: dialer, timeout: timeout, max: max,
		assocs: make(map[netip.AddrPort]*udpAssoc), dnsSlots: make(chan struct{}, maxDNSInFlight)}
	t.tx.init(t)
	return t
}

// handlePacket is gVisor's default UDP handler: it runs on the device reader
// for every datagram, so it never blocks. Returning false makes the stack
// answer ICMP port unreachable.
func (t *udpTable) handlePacket(id gstack.TransportEndpointID, pkt *gstack.PacketBuffer) bool {
	client := netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	data := pkt.Data()
	payload, ok := data.PullUp(data.Size())
	if !ok && data.Size() > 0 {
		return true
	}
	u := header.UDP(pkt.TransportHeader().Slice())
	if (u.Checksum() != 0 || client.Addr().Is6()) &&
		!u.IsChecksumValid(id.RemoteAddress, id.LocalAddress, checksum.Checksum(payload, 0)) {
		return true // a corrupt datagram is dropped, as a kernel would
	}
	quote := func() []byte {
		q := make([]byte, 0, icmpQuoteLen)
		q = append(q, pkt.NetworkHeader().Slice()...)
		return append(q, pkt.TransportHeader().Slice()...)
	}
	// gVisor may call this from goroutines other than the device reader,
	// whose end of batch would flush a queue: send at once.
	return t.handleDatagram(client, dst, payload, quote, false)
}

// handleRaw takes a whole IP packet from the device reader and carries it
// if it is an unfragmented UDP datagram, sparing it gVisor's network layer
// (a packet buffer, parsing and demultiplexing for every datagram). It
// reports whether it took the packet; anything else, including fragments
// that need reassembly and datagrams gVisor must refuse, goes to gVisor.
// With verified, the link has checked the checksums already: a datagram's
// payload is not summed twice on the hot path.
func (t *udpTable) handleRaw(pkt []byte, verified bool) bool {
	var (
		src, dst netip.Addr
		seg      []byte
		hdrLen   int
	)
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 ||
			ip.CalculateChecksum() != 0xffff {
			return false
		}
		hdrLen = int(ip.HeaderLength())
		seg = pkt[hdrLen:ip.TotalLength()]
		src, dst = netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4())
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.UDPProtocolNumber {
			return false
		}
		hdrLen = ipv6HeaderLen
		seg = pkt[hdrLen : hdrLen+int(ip.PayloadLength())]
		src, dst = netip.AddrFrom16(ip.SourceAddress().As16()), netip.AddrFrom16(ip.DestinationAddress().As16())
	default:
		return false
	}
	if len(seg) < udpHeaderLen {
		return false
	}
	u := header.UDP(seg)
	if int(u.Length()) != len(seg) || u.DestinationPort() == 0 || !src.IsGlobalUnicast() && !src.IsPrivate() {
		return false
	}
	if !verified && (u.Checksum() != 0 || src.Is6()) {
		if !u.IsChecksumValid(tcpipAddr(src), tcpipAddr(dst), checksum.Checksum(seg[udpHeaderLen:], 0)) {
			return true // corrupt: dropped, as a kernel would
		}
	}
	if t.dialer == nil && !(t.st.cfg.DNS != nil && u.DestinationPort() == 53) {
		return false // refused: gVisor answers port unreachable
	}
	client := netip.AddrPortFrom(src, u.SourcePort())
	to := netip.AddrPortFrom(dst, u.DestinationPort())
	quote := func() []byte { return append([]byte(nil), pkt[:min(len(pkt), hdrLen+udpHeaderLen)]...) }
	return t.handleDatagram(client, to, seg[udpHeaderLen:], quote, true)
}

// handleDatagram carries one datagram from client to dst. quote gives the
// start of the client's packet, kept for ICMP errors. With batched, the
// caller is the device reader, and a datagram for a kernel socket may wait
// in the send queue until the end of its read (flush).
func (t *udpTable) handleDatagram(client, dst netip.AddrPort, payload []byte, quote func() []byte, batched bool) bool {
	if d := dst.Addr(); d.IsMulticast() || d.IsUnspecified() || d == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return true // multicast and broadcast stay on the link, which is ours alone
	}
	// Published UDP ports (inbound_udp.go): a datagram to a gateway address
	// that gVisor reassembled is a reply on an inbound association, never
	// an outbound flow.
	if in := t.st.inUDP; in.isGateway(dst.Addr()) && !(t.st.cfg.DNS != nil && dst.Port() == 53) {
		return in.deliver(client, dst, payload)
	}
	if t.st.cfg.DNS != nil && dst.Port() == 53 {
		t.answerDNS(client, dst, payload)
		return true
	}
	a, created := t.lookup(client)
	if a == nil {
		return false
	}
	if created {
		a.setQuote(quote())
	}
	a.send(dst, payload, batched)
	return true
}

// lookup finds the association of a client source, creating it (and evicting
// the least recently active one when the table is full) if there is none.
func (t *udpTable) lookup(client netip.AddrPort) (*udpAssoc, bool) {
	if t.dialer == nil {
		return nil, false // UDP is refused: the stack answers port unreachable
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, false
	}
	if a, ok := t.assocs[client]; ok {
		return a, false
	}
	if len(t.assocs) >= t.max {
		t.evictOldestLocked()
	}
	a := &udpAssoc{
		t:      t,
		client: client,
		ready:  make(chan struct{}),
		log:    t.st.log.With("flow", t.st.flowSeq.Add(1), "proto", "udp", "src", client),
	}
	a.ctx, a.cancel = context.WithCancel(t.st.ctx)
	a.touch()
	t.assocs[client] = a
	t.wg.Go(a.run)
	return a, true
}

func (t *udpTable) evictOldestLocked() {
	var oldest *udpAssoc
	for _, a := range t.assocs {
		if oldest == nil || a.last.Load() < oldest.last.Load() {
			oldest = a
		}
	}
	if oldest != nil {
		delete(t.assocs, oldest.client)
		oldest.log.Debug("udp table full, evicting the least recently active association", "max", t.max)
		oldest.abort()
	}
}

func (t *udpTable) remove(a *udpAssoc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.assocs[a.client] == a {
		delete(t.assocs, a.client)
	}
}

// close ends every association and waits for their goroutines.
func (t *udpTable) close() {
	t.mu.Lock()
	t.closed = true
	for _, a := range t.assocs {
		a.abort()
	}
	t.mu.Unlock()
	t.wg.Wait()
	t.st.log.Debug("udp totals", "sent", t.sent.Load(), "send_calls", t.sendCalls.Load(), "dropped_send", t.droppedSend.Load(),
		"received", t.received.Load(), "recv_calls", t.recvCalls.Load(), "dropped_big", t.droppedBig.Load(),
		"dropped_opening", t.droppedQueue.Load(), "dropped_dns", t.droppedDNS.Load())
}

func (a *udpAssoc) touch() { a.last.Store(time.Now().UnixNano()) }

// abort wakes the association's goroutine so that it ends. It is safe to call
// at any time and more than once.
func (a *udpAssoc) abort() {
	a.cancel()
	select {
	case <-a.ready:
		if a.conn != nil {
			_ = a.conn.SetReadDeadline(time.Unix(1, 0))
		}
	default:
		// Still opening: the cancelled context ends that.
	}
}

func (a *udpAssoc) setQuote(q []byte) {
	a.mu.Lock()
	a.quote = q
	a.mu.Unlock()
}

// send carries one datagram from the client towards dst; with batched, it
// may wait in the send queue until the next flush.
func (a *udpAssoc) send(dst netip.AddrPort, payload []byte, batched bool) {
	select {
	case <-a.ready:
	default:
		a.mu.Lock()
		defer a.mu.Unlock()
		select {
		case <-a.ready: // opened while we took the lock: pending was flushed
		default:
			if len(a.pending) >= udpPendingMax {
				a.t.droppedQueue.Add(1)
				return
			}
			a.pending = append(a.pending, pendingDatagram{dst: dst, payload: append([]byte(nil), payload...)})
			return
		}
	}
	if a.failed {
		bp := udpBufs.Get().(*[]byte)
		a.mu.Lock()
		pkt := buildPortUnreachable(*bp, dst.Addr(), a.client.Addr(), a.quote)
		a.mu.Unlock()
		a.t.st.link.writeRaw(pkt)
		udpBufs.Put(bp)
		return
	}
	names := a.t.st.cfg.Names
	switch {
	case a.udpConn == nil || names != nil && names.IsFake(dst.Addr()):
		a.touch()
		a.write(dst, payload)
	case batched:
		a.t.tx.mu.Lock()
		a.t.tx.add(a, dst, payload)
		a.t.tx.mu.Unlock()
	default:
		a.t.tx.sendNow(a, dst, payload)
	}
}

// write sends one datagram with the conn's WriteTo: through a proxy, or
// to a destination given by name.
func (a *udpAssoc) write(dst netip.AddrPort, payload []byte) {
	var err error
	if names := a.t.st.cfg.Names; names != nil && names.IsFake(dst.Addr()) {
		d := a.fakes.lookup(dst)
		if d == nil {
			hostport, release, err := a.t.st.upstreamAddress(dst)
			if err != nil {
				a.log.Info("dropping datagram", "dst", dst, "err", err)
				return
			}
			d = &fakeDest{fake: dst, hostport: hostport, release: release}
			a.fakes.add(d)
		}
		_, err = a.conn.WriteTo(payload, hostAddr(d.hostport))
	} else {
		_, err = a.conn.WriteTo(payload, net.UDPAddrFromAddrPort(dst))
	}
	if err != nil {
		a.log.Debug("udp send failed", "dst", dst, "err", err)
	}
}

// run opens the upstream side, flushes what waited for it, then carries
// replies back until the association idles out or is aborted.
func (a *udpAssoc) run() {
	defer a.fakes.releaseAll()
	defer a.t.remove(a)
	defer a.cancel()
	ctx, cancel := context.WithTimeout(a.ctx, a.t.st.cfg.DialTimeout)
	conn, err := a.t.dialer.ListenPacket(ctx, "udp", "")
	cancel()

	var udpConn *net.UDPConn
	if err == nil {
		udpConn = kernelSocket(conn)
	}
	a.mu.Lock()
	pending := a.pending
	a.pending = nil
	if err != nil {
		a.failed = true
	} else {
		a.conn = conn
		a.udpConn = udpConn
		if udpConn != nil {
			if kerr := a.openKernelSocket(); kerr != nil {
				// Without its raw conn the socket is used as a plain
				// packet conn.
				a.log.Debug("udp socket: no batched i/o", "err", kerr)
				a.udpConn = nil
			}
		}
	}
	close(a.ready)
	a.mu.Unlock()

	if err != nil {
		a.log.Warn("udp association failed: datagrams from this source are refused", "err", err)
		for _, d := range pending {
			a.send(d.dst, d.payload, false)
		}
		// Keep answering with ICMP errors for a while rather than retrying
		// the upstream for every datagram.
		hold := time.NewTimer(udpFailedHold)
		defer hold.Stop()
		select {
		case <-hold.C:
		case <-a.ctx.Done():
		}
		return
	}
	defer conn.Close()
	a.log.Debug("udp association open", "local", conn.LocalAddr())
	for _, d := range pending {
		a.send(d.dst, d.payload, false)
	}
	a.receive()
}

// receive carries datagrams from the upstream to the client until the
// association has been idle for the table's timeout or is aborted.
func (a *udpAssoc) receive() {
	var r *udpReceiver
	if a.udpConn != nil {
		r = newUDPReceiver(a)
	}
	// The deadline is moved only when it passes, not for every read: the
	// association then lives until timeout after its last datagram.
	deadlineSet := false
	for {
		if !deadlineSet {
			_ = a.conn.SetReadDeadline(time.Unix(0, a.last.Load()).Add(a.t.timeout))
			deadlineSet = true
		}
		// Checked after setting the deadline, so that an abort in between
		// (which sets a past deadline) cannot be overwritten unseen.
		if a.ctx.Err() != nil {
			return
		}
		var err error
		if r != nil {
			err = r.receive()
		} else {
			err = a.receiveOne()
		}
		if err == nil {
			a.touch()
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if a.ctx.Err() != nil {
				return
			}
			if time.Since(time.Unix(0, a.last.Load())) >= a.t.timeout {
				a.log.Debug("udp association closed", "cause", "idle")
				return
			}
			deadlineSet = false
			continue // the client sent something meanwhile: not idle yet
		}
		a.log.Debug("udp association closed", "err", err)
		return
	}
}

// receiveOne reads one datagram from a conn that is not a kernel socket (a
// proxy's) and writes it to the client as a packet from its true source.
func (a *udpAssoc) receiveOne() error {
	bp := udpBufs.Get().(*[]byte)
	n, fromAddr, err := a.conn.ReadFrom((*bp)[udpHeadroom:])
	if err != nil {
		udpBufs.Put(bp)
		return err
	}
	var from netip.AddrPort
	if ua, ok := fromAddr.(*net.UDPAddr); ok {
		from = ua.AddrPort()
	}
	defer udpBufs.Put(bp)
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if !a.fakes.empty() {
		if fake, ok := a.fakes.replySource(fromAddr, from.Port()); ok {
			from = fake
		}
	}
	if !from.IsValid() || from.Addr().Is4() != a.client.Addr().Is4() {
		return nil // a source the client's address family cannot see
	}
	hl := ipHeaderLen(a.client.Addr())
	if hl+udpHeaderLen+n > int(a.t.st.link.mtu) {
		a.t.droppedBig.Add(1)
		return nil
	}
	start := udpHeadroom - hl - udpHeaderLen
	pkt := buildUDP((*bp)[start:], from, a.client, (*bp)[udpHeadroom:udpHeadroom+n])
	a.t.st.link.writeRaw(pkt)
	return nil
}

// answerDNS answers an intercepted DNS query off the device reader: an
// answer may need the upstream resolver.
func (t *udpTable) answerDNS(client, dst netip.AddrPort, payload []byte) {
	select {
	case t.dnsSlots <- struct{}{}:
	default:
		t.droppedDNS.Add(1)
		return
	}
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		<-t.dnsSlots
		return
	}
	query := append([]byte(nil), payload...)
	t.wg.Go(func() {
		defer func() { <-t.dnsSlots }()
		reply := t.st.cfg.DNS.Answer(t.st.ctx, query, false)
		if reply == nil {
			return
		}
		hl := ipHeaderLen(client.Addr())
		if hl+udpHeaderLen+len(reply) > int(t.st.link.mtu) {
			t.droppedBig.Add(1)
			return
		}
		bp := udpBufs.Get().(*[]byte)
		defer udpBufs.Put(bp)
		t.st.link.writeRaw(buildUDP(*bp, dst, client, reply))
	})
	t.mu.Unlock()
}

// KernelSocket is what a packet conn that is a plain kernel UDP socket may
// implement (proxy.Direct's does) to let the stack read and write it
// directly: borrowing buffers only while a datagram is there, and receiving
// ICMP errors.
type KernelSocket interface {
	KernelSocket() *net.UDPConn
}

func kernelSocket(c net.PacketConn) *net.UDPConn {
	switch c := c.(type) {
	case *net.UDPConn:
		return c
	case KernelSocket:
		return c.KernelSocket()
	}
	return nil
}

func sockaddrToAddrPort(sa unix.Sockaddr) netip.AddrPort {
	switch sa := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(sa.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(sa.Port))
	}
	return netip.AddrPort{}
}

func (t *udpTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.assocs)
}
