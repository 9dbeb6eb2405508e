// Package inbound serves published ports from netstackd's side into the
// TUN. For UDP, every outside source that sends to a published socket gets
// an inbound association; for TCP the stack dials through gVisor itself.
package inbound

import (
	"container/list"
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

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// Published UDP ports. Every outside source that sends to a published socket
// gets an inbound association: its datagrams enter the TUN from a port of
// its own on the gateway address (Config.Gateway4 or Gateway6) to the
// published port behind the TUN, and what comes out of the TUN to that
// gateway port goes back to the outside source from the published socket,
// as slirp4netns and pasta do it. The per-association port lets replies to
// different outside sources be told apart.
//
// As for outbound UDP (package udpnat), the packets are built by hand
// (package packet) and bypass gVisor: a map entry per association is cheaper than a gVisor
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
	udpHeadroom     = packet.Headroom
	// maxSecondChances bounds how many associations eviction sends back to
	// the front for replies the list has not seen, before it evicts the
	// last regardless; relistAfter is how much later than its place in
	// the list a reply must be to count.
	maxSecondChances = 8
	relistAfter      = time.Second
)

var udpBufs = sync.Pool{New: func() any { b := make([]byte, udpHeadroom+1<<16); return &b }}

// Writer carries packets built outside gVisor into the TUN: the stack's
// link endpoint.
type Writer interface {
	// WriteRaw writes a packet, as IP fragments if it is longer than the
	// MTU.
	WriteRaw(pkt []byte)
	MTU() uint32
}

// Config configures a UDP table.
type Config struct {
	// Gateway4 and Gateway6 are the addresses inbound datagrams come
	// from; a zero one serves no published port of its family.
	Gateway4, Gateway6 netip.Addr
	Timeout            time.Duration // an idle association ends
	Max                int           // associations; the oldest is evicted
	Writer             Writer
	Log                *slog.Logger
	NextFlowID         func() uint64
}

// UDP is the table of inbound associations of every published UDP port of a
// stack: they share the gateway ports.
type UDP struct {
	ctx      context.Context // ends every Serve
	w        Writer
	log      *slog.Logger
	nextFlow func() uint64
	gw4, gw6 netip.Addr
	timeout  time.Duration
	max      int // associations, at most inboundPorts

	mu       sync.Mutex
	byPort   map[uint16]*inboundAssoc // gateway port → association
	nextPort uint16                   // where the search for a free port starts
	// lru lists the associations, the most recently used by their outside
	// source first: eviction takes the last in O(1). A reply from inside
	// only stamps last, and eviction gives such an association a second
	// chance.
	lru list.List

	droppedBig     atomic.Uint64 // datagrams too large for the inside's IP family
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
	// elem is the association's place in UDP.lru, and listed its last
	// stamp when it was put at the front; guarded by UDP.mu.
	elem   *list.Element
	listed int64

	refusalLogged atomic.Bool // an ICMP port unreachable from inside was logged

	// For the live view (Flows): the flow id, when the association opened
	// (unix nanoseconds), and the payload bytes relayed each way.
	id       uint64
	opened   int64
	up, down atomic.Uint64
}

// NewUDP makes the table; ctx ends every Serve.
func NewUDP(ctx context.Context, cfg Config) *UDP {
	return &UDP{
		ctx:      ctx,
		w:        cfg.Writer,
		log:      cfg.Log,
		nextFlow: cfg.NextFlowID,
		gw4:      cfg.Gateway4,
		gw6:      cfg.Gateway6,
		timeout:  cfg.Timeout,
		max:      max(min(cfg.Max, inboundPorts), 1),
		byPort:   make(map[uint16]*inboundAssoc),
		nextPort: inboundPortFirst,
	}
}

