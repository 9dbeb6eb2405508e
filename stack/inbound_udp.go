package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Published UDP ports. Every outside source that sends to a published socket
// gets an inbound association: its datagrams enter the TUN from a port of
// its own on the gateway address (Config.Gateway4 or Gateway6) to the
// published port behind the TUN, and what comes out of the TUN to that
// gateway port goes back to the outside source from the published socket,
// as slirp4netns and pasta do it. The per-association port lets replies to
// different outside sources be told apart.
//
// As for outbound UDP (udp.go), the packets are built by hand (packet.go)
// and bypass gVisor: a map entry per association is cheaper than a gVisor
// endpoint, and the reply path stays on the device reader without a queue.

const (
	// inboundPortFirst and inboundPortLast bound the gateway ports of
	// inbound associations: the dynamic range of RFC 6335 section 6, which
	// keeps them clear of port 53, answered on the gateway as DNS.
	inboundPortFirst = 49152
	inboundPortLast  = 65535
	inboundPorts     = inboundPortLast - inboundPortFirst + 1
	// inboundSweepMax bounds how long an idle association may outlive the
	// UDP timeout before a sweep removes it.
	inboundSweepMax = 5 * time.Second
)

// inboundUDP is the table of inbound associations of every published UDP
// port of a stack: they share the gateway ports.
type inboundUDP struct {
	st       *Stack
	gw4, gw6 netip.Addr
	timeout  time.Duration
	max      int // associations, at most inboundPorts

	mu       sync.Mutex
	byPort   map[uint16]*inboundAssoc // gateway port → association
	nextPort uint16                   // where the search for a free port starts

	droppedBig     atomic.Uint64 // datagrams too large for the link MTU
	refused        atomic.Uint64 // datagrams to a gateway port with no association
	evicted        atomic.Uint64 // associations evicted because the table was full
	insideRefusals atomic.Uint64 // ICMP port unreachable from inside, dropped
}

// inboundServer is one published socket and the port behind the TUN it
// reaches.
type inboundServer struct {
	pc  net.PacketConn
	udp *net.UDPConn // pc, when it is a real socket: no allocation per datagram
	dst netip.AddrPort
	gw  netip.Addr // the gateway address of dst's family
	log *slog.Logger

	assocs map[netip.AddrPort]*inboundAssoc // outside source → association; guarded by inboundUDP.mu
}

// inboundAssoc is one outside source's association with a published port.
type inboundAssoc struct {
	srv     *inboundServer
	outside netip.AddrPort
	port    uint16       // on the gateway address
	last    atomic.Int64 // unix nanoseconds of the last datagram either way
	log     *slog.Logger

	refusalLogged atomic.Bool // an ICMP port unreachable from inside was logged
}

func newInboundUDP(st *Stack) *inboundUDP {
	return &inboundUDP{
		st:       st,
		gw4:      st.cfg.Gateway4,
		gw6:      st.cfg.Gateway6,
		timeout:  st.cfg.UDPTimeout,
		max:      min(st.cfg.MaxUDPFlows, inboundPorts),
		byPort:   make(map[uint16]*inboundAssoc),
		nextPort: inboundPortFirst,
	}
}

// ServeInboundUDP publishes a UDP port: it relays the datagrams that pc, a
// socket on netstackd's side, receives to dst behind the TUN, and the
// replies back to each sender, until pc is closed or the stack is. It
// blocks until then and returns nil; an error means that pc failed or that
// the stack has no gateway address of dst's family. pc stays the caller's
// to close. UDPTimeout ends an idle association and MaxUDPFlows bounds them
// (the least recently active is evicted).
func (st *Stack) ServeInboundUDP(pc net.PacketConn, dst netip.AddrPort) error {
	in := st.inUDP
	gw := in.gateway(dst.Addr())
	if !gw.IsValid() {
		return fmt.Errorf("publish udp %s to %s: no gateway address of its family", pc.LocalAddr(), dst)
	}
	if !st.beginFlow() {
		return fmt.Errorf("publish udp %s to %s: %w", pc.LocalAddr(), dst, net.ErrClosed)
	}
	defer st.flows.Done()
	srv := &inboundServer{
		pc:     pc,
		udp:    kernelSocket(pc),
		dst:    dst,
		gw:     gw,
		log:    st.log.With("proto", "udp", "dst", dst, "via", "publish", "listen", pc.LocalAddr().String()),
		assocs: make(map[netip.AddrPort]*inboundAssoc),
	}
	defer in.removeServer(srv)
	// A blocked read only wakes for a deadline or a close.
	stop := context.AfterFunc(st.ctx, func() { _ = pc.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	return in.serve(srv)
}

// serve reads datagrams from the published socket and sends each into the
// TUN; between reads it sweeps idle associations.
func (in *inboundUDP) serve(srv *inboundServer) error {
	bp := udpBufs.Get().(*[]byte)
	defer udpBufs.Put(bp)
	buf := *bp
	sweepEvery := min(max(in.timeout/2, 10*time.Millisecond), inboundSweepMax)
	nextSweep := time.Now().Add(sweepEvery)
	for {
		if err := srv.pc.SetReadDeadline(nextSweep); err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil
			}
			return fmt.Errorf("published udp %s: set deadline: %w", srv.pc.LocalAddr(), err)
		}
		// Checked after setting the deadline, so that the stack's closing
		// (which sets a past deadline) cannot be overwritten unseen.
		if in.st.ctx.Err() != nil {
			return nil
		}
		n, from, err := srv.read(buf[udpHeadroom:])
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				if in.st.ctx.Err() != nil {
					return nil
				}
				in.sweep(srv)
				nextSweep = time.Now().Add(sweepEvery)
				continue
			case errors.Is(err, net.ErrClosed):
				return nil
			}
			return fmt.Errorf("published udp %s: read: %w", srv.pc.LocalAddr(), err)
		}
		in.forward(srv, from, buf, n)
	}
}

