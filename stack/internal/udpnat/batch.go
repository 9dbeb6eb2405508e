package udpnat

import (
	"encoding/binary"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// Batching for direct UDP associations, whose upstream is a kernel socket.
//
// Client to upstream: the device reader queues the datagrams of one device
// read (up to 16 packets, more datagrams when a client sends with
// UDP_SEGMENT) and flush, called once the read's packets are delivered,
// sends each association's datagrams with one sendmmsg. A socket whose
// buffer is full drops what it cannot take, as a kernel's send queue would:
// the reader never waits on an upstream.
//
// Upstream to client: each association reads with recvmmsg, up to
// udpRxBatchMax datagrams a call into buffers borrowed from a pool only
// while datagrams are there, so an idle association holds none, and hands
// each run of datagrams from one source to writeDatagrams, which writes
// them to the device together (as one USO packet where it can).

const (
	// udpMmsgMax bounds the messages of one sendmmsg.
	udpMmsgMax = 64
	// udpTxMaxQueued and udpTxMaxBytes bound what one batch queues; past
	// them the queue is sent before more is taken.
	udpTxMaxQueued = 1024
	udpTxMaxBytes  = 256 << 10
	// udpRxBatchMax bounds the datagrams one recvmmsg takes. Every slot
	// holds the largest datagram (it reaches the client as IP fragments),
	// so a batch is 2 MiB: an association borrows one from a pool only
	// while it has datagrams to deliver, and a batch made anew after a
	// collection is zeroed in full. Smaller slots would truncate, and so
	// lose, the first long datagram of an association.
	udpRxBatchMax = 32
	// udpSocketBuffer is the receive and send buffer asked for on upstream
	// sockets, so that a burst arriving while the association's goroutine
	// waits for the CPU is absorbed rather than dropped (the default,
	// net.core.rmem_default, is 208 KiB: 150 datagrams of 1400 bytes). It
	// is a limit, not an allocation: an idle socket costs nothing more.
	udpSocketBuffer = 4 << 20
)

// udpTx is the queue of datagrams on their way to upstream sockets. The
// device reader fills it; flush empties it. Other senders (gVisor's UDP
// handler, an association flushing what waited for its socket) queue and
// flush at once under the same lock.
//
// Datagrams of one association to one destination, of one size but for a
// shorter last one, leave as one message with UDP_SEGMENT (the kernel's UDP
// GSO, Linux 4.18): one trip through the upstream's IP stack for up to
// udpGSOMaxSegs datagrams, cut by the device or at the receiving socket.
type udpTx struct {
	t *Table

	mu     sync.Mutex
	buf    []byte      // the queued payloads, one after another
	queue  []udpQueued // in arrival order
	assocs []*udpAssoc // associations with datagrams queued, first come first

	// The sendmmsg being made: its messages, each with its datagrams'
	// vectors, address and UDP_SEGMENT control message; the association
	// it is for, read by sendF.
	hdrs      [udpMmsgMax]mmsghdr
	segs      [udpMmsgMax]int32 // datagrams in each message
	first     [udpMmsgMax]int32 // each message's first datagram in queue
	names     [udpMmsgMax]rawSockaddr
	cmsgs     [udpMmsgMax][udpCmsgRoom]byte
	iovs      [udpTxMaxIov]unix.Iovec
	cur       *udpAssoc
	count     int
	retryFrom int32            // set by send: resend from here, without GSO
	sendF     func(fd uintptr) // tx.send, bound once
}

const (
	// udpTxMaxIov bounds the datagrams of one sendmmsg.
	udpTxMaxIov = 512
	// udpGSOMaxSegs is UDP_MAX_SEGMENTS of the oldest kernels with
	// UDP_SEGMENT (64; later ones take 128).
	udpGSOMaxSegs = 64
	// udpGSOMaxBytes bounds the payload of one GSO message: one IPv6 UDP
	// datagram's.
	udpGSOMaxBytes = 0xffff - packet.IPv6HeaderLen - packet.UDPHeaderLen
	// udpGSOMaxSize is the largest datagram sent with GSO: each segment,
	// with its headers, must fit the route's MTU or the send fails
	// (EINVAL, udp_send_skb), and the MTU is not known here; 1500 is the
	// common one.
	udpGSOMaxSize = 1500 - packet.IPv6HeaderLen - packet.UDPHeaderLen
	// udpCmsgRoom holds one UDP_SEGMENT control message (CmsgSpace(2)).
	udpCmsgRoom = 32
)

// udpQueued is one datagram in udpTx.buf, linked to the next datagram of
// the same association.
type udpQueued struct {
	dst  netip.AddrPort
	off  int32
	n    int32
	next int32 // index in udpTx.queue; -1 ends the list
}

func (tx *udpTx) init(t *Table) {
	tx.t = t
	tx.sendF = tx.send
}

// add queues a copy of payload for a's socket, to dst. The caller holds
// tx.mu; a's socket is a kernel socket and open.
func (tx *udpTx) add(a *udpAssoc, dst netip.AddrPort, payload []byte) {
	if len(tx.queue) >= udpTxMaxQueued || len(tx.queue) > 0 && len(tx.buf)+len(payload) > udpTxMaxBytes {
		tx.flushLocked()
	}
	off := len(tx.buf)
	tx.buf = append(tx.buf, payload...)
	i := int32(len(tx.queue))
	tx.queue = append(tx.queue, udpQueued{dst: dst, off: int32(off), n: int32(len(payload)), next: -1})
	if a.txQueued {
		tx.queue[a.txTail].next = i
	} else {
		a.txQueued, a.txHead = true, i
		tx.assocs = append(tx.assocs, a)
	}
	a.txTail = i
}

// sendNow sends one datagram on a's kernel socket, with whatever the reader
// has queued.
func (tx *udpTx) sendNow(a *udpAssoc, dst netip.AddrPort, payload []byte) {
	tx.mu.Lock()
	defer tx.mu.Unlock()
	tx.add(a, dst, payload)
	tx.flushLocked()
}

// Flush sends everything queued: one sendmmsg per association, or a few
// when many datagrams wait.
func (t *Table) Flush() {
	t.tx.mu.Lock()
	defer t.tx.mu.Unlock()
	t.tx.flushLocked()
}

func (tx *udpTx) flushLocked() {
	for _, a := range tx.assocs {
		tx.sendQueued(a)
		a.txQueued = false
	}
	clear(tx.assocs)
	tx.assocs, tx.queue, tx.buf = tx.assocs[:0], tx.queue[:0], tx.buf[:0]
	tx.cur = nil
}

// sendQueued sends a's queued datagrams.
func (tx *udpTx) sendQueued(a *udpAssoc) {
	a.touch() // once for the batch, not for every datagram
	for i := a.txHead; i >= 0; {
		n, niov := 0, 0
		for i >= 0 && n < udpMmsgMax && niov < len(tx.iovs) {
			q := tx.queue[i]
			namelen := putSockaddr(&tx.names[n], a.family, q.dst)
			if namelen == 0 {
				tx.t.droppedSend.Add(1) // an IPv6 destination for an IPv4-only socket
				i = q.next
				continue
			}
			// The run that leaves as one message: q, then datagrams
			// to the same destination and of q's size, the last of
			// them maybe shorter but not empty.
			k, total, next := 1, q.n, q.next
			if !a.noGSO && q.n > 0 && q.n <= udpGSOMaxSize {
				for next >= 0 && k < udpGSOMaxSegs && niov+k < len(tx.iovs) {
					r := &tx.queue[next]
					// An empty datagram would vanish in the cut.
					if r.dst != q.dst || r.n > q.n || r.n == 0 || total+r.n > udpGSOMaxBytes {
						break
					}
					k, total, next = k+1, total+r.n, r.next
					if r.n < q.n {
						break
					}
				}
			}
			iovs := tx.iovs[niov : niov+k]
			for m, j := 0, i; m < k; m, j = m+1, tx.queue[j].next {
				d := &tx.queue[j]
				iovs[m].Base = unsafe.SliceData(tx.buf[d.off : d.off+d.n])
				iovs[m].SetLen(int(d.n))
			}
			h := &tx.hdrs[n]
			*h = mmsghdr{}
			h.hdr.Name, h.hdr.Namelen = &tx.names[n][0], namelen
			h.hdr.Iov = &iovs[0]
			h.hdr.SetIovlen(k)
			if k > 1 {
				putUDPSegment(tx.cmsgs[n][:], uint16(q.n))
				h.hdr.Control = &tx.cmsgs[n][0]
				h.hdr.SetControllen(unix.CmsgSpace(2))
			}
			tx.segs[n], tx.first[n] = int32(k), i
			n, niov, i = n+1, niov+k, next
		}
		if n == 0 {
			continue
		}
		tx.cur, tx.count, tx.retryFrom = a, n, -1
		if err := a.rc.Control(tx.sendF); err != nil {
			// Closed: the association is ending.
			tx.t.droppedSend.Add(uint64(tx.datagrams(0, n)))
		}
		if tx.retryFrom >= 0 {
			i = tx.retryFrom // the kernel refused GSO: now without
		}
	}
}

// datagrams counts the datagrams in messages [from, to).
func (tx *udpTx) datagrams(from, to int) int {
	n := 0
	for _, k := range tx.segs[from:to] {
		n += int(k)
	}
	return n
}

// putUDPSegment writes a UDP_SEGMENT control message with segment size
// size into b.
func putUDPSegment(b []byte, size uint16) {
	h := (*unix.Cmsghdr)(unsafe.Pointer(&b[0]))
	h.Level = unix.IPPROTO_UDP
	h.Type = unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(b[unix.CmsgLen(0):], size)
}

// send makes the sendmmsg calls for tx.hdrs[:tx.count] on fd, the socket
// of tx.cur. Called through RawConn.Control, so fd stays open meanwhile.
func (tx *udpTx) send(fd uintptr) {
	t, a := tx.t, tx.cur
	relayed := false
	for m := 0; m < tx.count; {
		n, errno := sendmmsg(fd, tx.hdrs[m:tx.count], unix.MSG_DONTWAIT)
		t.sendCalls.Add(1)
		switch {
		case errno == 0 && n > 0:
			t.sent.Add(uint64(tx.datagrams(m, m+n)))
			// The kernel wrote each message's bytes sent into its header.
			var sent uint64
			for _, h := range tx.hdrs[m : m+n] {
				sent += uint64(h.n)
			}
			a.up.Add(sent)
			m += n
		case errno == unix.EINTR:
		case errno == unix.EAGAIN:
			// The socket's send buffer is full: drop the rest, as the
			// kernel would, rather than hold up the device reader.
			t.droppedSend.Add(uint64(tx.datagrams(m, tx.count)))
			return
		case isICMPError(errno) && !relayed && a.relayICMPErrorsFD(fd) > 0:
			// The error was the report of an ICMP error for an earlier
			// datagram (IP_RECVERR), now passed on; this message was
			// not sent, so try it again, once.
			relayed = true
		case tx.segs[m] > 1 && (errno == unix.EINVAL || errno == unix.EIO || errno == unix.EMSGSIZE || errno == unix.ENOPROTOOPT):
			// No GSO for this socket (an MTU below the segment size,
			// a route through IPsec, an old kernel): the message and
			// those after it go again, one datagram each.
			a.noGSO = true
			tx.retryFrom = tx.first[m]
			if a.log.Enabled(a.ctx, slog.LevelDebug) {
				a.log.Debug("udp gso refused, sending datagram by datagram", "err", os.NewSyscallError("sendmmsg", errno))
			}
			return
		default:
			if a.log.Enabled(a.ctx, slog.LevelDebug) {
				h := &tx.hdrs[m].hdr
				a.log.Debug("udp send failed", "dst", sockaddrAddrPort((*rawSockaddr)(unsafe.Pointer(h.Name)), h.Namelen),
					"err", os.NewSyscallError("sendmmsg", errno))
			}
			t.droppedSend.Add(uint64(tx.segs[m]))
			m++
		}
	}
}

// udpRxBatch is what one recvmmsg reads into: udpRxBatchMax buffers of
// rxSlot bytes with their headers and source addresses.
type udpRxBatch struct {
	buf      []byte
	hdrs     []mmsghdr
	iovs     []unix.Iovec
	names    []rawSockaddr
	payloads [][]byte // for writeDatagrams
}

// rxSlot is the receive buffer per datagram: the largest UDP payload, so
// that no datagram is truncated (a kernel socket's recvmmsg cannot say how
// long the next datagram is before it has taken it). Datagrams longer than
// the client's family carries are dropped and counted by writeRun.
var rxSlot = packet.MaxUDPPayload(netip.IPv6Unspecified())

func (t *Table) getRxBatch() *udpRxBatch {
	t.rxHeld.Add(1)
	if b, ok := t.rxBatches.Get().(*udpRxBatch); ok {
		return b
	}
	const count = udpRxBatchMax
	return &udpRxBatch{
		buf:      make([]byte, count*rxSlot),
		hdrs:     make([]mmsghdr, count),
		iovs:     make([]unix.Iovec, count),
		names:    make([]rawSockaddr, count),
		payloads: make([][]byte, 0, count),
	}
}

// recv reads what datagrams the socket fd has, up to the batch's room,
// without waiting. Datagram i is then b.datagram(i), from b.source(i).
func (b *udpRxBatch) recv(fd uintptr) (int, unix.Errno) {
	for i := range b.hdrs {
		b.hdrs[i].setBuffer(&b.iovs[i], b.buf[i*rxSlot:(i+1)*rxSlot], &b.names[i], unix.SizeofSockaddrInet6)
	}
	for {
		n, errno := recvmmsg(fd, b.hdrs, unix.MSG_DONTWAIT)
		if errno != unix.EINTR {
			return n, errno
		}
	}
}

// datagram returns the payload of datagram i, and false when it was longer
// than the batch's slot and so truncated.
func (b *udpRxBatch) datagram(i int) ([]byte, bool) {
	h := &b.hdrs[i]
	return b.buf[i*rxSlot : i*rxSlot+int(h.n)], h.hdr.Flags&unix.MSG_TRUNC == 0
}

// source returns the source address of datagram i.
func (b *udpRxBatch) source(i int) netip.AddrPort {
	return sockaddrAddrPort(&b.names[i], b.hdrs[i].hdr.Namelen)
}

func (t *Table) putRxBatch(b *udpRxBatch) {
	t.rxHeld.Add(-1)
	t.rxBatches.Put(b)
}

// udpReceiver reads an association's kernel socket in batches. It lives as
// long as the association's goroutine; its batch is borrowed only from a
// successful read until the datagrams are written to the client.
type udpReceiver struct {
	a     *udpAssoc
	readF func(fd uintptr) bool // r.read, bound once
	b     *udpRxBatch
	n     int
	errno unix.Errno
}

func newUDPReceiver(a *udpAssoc) *udpReceiver {
	r := &udpReceiver{a: a}
	r.readF = r.read
	return r
}

// read is called by the runtime poller when the socket may be readable; it
// returns false, holding nothing, when it was not.
func (r *udpReceiver) read(fd uintptr) bool {
	b := r.a.t.getRxBatch()
	n, errno := b.recv(fd)
	if errno == unix.EAGAIN {
		r.a.t.putRxBatch(b)
		return false
	}
	r.b, r.n, r.errno = b, n, errno
	return true
}

// receive reads one batch of datagrams and writes them to the client. It
// waits until there is one, the read deadline passes or the socket closes.
func (r *udpReceiver) receive() error {
	err := r.a.rc.Read(r.readF)
	b, n, errno := r.b, r.n, r.errno
	r.b = nil
	if b == nil {
		return err // the deadline passed or the socket closed
	}
	defer r.a.t.putRxBatch(b)
	r.a.t.recvCalls.Add(1)
	if errno != 0 {
		if isICMPError(errno) {
			// An ICMP error for an earlier datagram: pass it on to the
			// client, and go on.
			r.a.relayICMPErrors()
			return nil
		}
		return os.NewSyscallError("recvmmsg", errno)
	}
	r.a.deliver(b, n)
	return nil
}

// deliver writes the n datagrams read into b to the client, each run from
// one source together.
func (a *udpAssoc) deliver(b *udpRxBatch, n int) {
	run := b.payloads[:0]
	var from netip.AddrPort
	var bytes uint64
	for i := range n {
		p, whole := b.datagram(i)
		if !whole {
			a.t.droppedBig.Add(1)
			continue
		}
		bytes += uint64(len(p))
		src := b.source(i)
		if src != from && len(run) > 0 {
			a.writeRun(from, run)
			run = run[:0]
		}
		from = src
		run = append(run, p)
	}
	if len(run) > 0 {
		a.writeRun(from, run)
	}
	a.t.received.Add(uint64(n))
	a.down.Add(bytes)
}

// writeRun writes datagrams from one source to the client.
func (a *udpAssoc) writeRun(from netip.AddrPort, payloads [][]byte) {
	if !a.fakes.empty() {
		if fake, ok := a.fakes.replySource(nil, from.Port()); ok {
			from = fake
		}
	}
	if !from.IsValid() || from.Addr().Is4() != a.client.Addr().Is4() {
		return // a source the client's address family cannot see
	}
	if dropped := a.t.cfg.Writer.WriteDatagrams(from, a.client, payloads); dropped > 0 {
		a.t.droppedBig.Add(uint64(dropped))
	}
}

// openKernelSocket prepares a direct association's socket for batched I/O:
// its family, ICMP errors, and buffers big enough for bursts.
func (a *udpAssoc) openKernelSocket() error {
	rc, err := a.udpConn.SyscallConn()
	if err != nil {
		return err
	}
	a.rc = rc
	a.family = unix.AF_INET6
	var rcvbuf int
	err = rc.Control(func(fd uintptr) {
		if f, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DOMAIN); err == nil {
			a.family = f
		}
		_ = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_RECVERR, 1)
		if a.family == unix.AF_INET6 {
			_ = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_RECVERR, 1)
		}
		// Past net.core.rmem_max and wmem_max only with CAP_NET_ADMIN;
		// without it the kernel caps the plain options silently.
		for _, o := range [...][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], udpSocketBuffer) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], udpSocketBuffer)
			}
		}
		rcvbuf, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUF)
	})
	if err != nil {
		return err
	}
	// The kernel reports twice what it grants, for its bookkeeping. Below
	// 1 MiB a burst at 1 Gb/s overflows the socket measurably.
	if rcvbuf/2 < 1<<20 {
		a.t.smallBufOnce.Do(func() {
			a.t.log.Warn("udp socket receive buffers are capped below what bursts need; raise net.core.rmem_max or grant CAP_NET_ADMIN",
				"want", udpSocketBuffer, "got", rcvbuf/2)
		})
	}
	return nil
}