// Serve publishes a UDP port: it relays the datagrams that pc, a socket on
// netstackd's side, receives to dst behind the TUN, and the replies back to
// each sender, until pc is closed or the table's context ends. It blocks
// until then and returns nil; an error means that pc failed or that there
// is no gateway address of dst's family. pc stays the caller's to close.
func (in *UDP) Serve(pc net.PacketConn, dst netip.AddrPort) error {
	gw := in.Gateway(dst.Addr())
	if !gw.IsValid() {
		return fmt.Errorf("publish udp %s to %s: no gateway address of its family", pc.LocalAddr(), dst)
	}
	srv := &inboundServer{
		pc:     pc,
		udp:    kernelSocket(pc),
		dst:    dst,
		gw:     gw,
		log:    in.log.With("proto", "udp", "dst", dst, "via", "publish", "listen", pc.LocalAddr().String()),
		assocs: make(map[netip.AddrPort]*inboundAssoc),
	}
	defer in.removeServer(srv)
	// A blocked read only wakes for a deadline or a close.
	stop := context.AfterFunc(in.ctx, func() { _ = pc.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	return in.serve(srv)
}

// kernelSocket is c when it is a plain kernel UDP socket, or the one it
// wraps (proxy.Direct's conns say so with KernelSocket); else nil.
func kernelSocket(c net.PacketConn) *net.UDPConn {
	switch c := c.(type) {
	case *net.UDPConn:
		return c
	case interface{ KernelSocket() *net.UDPConn }:
		return c.KernelSocket()
	}
	return nil
}

// serve reads datagrams from the published socket and sends each into the
// TUN; between reads it sweeps idle associations.
func (in *UDP) serve(srv *inboundServer) error {
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
		if in.ctx.Err() != nil {
			return nil
		}
		n, from, err := srv.read(buf[udpHeadroom:])
		if err != nil {
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				if in.ctx.Err() != nil {
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
func (in *UDP) forward(srv *inboundServer, from netip.AddrPort, buf []byte, n int) {
	if !from.IsValid() {
		return
	}
	hl := packet.IPHeaderLen(srv.dst.Addr())
	if n > packet.MaxUDPPayload(srv.dst.Addr()) {
		// An IPv6 outside source sent more than IPv4 carries.
		in.droppedBig.Add(1)
		return
	}
	a := in.lookup(srv, from)
	a.touch()
	start := udpHeadroom - hl - packet.UDPHeaderLen
	pkt := packet.BuildUDP(buf[start:], netip.AddrPortFrom(srv.gw, a.port), srv.dst, buf[udpHeadroom:udpHeadroom+n])
	in.w.WriteRaw(pkt)
	a.up.Add(uint64(n))
}

// lookup finds the association of an outside source, creating it (and
// evicting the least recently active one when the table is full) if there
// is none.
func (in *UDP) lookup(srv *inboundServer, from netip.AddrPort) *inboundAssoc {
	in.mu.Lock()
	defer in.mu.Unlock()
	if a, ok := srv.assocs[from]; ok {
		in.lru.MoveToFront(a.elem)
		a.listed = a.last.Load()
		return a
	}
	if len(in.byPort) >= in.max {
		in.evictOldestLocked()
	}
	a := &inboundAssoc{srv: srv, outside: from, port: in.freePortLocked(), id: in.nextFlow()}
	a.log = srv.log.With("flow", a.id, "src", from, "gateway", netip.AddrPortFrom(srv.gw, a.port))
	a.touch()
	a.opened = a.last.Load()
	a.listed = a.last.Load()
	a.elem = in.lru.PushFront(a)
	srv.assocs[from] = a
	in.byPort[a.port] = a
	a.log.Debug("inbound udp association open")
	return a
}

// freePortLocked returns a gateway port no association holds, searching on
// from the last one handed out so that a port just freed is not reused at
// once (late replies to it would reach the wrong source). There is one:
// the table holds fewer than inboundPorts associations.
func (in *UDP) freePortLocked() uint16 {
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

// evictOldestLocked ends the least recently active association: the list's
// last, unless replies from inside came after it was listed, which send it
// back to the front, a few at most.
func (in *UDP) evictOldestLocked() {
	for range maxSecondChances {
		e := in.lru.Back()
		if e == nil {
			return
		}
		a := e.Value.(*inboundAssoc)
		if a.last.Load() <= a.listed+int64(relistAfter) {
			break
		}
		in.lru.MoveToFront(e)
		a.listed = a.last.Load()
	}
	if e := in.lru.Back(); e != nil {
		oldest := e.Value.(*inboundAssoc)
		in.removeLocked(oldest)
		in.evicted.Add(1)
		oldest.log.Debug("inbound udp table full, evicting the least recently active association", "max", in.max)
	}
}

func (in *UDP) removeLocked(a *inboundAssoc) {
	delete(a.srv.assocs, a.outside)
	if in.byPort[a.port] == a {
		delete(in.byPort, a.port)
	}
	if a.elem != nil {
		in.lru.Remove(a.elem)
		a.elem = nil
	}
}

// sweep ends the associations of srv idle for the timeout.
func (in *UDP) sweep(srv *inboundServer) {
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
func (in *UDP) removeServer(srv *inboundServer) {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, a := range srv.assocs {
		in.removeLocked(a)
	}
	srv.log.Debug("published udp port closed")
}

func (a *inboundAssoc) touch() { a.last.Store(time.Now().UnixNano()) }

// Gateway is the gateway address of a's family; the zero Addr when there is
// none.
func (in *UDP) Gateway(a netip.Addr) netip.Addr {
	if a.Is4() {
		return in.gw4
	}
	return in.gw6
}

// IsGateway reports whether a is one of the stack's gateway addresses.
func (in *UDP) IsGateway(a netip.Addr) bool {
	return a.IsValid() && (a == in.gw4 || a == in.gw6)
}

// Receive takes a datagram from inside to a gateway address, read whole
// from the device: a reply on an inbound association goes to its outside
// source; anything else is refused with ICMP port unreachable, as a host
// refuses a port nobody listens on. It must never become an outbound flow
// to the gateway. The caller has checked that u.Dst is a gateway address
// and not one the stack answers itself (DNS).
func (in *UDP) Receive(u packet.UDP) {
	src := u.Src.Addr()
	if !src.IsGlobalUnicast() && !src.IsPrivate() {
		return // no source to answer (unspecified, multicast): dropped
	}
	if in.Deliver(u.Src, u.Dst, u.Payload) {
		return
	}
	in.refused.Add(1)
	bp := udpBufs.Get().(*[]byte)
	in.w.WriteRaw(packet.BuildPortUnreachable(*bp, u.Dst.Addr(), src, u.Head))
	udpBufs.Put(bp)
}

// Deliver sends payload, a datagram from inside (src) to a gateway address
// and port (dst), to the outside source of the inbound association that
// holds the port, from its published socket. It reports false when no
// association holds it. It runs on the device reader.
func (in *UDP) Deliver(src, dst netip.AddrPort, payload []byte) bool {
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
		return true
	}
	a.down.Add(uint64(len(payload)))
	return true
}

// HandleICMPError takes an ICMP or ICMPv6 port unreachable sent from inside
// to a gateway address about a datagram of an inbound association (nothing
// listens on the published port behind the TUN), and reports whether it did.
// A UDP socket cannot pass the error on to the outside source, so it is
// counted and logged, and dropped.
func (in *UDP) HandleICMPError(pkt []byte) bool {
	if !in.IsGateway(packet.Dst(pkt)) {
		return false
	}
	dst, port, ok := packet.PortUnreachableQuote(pkt)
	if !ok {
		return false
	}
	// The quoted datagram went from the gateway port of the association.
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

// Len is the number of open inbound associations.
func (in *UDP) Len() int {
	in.mu.Lock()
	defer in.mu.Unlock()
	return len(in.byPort)
}

// Stats are the table's counters since it was made.
type Stats struct {
	DroppedBig     uint64 // datagrams too large for the inside's IP family
	Refused        uint64 // datagrams to a gateway port with no association
	Evicted        uint64 // associations evicted because the table was full
	InsideRefusals uint64 // ICMP port unreachable from inside, dropped
}

// Stats reads the counters.
func (in *UDP) Stats() Stats {
	return Stats{DroppedBig: in.droppedBig.Load(), Refused: in.refused.Load(), Evicted: in.evicted.Load(), InsideRefusals: in.insideRefusals.Load()}
}