// read reads one datagram into b.
func (srv *inboundServer) read(b []byte) (int, netip.AddrPort, error) {
	if srv.udp != nil {
		return srv.udp.ReadFromUDPAddrPort(b)
	}
	n, addr, err := srv.pc.ReadFrom(b)
	if err != nil {
		return n, netip.AddrPort{}, err
	}
	ua, ok := addr.(*net.UDPAddr)
	if !ok {
		return 0, netip.AddrPort{}, nil // a source we cannot answer: skipped by forward
	}
	return n, ua.AddrPort(), nil
}

// write sends payload to the outside source to.
func (srv *inboundServer) write(payload []byte, to netip.AddrPort) error {
	if srv.udp != nil {
		_, err := srv.udp.WriteToUDPAddrPort(payload, to)
		return err
	}
	_, err := srv.pc.WriteTo(payload, net.UDPAddrFromAddrPort(to))
	return err
}

// forward sends the datagram of n bytes at buf[udpHeadroom:] from the
// outside source from into the TUN, building the packet in place.
func (in *inboundUDP) forward(srv *inboundServer, from netip.AddrPort, buf []byte, n int) {
	if !from.IsValid() {
		return
	}
	hl := ipHeaderLen(srv.dst.Addr())
	if hl+udpHeaderLen+n > int(in.st.link.mtu) {
		// The kernel behind the TUN would take it, but not a datagram
		// larger than the link allows: drop it as a link would.
		in.droppedBig.Add(1)
		return
	}
	a := in.lookup(srv, from)
	a.touch()
	start := udpHeadroom - hl - udpHeaderLen
	pkt := buildUDP(buf[start:], netip.AddrPortFrom(srv.gw, a.port), srv.dst, buf[udpHeadroom:udpHeadroom+n])
	in.st.link.writeRaw(pkt)
}

// lookup finds the association of an outside source, creating it (and
// evicting the least recently active one when the table is full) if there
// is none.
func (in *inboundUDP) lookup(srv *inboundServer, from netip.AddrPort) *inboundAssoc {
	in.mu.Lock()
	defer in.mu.Unlock()
	if a, ok := srv.assocs[from]; ok {
		return a
	}
	if len(in.byPort) >= in.max {
		in.evictOldestLocked()
	}
	a := &inboundAssoc{srv: srv, outside: from, port: in.freePortLocked()}
	a.log = srv.log.With("flow", in.st.flowSeq.Add(1), "src", from, "gateway", netip.AddrPortFrom(srv.gw, a.port))
	a.touch()
	srv.assocs[from] = a
	in.byPort[a.port] = a
	a.log.Debug("inbound udp association open")
	return a
}

// freePortLocked returns a gateway port no association holds, searching on
// from the last one handed out so that a port just freed is not reused at
// once (late replies to it would reach the wrong source). There is one:
// the table holds fewer than inboundPorts associations.
func (in *inboundUDP) freePortLocked() uint16 {
	p := in.nextPort
	for {
		_, taken := in.byPort[p]
		next := p + 1
		if p == inboundPortLast {
			next = inboundPortFirst
		}
		if !taken {
			in.nextPort = next
			return p
		}
		p = next
	}
}

