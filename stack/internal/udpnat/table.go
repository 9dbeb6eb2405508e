// Package udpnat is the stack's NAT table for UDP: one association per
// client source address and port (endpoint-independent mapping, RFC 4787
// REQ-1), whatever the destinations, each with an upstream packet conn of
// its own. Datagrams skip gVisor both ways: they are read from the device by
// the link's dispatcher and replies are built by hand (package packet).
// Direct associations, whose upstream is a kernel socket, send and receive
// in batches (batch.go) and pass ICMP errors on (icmperr.go).
package udpnat

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// UDPDialer opens the far side of a UDP association: a packet conn that
// sends to any "host:port" given to WriteTo and reports the true source of
// what it receives. net.ListenConfig and every proxy dialer that carries UDP
// fit it.
type UDPDialer interface {
	ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error)
}

// Writer carries packets built outside gVisor to the client: the stack's
// link endpoint.
type Writer interface {
	// WriteRaw writes a packet, as IP fragments if it is longer than the
	// MTU.
	WriteRaw(pkt []byte)
	// WriteDatagrams writes datagrams from src to dst, as few packets as
	// the device allows (as IP fragments when longer than the MTU), and
	// returns how many were too large for an IP packet.
	WriteDatagrams(src, dst netip.AddrPort, payloads [][]byte) (dropped int)
	// MTU is the link's MTU.
	MTU() uint32
}

// Names maps fake destinations (fake-IP DNS) to the names they stand for.
type Names interface {
	// IsFake reports whether addr is a fake address.
	IsFake(addr netip.Addr) bool
	// Lookup returns "name:port" for a fake dst, with a release function
	// to call when the association no longer sends there.
	Lookup(dst netip.AddrPort) (hostport string, release func(), err error)
}

// Config configures a Table. Every field but Names must be set.
type Config struct {
	Dialer      UDPDialer
	Writer      Writer
	Names       Names // nil: no fake addresses
	Timeout     time.Duration
	Max         int
	DialTimeout time.Duration
	Log         *slog.Logger
	// NextFlowID numbers the associations in logs, with the stack's other
	// flows.
	NextFlowID func() uint64
	// Route, if set, decides where each new association goes, from its
	// first destination and datagrams (route.go); nil sends every one
	// to Dialer.
	Route func(ctx context.Context, o *Opening) Route
	// EvictIdle is how long the least recently active association must
	// have been silent for a new one to evict it when the table is full;
	// a younger one stays and the new source's datagrams are dropped.
	// 0 evicts it whatever its age.
	EvictIdle time.Duration
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
	udpHeadroom = packet.Headroom
	// maxPacket is the longest IP packet.
	maxPacket = 1 << 16
	// maxSecondChances bounds how many associations eviction moves back to
	// the front for activity the list has not seen (replies) before it
	// evicts the oldest regardless.
	maxSecondChances = 8
	// relistAfter is how much later than its place in the list an
	// association's last activity must be to earn a second chance: the
	// send that listed it stamps it a moment later.
	relistAfter = time.Second
)

var udpBufs = sync.Pool{New: func() any { b := make([]byte, udpHeadroom+maxPacket); return &b }}

// Table is the NAT table for UDP: one association per client source
// address and port (endpoint-independent mapping, RFC 4787 REQ-1), whatever
// the destinations, so STUN, QUIC migration and peer-to-peer work.
type Table struct {
	cfg    Config
	ctx    context.Context // ends the associations
	cancel context.CancelFunc
	log    *slog.Logger

	mu     sync.Mutex
	assocs map[netip.AddrPort]*udpAssoc
	// lru lists the associations, most recently used first: eviction
	// takes the last in O(1). A datagram from the client moves its
	// association to the front under mu, which the lookup holds anyway;
	// a reply only stamps last, and eviction gives such an association a
	// second chance.
	lru    assocList
	closed bool
	wg     sync.WaitGroup // one per association

	// timeout and dialTimeout are Config.Timeout and Config.DialTimeout,
	// which SetTimeouts may change while associations run.
	timeout, dialTimeout atomic.Int64

	opened       atomic.Uint64 // associations created
	droppedQueue atomic.Uint64 // datagrams dropped while an association opened
	refusedFull  atomic.Uint64 // datagrams from new sources dropped: table full
	droppedBig   atomic.Uint64 // replies too large for the client's IP family

	// Batched I/O on kernel sockets (batch.go).
	tx           udpTx
	rxBatches    sync.Pool // *udpRxBatch
	smallBufOnce sync.Once
	sendCalls    atomic.Uint64 // sendmmsg calls
	sent         atomic.Uint64 // datagrams they sent
	droppedSend  atomic.Uint64 // datagrams a full or failing socket did not take
	recvCalls    atomic.Uint64 // recvmmsg calls that returned datagrams or an error
	received     atomic.Uint64 // datagrams they returned
	rxHeld       atomic.Int64  // receive batches borrowed now

	// Lines a client can trigger at will (issue 19), one per period each.
	warnFull, warnFailed, warnFDs, logNoName ratelog.Limiter
}

