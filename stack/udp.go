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
	udpConn *net.UDPConn // conn, when it is a real socket: the fast path
	failed  bool

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
	return &udpTable{st: st, dialer: dialer, timeout: timeout, max: max,
		assocs: make(map[netip.AddrPort]*udpAssoc), dnsSlots: make(chan struct{}, maxDNSInFlight)}
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
	return t.handleDatagram(client, dst, payload, quote)
}

// handleRaw takes a whole IP packet from the device reader and carries it
// if it is an unfragmented UDP datagram, sparing it gVisor's network layer
// (a packet buffer, parsing and demultiplexing for every datagram). It
// reports whether it took the packet; anything else, including fragments
// that need reassembly and datagrams gVisor must refuse, goes to gVisor.
func (t *udpTable) handleRaw(pkt []byte) bool {
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
	if u.Checksum() != 0 || src.Is6() {
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
	return t.handleDatagram(client, to, seg[udpHeaderLen:], quote)
}

// handleDatagram carries one datagram from client to dst. quote gives the
// start of the client's packet, kept for ICMP errors.
func (t *udpTable) handleDatagram(client, dst netip.AddrPort, payload []byte, quote func() []byte) bool {
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
	a.send(dst, payload)
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

// send carries one datagram from the client towards dst.
func (a *udpAssoc) send(dst netip.AddrPort, payload []byte) {
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
	a.touch()
	a.write(dst, payload)
}

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
	} else if a.udpConn != nil {
		_, err = a.udpConn.WriteToUDPAddrPort(payload, dst)
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

	a.mu.Lock()
	pending := a.pending
	a.pending = nil
	if err != nil {
		a.failed = true
	} else {
		a.conn = conn
		a.udpConn = kernelSocket(conn)
	}
	close(a.ready)
	a.mu.Unlock()

	if err != nil {
		a.log.Warn("udp association failed: datagrams from this source are refused", "err", err)
		for _, d := range pending {
			a.send(d.dst, d.payload)
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
	if a.udpConn != nil {
		enableRecvErr(a.udpConn)
	}
	a.log.Debug("udp association open", "local", conn.LocalAddr())
	for _, d := range pending {
		a.write(d.dst, d.payload)
	}
	a.receive()
}

// receive carries datagrams from the upstream to the client until the
// association has been idle for the table's timeout or is aborted.
func (a *udpAssoc) receive() {
	for {
		idleUntil := time.Unix(0, a.last.Load()).Add(a.t.timeout)
		_ = a.conn.SetReadDeadline(idleUntil)
		// Checked after setting the deadline, so that an abort in between
		// (which sets a past deadline) cannot be overwritten unseen.
		if a.ctx.Err() != nil {
			return
		}
		err := a.receiveOne()
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
			continue // the client sent something meanwhile: not idle yet
		}
		a.log.Debug("udp association closed", "err", err)
		return
	}
}

// receiveOne reads one datagram and writes it to the client as a packet from
// its true source.
func (a *udpAssoc) receiveOne() error {
	var (
		bp       *[]byte
		n        int
		from     netip.AddrPort
		fromAddr net.Addr // as the upstream named it, when not a real socket
	)
	if a.udpConn != nil {
		// Borrow a buffer only while a datagram is there, so that an idle
		// association holds no buffer at all.
		rc, err := a.udpConn.SyscallConn()
		if err != nil {
			return err
		}
		var rerr error
		err = rc.Read(func(fd uintptr) bool {
			bp = udpBufs.Get().(*[]byte)
			var sa unix.Sockaddr
			n, sa, rerr = unix.Recvfrom(int(fd), (*bp)[udpHeadroom:], unix.MSG_DONTWAIT)
			if rerr == unix.EAGAIN {
				udpBufs.Put(bp)
				bp = nil
				return false
			}
			from = sockaddrToAddrPort(sa)
			return true
		})
		if err == nil {
			err = rerr
		}
		if err != nil {
			if bp != nil {
				udpBufs.Put(bp)
			}
			if isICMPError(err) {
				// An ICMP error for an earlier datagram: pass it on to the
				// client, and go on.
				a.relayICMPErrors()
				return nil
			}
			return err
		}
	} else {
		bp = udpBufs.Get().(*[]byte)
		var err error
		n, fromAddr, err = a.conn.ReadFrom((*bp)[udpHeadroom:])
		if err != nil {
			udpBufs.Put(bp)
			return err
		}
		if ua, ok := fromAddr.(*net.UDPAddr); ok {
			from = ua.AddrPort()
		}
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