func (in *inboundUDP) evictOldestLocked() {
	var oldest *inboundAssoc
	for _, a := range in.byPort {
		if oldest == nil || a.last.Load() < oldest.last.Load() {
			oldest = a
		}
	}
	if oldest != nil {
		in.removeLocked(oldest)
		in.evicted.Add(1)
		oldest.log.Debug("inbound udp table full, evicting the least recently active association", "max", in.max)
	}
}

func (in *inboundUDP) removeLocked(a *inboundAssoc) {
	delete(a.srv.assocs, a.outside)
	if in.byPort[a.port] == a {
		delete(in.byPort, a.port)
	}
}

// sweep ends the associations of srv idle for the timeout.
func (in *inboundUDP) sweep(srv *inboundServer) {
	idleSince := time.Now().Add(-in.timeout).UnixNano()
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, a := range srv.assocs {
		if a.last.Load() <= idleSince {
			in.removeLocked(a)
			a.log.Debug("inbound udp association closed", "cause", "idle")
		}
	}
}

// removeServer ends every association of srv, whose socket is no longer
// served.
func (in *inboundUDP) removeServer(srv *inboundServer) {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, a := range srv.assocs {
		in.removeLocked(a)
	}
	srv.log.Debug("published udp port closed")
}

func (a *inboundAssoc) touch() { a.last.Store(time.Now().UnixNano()) }

// gateway is the gateway address of a's family; the zero Addr when there is
// none.
func (in *inboundUDP) gateway(a netip.Addr) netip.Addr {
	if in == nil {
		return netip.Addr{}
	}
	if a.Is4() {
		return in.gw4
	}
	return in.gw6
}

// isGateway reports whether a is one of the stack's gateway addresses.
func (in *inboundUDP) isGateway(a netip.Addr) bool {
	return in != nil && a.IsValid() && (a == in.gw4 || a == in.gw6)
}

// handleRaw takes a whole IP packet from the device reader (Stack.intercept)
// and reports whether it took it: every unfragmented UDP datagram to a
// gateway address but DNS queries, which the stack answers there. A reply
// on an inbound association goes to its outside source; anything else is
// refused with ICMP port unreachable, as a host refuses a port nobody
// listens on: it must never become an outbound flow to the gateway.
// Fragments go on to gVisor, whose reassembled datagram comes back through
// deliver (udpTable.handleDatagram) when the stack carries UDP at all, and
// is refused by gVisor otherwise.
// verified is udpTable.handleRaw's: checksums the link checked already.
func (in *inboundUDP) handleRaw(pkt []byte, verified bool) bool {
	// The destination first: it rules out nearly every datagram at the
	// cost of a comparison.
	dst := packetDst(pkt)
	if !in.isGateway(dst) {
		return false
	}
	src, seg, hdrLen, ok := parseUDPPacket(pkt)
	if !ok {
		return false // a fragment, or not for us to judge: gVisor's
	}
	u := header.UDP(seg)
	if !verified && (u.Checksum() != 0 || src.Is6()) {
		if !u.IsChecksumValid(tcpipAddr(src), tcpipAddr(dst), checksum.Checksum(seg[udpHeaderLen:], 0)) {
			return true // corrupt: dropped, as a kernel would
		}
	}
	if !src.IsGlobalUnicast() && !src.IsPrivate() {
		return true // no source to answer (unspecified, multicast): dropped
	}
	to := netip.AddrPortFrom(dst, u.DestinationPort())
	if to.Port() == 53 && in.st.cfg.DNS != nil {
		return false // the stack's resolver answers on the gateway too
	}
	if in.deliver(netip.AddrPortFrom(src, u.SourcePort()), to, seg[udpHeaderLen:]) {
		return true
	}
	in.refused.Add(1)
	bp := udpBufs.Get().(*[]byte)
	in.st.link.writeRaw(buildPortUnreachable(*bp, dst, src, pkt[:min(len(pkt), hdrLen+udpHeaderLen)]))
	udpBufs.Put(bp)
	return true
}

// packetDst reads the destination address of an IPv4 or IPv6 packet from
// its fixed place (RFC 791, RFC 8200); the zero Addr when there is none.
func packetDst(pkt []byte) netip.Addr {
	switch {
	case len(pkt) >= ipv4HeaderLen && header.IPVersion(pkt) == header.IPv4Version:
		return netip.AddrFrom4([4]byte(pkt[16:20]))
	case len(pkt) >= ipv6HeaderLen && header.IPVersion(pkt) == header.IPv6Version:
		return netip.AddrFrom16([16]byte(pkt[24:40]))
	}
	return netip.Addr{}
}