// udpAssoc is one client source's association.
type udpAssoc struct {
	t *Table
	// prev and next link the association in Table.lru; listed is its
	// last stamp when it was put at the front. Guarded by Table.mu.
	prev, next *udpAssoc
	listed     int64
	client     netip.AddrPort
	log        *slog.Logger
	last       atomic.Int64 // unix nanoseconds of the last datagram either way

	// For the live view (Flows): the flow id, when it opened (unix
	// nanoseconds), the destination of its first datagram, and the bytes
	// relayed each way, counted once per batch or datagram sent.
	id       uint64
	opened   int64
	firstDst netip.AddrPort
	up, down atomic.Uint64
	ctx      context.Context
	cancel   context.CancelFunc

	ready   chan struct{} // closed once conn is open or failed is set
	conn    net.PacketConn
	udpConn *net.UDPConn    // conn, when it is a real socket: the fast path
	rc      syscall.RawConn // udpConn's, for batched I/O
	family  int             // udpConn's address family
	failed  bool
	// route is how the association was routed, and dropping whether its
	// datagrams are dropped without a word; both written before ready is
	// closed.
	route    Route
	dropping bool

	// Guarded by t.tx.mu: this association's datagrams in the send queue,
	// and whether its socket refused UDP GSO.
	txQueued       bool
	noGSO          bool
	txHead, txTail int32

	fakes fakeDests // fake destinations sent to, by name
	// named is the first destination given by the name sniffed from the
	// association's first datagrams (Route.DialName), so a proxy is asked
	// for the name; nil otherwise. Set before ready is closed.
	named *fakeDest

	mu      sync.Mutex
	pending []pendingDatagram
	more    chan struct{} // a datagram joined pending (Opening.Datagram)
	quote   []byte        // the start of the client's first packet, for ICMP errors
}

type pendingDatagram struct {
	dst     netip.AddrPort
	payload []byte
}

// New makes a table whose associations live at most as long as ctx.
func New(ctx context.Context, cfg Config) *Table {
	t := &Table{cfg: cfg, log: cfg.Log, assocs: make(map[netip.AddrPort]*udpAssoc)}
	t.SetTimeouts(cfg.Timeout, cfg.DialTimeout)
	t.ctx, t.cancel = context.WithCancel(ctx)
	t.tx.init(t)
	return t
}

// Send carries one datagram from client to dst, opening the client's
// association if it has none; it reports false when it cannot (the table
// is closed), for the caller to refuse the datagram. A datagram from a new
// source that a full table cannot take (Config.EvictIdle) is dropped and
// counted, as a NAT whose table is full drops: the client retries, and gets
// in once an association idles out. An ICMP error instead would fail its
// connected socket for good, and would cost a packet for every one a flood
// sends. quote gives the start
// of the client's packet, kept for ICMP errors. With batched, the caller is
// a device dispatcher, and a datagram for a kernel socket may wait in the
// send queue until the end of its read (Flush).
func (t *Table) Send(client, dst netip.AddrPort, payload []byte, quote func() []byte, batched bool) bool {
	if d := dst.Addr(); d.IsMulticast() || d.IsUnspecified() || d == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
		return true // multicast and broadcast stay on the link, which is ours alone
	}
	a, created, full := t.lookup(client, dst)
	if full {
		n := t.refusedFull.Add(1)
		// Once per datagram of a flood: the line's arguments are built
		// only for the one line a period that is written.
		if suppressed, ok := t.warnFull.Allow(); ok {
			t.log.Warn("udp table full of active associations: dropping datagrams from new sources",
				"max", t.cfg.Max, "src", client, "dropped_total", n, "suppressed", suppressed)
		}
		return true
	}
	if a == nil {
		return false
	}
	if created {
		t.opened.Add(1)
		a.setQuote(quote())
	}
	a.send(dst, payload, batched)
	return true
}