// parseUDPPacket checks that pkt is a whole, unfragmented IPv4 or IPv6 (no
// extension headers) UDP datagram whose lengths agree, and returns its source
// address, its UDP segment and the IP header length.
func parseUDPPacket(pkt []byte) (src netip.Addr, seg []byte, hdrLen int, ok bool) {
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.UDPProtocolNumber) || ip.More() || ip.FragmentOffset() != 0 ||
			ip.CalculateChecksum() != 0xffff {
			return src, nil, 0, false
		}
		hdrLen = int(ip.HeaderLength())
		seg = pkt[hdrLen:ip.TotalLength()]
		src = netip.AddrFrom4(ip.SourceAddress().As4())
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.UDPProtocolNumber {
			return src, nil, 0, false
		}
		hdrLen = ipv6HeaderLen
		seg = pkt[hdrLen : hdrLen+int(ip.PayloadLength())]
		src = netip.AddrFrom16(ip.SourceAddress().As16())
	default:
		return src, nil, 0, false
	}
	if len(seg) < udpHeaderLen || int(header.UDP(seg).Length()) != len(seg) {
		return src, nil, 0, false
	}
	return src, seg, hdrLen, true
}

// deliver sends payload, a datagram from inside (src) to a gateway address
// and port (dst), to the outside source of the inbound association that
// holds the port, from its published socket. It reports false when no
// association holds it. It runs on the device reader.
func (in *inboundUDP) deliver(src, dst netip.AddrPort, payload []byte) bool {
	in.mu.Lock()
	a := in.byPort[dst.Port()]
	in.mu.Unlock()
	if a == nil || a.srv.gw != dst.Addr() {
		return false
	}
	// Replies from any port inside are accepted (a server may answer from
	// another socket, as TFTP does): the outside sees them all come from
	// the published port, the only one it knows.
	a.touch()
	if err := a.srv.write(payload, a.outside); err != nil {
		a.log.Debug("send to outside source failed", "from", src, "err", err)
	}
	return true
}

// handleICMPError takes an ICMP or ICMPv6 port unreachable sent from inside
// to a gateway address about a datagram of an inbound association (nothing
// listens on the published port behind the TUN), and reports whether it did.
// A UDP socket cannot pass the error on to the outside source, so it is
// counted and logged, and dropped.
func (in *inboundUDP) handleICMPError(pkt []byte) bool {
	dst := packetDst(pkt)
	if !in.isGateway(dst) {
		return false
	}
	var quote []byte // the offending IP packet, as much as the error carries
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.More() || ip.FragmentOffset() != 0 || ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) {
			return false
		}
		msg := header.ICMPv4(ip.Payload())
		if len(msg) < header.ICMPv4MinimumSize || msg.Type() != header.ICMPv4DstUnreachable || msg.Code() != header.ICMPv4PortUnreachable {
			return false
		}
		quote = msg[header.ICMPv4MinimumSize:]
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber {
			return false
		}
		msg := header.ICMPv6(ip.Payload())
		if len(msg) < header.ICMPv6ErrorHeaderSize || msg.Type() != header.ICMPv6DstUnreachable || msg.Code() != header.ICMPv6PortUnreachable {
			return false
		}
		quote = msg[header.ICMPv6ErrorHeaderSize:]
	default:
		return false
	}
	// The quoted datagram went from the gateway port of the association.
	hl := 0
	switch header.IPVersion(quote) {
	case header.IPv4Version:
		if len(quote) >= ipv4HeaderLen && header.IPv4(quote).Protocol() == uint8(header.UDPProtocolNumber) {
			hl = int(header.IPv4(quote).HeaderLength())
		}
	case header.IPv6Version:
		if len(quote) >= ipv6HeaderLen && header.IPv6(quote).TransportProtocol() == header.UDPProtocolNumber {
			hl = ipv6HeaderLen
		}
	}
	if hl == 0 || len(quote) < hl+udpHeaderLen {
		return false
	}
	port := header.UDP(quote[hl:]).SourcePort()
	in.mu.Lock()
	a := in.byPort[port]
	in.mu.Unlock()
	if a == nil || a.srv.gw != dst {
		return false
	}
	in.insideRefusals.Add(1)
	// Logged once per association: the inside may send many.
	if a.refusalLogged.CompareAndSwap(false, true) {
		a.log.Debug("nothing listens on the published port inside: datagrams refused")
	}
	return true
}

// inboundUDPFlows is the number of open inbound UDP associations.
func (st *Stack) inboundUDPFlows() int {
	st.inUDP.mu.Lock()
	defer st.inUDP.mu.Unlock()
	return len(st.inUDP.byPort)
}