// lookup finds the association of a client source, creating it (and evicting
// the least recently active one when the table is full) if there is none.
// full reports a new source refused because no association could be
// evicted (Config.EvictIdle).
func (t *Table) lookup(client, dst netip.AddrPort) (a *udpAssoc, created, full bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, false, false
	}
	if a, ok := t.assocs[client]; ok {
		t.lru.moveToFront(a)
		return a, false, false
	}
	if len(t.assocs) >= t.cfg.Max && !t.evictOldestLocked(time.Now().UnixNano()) {
		return nil, false, true
	}
	id := t.cfg.NextFlowID()
	a = &udpAssoc{
		t:        t,
		client:   client,
		id:       id,
		firstDst: dst,
		ready:    make(chan struct{}),
		more:     make(chan struct{}, 1),
		log:      t.log.With("flow", id, "proto", "udp", "src", client),
	}
	a.ctx, a.cancel = context.WithCancel(t.ctx)
	a.touch()
	a.opened = a.last.Load()
	t.assocs[client] = a
	t.lru.pushFront(a)
	t.wg.Go(a.run)
	return a, true, false
}

// evictOldestLocked ends the least recently active association and reports
// whether it did: not when that one was active less than Config.EvictIdle
// before now (unix nanoseconds). The list's last one is the least recently
// used by its client; one that has had replies since it was listed goes
// back to the front, a few at most.
//
// Refusing rather than evicting an active association is what keeps a
// client's established UDP traffic working while another floods the table
// from thousands of source ports: under pure LRU each flood datagram from a
// new port would evict the oldest entry, and the flood turns the whole
// table over every few milliseconds. An association silent for EvictIdle
// has most likely ended its exchange, and its source re-associates on its
// next datagram. DNS to the stack never enters this table.
func (t *Table) evictOldestLocked(now int64) bool {
	for range maxSecondChances {
		a := t.lru.back()
		if a == nil || a.last.Load() <= a.listed+int64(relistAfter) {
			break
		}
		t.lru.moveToFront(a)
	}
	oldest := t.lru.back()
	if oldest == nil {
		return true
	}
	if idle := t.cfg.EvictIdle; idle > 0 && now-oldest.last.Load() < int64(idle) {
		return false
	}
	t.removeLocked(oldest)
	oldest.log.Debug("udp table full, evicting the least recently active association", "max", t.cfg.Max)
	oldest.abort()
	return true
}

func (t *Table) remove(a *udpAssoc) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.assocs[a.client] == a {
		t.removeLocked(a)
	}
}

func (t *Table) removeLocked(a *udpAssoc) {
	delete(t.assocs, a.client)
	t.lru.remove(a)
}

// SetTimeouts changes how long an association may idle and how long
// opening one may take; zero keeps a value. An association waiting out the
// old idle timeout looks again when it passes.
func (t *Table) SetTimeouts(idle, dial time.Duration) {
	if idle > 0 {
		t.timeout.Store(int64(idle))
	}
	if dial > 0 {
		t.dialTimeout.Store(int64(dial))
	}
}

// Close ends every association and waits for their goroutines.
func (t *Table) Close() {
	t.mu.Lock()
	t.closed = true
	t.cancel()
	for _, a := range t.assocs {
		a.abort()
	}
	t.mu.Unlock()
	t.wg.Wait()
	t.log.Debug("udp totals", "sent", t.sent.Load(), "send_calls", t.sendCalls.Load(), "dropped_send", t.droppedSend.Load(),
		"received", t.received.Load(), "recv_calls", t.recvCalls.Load(), "dropped_big", t.droppedBig.Load(),
		"dropped_opening", t.droppedQueue.Load(), "refused_full", t.refusedFull.Load())
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

// Len is the number of open associations.
func (t *Table) Len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.assocs)
}
