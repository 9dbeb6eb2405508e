// Package frag reassembles the IP fragments a client sends into the TUN and
// cuts the packets the stack sends back into fragments that fit the TUN's
// MTU. It works on bytes alone, like package packet, so that every path of
// the stack (the UDP NAT, published ports, ping, gVisor) sees whole packets
// and needs no reassembly of its own.
//
// Reassembly follows RFC 791 and RFC 8200 section 4.5, with the limits RFC
// 8900 asks of a reassembler facing untrusted input:
//   - a fragment that overlaps another of its packet discards the whole
//     packet (RFC 5722), for IPv4 too, as Linux does; an exact duplicate
//     is ignored;
//   - a packet that would be longer than an IP header can describe is
//     discarded, as is one whose fragments disagree on where it ends;
//   - the memory held is bounded in total and per source, the oldest
//     packet being evicted to make room (so a flooding source evicts its
//     own packets first);
//   - an incomplete packet is discarded after a timeout.
//
// Expired packets are discarded when the next fragment arrives, and by a
// timer set for the oldest packet, so that what a flood left is given back
// even if no fragment follows; Close stops the timer.
package frag

import (
	"encoding/binary"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"
)

// Defaults of Config.
const (
	// DefaultMaxBytes is Linux's net.ipv4.ipfrag_high_thresh (4 MiB, which
	// Linux applies to each family; ours covers both): room for about 60
	// datagrams of 64 KiB in flight, far more than a TUN's clients need.
	DefaultMaxBytes = 4 << 20
	// DefaultMaxBytesPerSource lets one source hold a quarter of the total:
	// about fifteen 64 KiB datagrams in flight.
	DefaultMaxBytesPerSource = DefaultMaxBytes / 4
	// DefaultTimeout is Linux's net.ipv4.ipfrag_time; RFC 8200 allows an
	// IPv6 packet up to 60 seconds, and a shorter wait only bounds better.
	DefaultTimeout = 30 * time.Second
)

// Costs charged besides the fragments' bytes, so that tiny fragments cannot
// hold much more memory than the bounds say: the rough size of a packet
// being reassembled and of a fragment's bookkeeping.
const (
	packetOverhead   = 256
	fragmentOverhead = 64
)

// maxFragments bounds the fragments of one packet: a 64 KiB datagram cut at
// IPv4's minimum MTU of 68 bytes (48 bytes each) makes 1366.
const maxFragments = 2048

// Config bounds a Reassembler. The zero value is the defaults.
type Config struct {
	// MaxBytes bounds the memory held by incomplete packets, all sources
	// together; 0 means DefaultMaxBytes.
	MaxBytes int
	// MaxBytesPerSource bounds what one source address may hold; 0 means
	// DefaultMaxBytesPerSource.
	MaxBytesPerSource int
	// Timeout discards a packet whose fragments have not all arrived this
	// long after its first; 0 means DefaultTimeout.
	Timeout time.Duration
	// Now tells the time; nil means time.Now. Tests move it.
	Now func() time.Time
}

// Result is what Process did with a packet.
type Result int

const (
	// NotFragment: the packet is whole (or not IP); Process left it alone.
	NotFragment Result = iota
	// Held: a fragment was kept, its packet still incomplete.
	Held
	// Dropped: the fragment was refused, and with it, if it broke the
	// rules, the packet it belonged to.
	Dropped
	// Reassembled: the fragment completed its packet, which Process
	// returned.
	Reassembled
)

// Reassembler reassembles fragmented IPv4 and IPv6 packets. It is safe for
// concurrent use.
type Reassembler struct {
	cfg Config

	mu      sync.Mutex
	packets map[key]*packet
	sources map[netip.Addr]*source
	// oldest and newest end the list of packets in order of arrival of
	// their first fragment: expiry and eviction take from oldest.
	oldest, newest *packet
	bytes          int
	// timer discards expired packets when no fragment arrives to do it;
	// it is set while packets are held. closed stops it for good.
	timer  *time.Timer
	closed bool

	reassembled atomic.Uint64
	dropped     atomic.Uint64 // invalid fragments, and packets discarded for breaking the rules
	evicted     atomic.Uint64 // packets discarded to stay within the bounds
	timedOut    atomic.Uint64
}

// key identifies the packet a fragment belongs to: RFC 791 section 2.3 for
// IPv4 (with the protocol), RFC 8200 section 4.5 for IPv6 (without).
type key struct {
	src, dst netip.Addr
	id       uint32
	proto    uint8
}

// source is what one source address holds, and its packets in order of
// arrival.
type source struct {
	bytes          int
	oldest, newest *packet
}

// packet is an incomplete packet.
type packet struct {
	key     key
	src     *source
	created time.Time
	// prev and next link the packet in the Reassembler's list; sprev and
	// snext in its source's.
	prev, next   *packet
	sprev, snext *packet

	frags []fragment // sorted by offset, never overlapping
	// head is the first fragment's unfragmentable part: the IPv4 header,
	// or the IPv6 header and the extension headers before the Fragment
	// header; nextHeader is where, in head, the byte naming the Fragment
	// header is (IPv6).
	head       []byte
	nextHeader int
	proto      uint8 // IPv6: the first fragment's upper-layer protocol
	end        int   // the length of the reassembled payload; -1 until the last fragment arrives
	have       int   // the payload bytes held
	bytes      int   // what the packet is charged
}

type fragment struct {
	off  int
	data []byte
	buf  *[]byte // the pooled buffer data is in, if it came from the pool
}

// fragBufSize is the size of the pooled fragment buffers: a fragment of a
// 1500-byte link fits. Fragments of at most fragBufSmall bytes get buffers
// of their own size, so that tiny fragments are charged what they hold.
const (
	fragBufSize  = 2048
	fragBufSmall = 512
)

var fragBufs = sync.Pool{New: func() any { b := make([]byte, fragBufSize); return &b }}

// New makes a Reassembler with cfg's bounds.
func New(cfg Config) *Reassembler {
	if cfg.MaxBytes <= 0 {
		cfg.MaxBytes = DefaultMaxBytes
	}
	if cfg.MaxBytesPerSource <= 0 {
		cfg.MaxBytesPerSource = DefaultMaxBytesPerSource
	}
	cfg.MaxBytesPerSource = min(cfg.MaxBytesPerSource, cfg.MaxBytes)
	if cfg.Timeout <= 0 {
		cfg.Timeout = DefaultTimeout
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Reassembler{cfg: cfg, packets: make(map[key]*packet), sources: make(map[netip.Addr]*source)}
}

// MaxPacket is the longest packet Process returns: an IPv6 header and the
// most its payload length can describe.
const MaxPacket = 40 + 0xffff

// Process takes one packet read from the device. A fragment is kept until
// its packet is complete; the fragment that completes it makes Process
// write the whole packet into out (which needs room for MaxPacket bytes)
// and return it. An IPv6 packet that is its own only fragment (RFC 6946) is
// returned at once, without its Fragment header. The IPv4 header checksum
// of a fragment must have been verified; the reassembled packet's is set.
func (r *Reassembler) Process(pkt, out []byte) ([]byte, Result) {
	f, ok := parse(pkt)
	if !ok {
		return nil, NotFragment
	}
	if !f.valid {
		// The packet it belongs to is discarded with it: it could
		// never be completed within the rules.
		r.dropped.Add(1)
		r.mu.Lock()
		if p := r.packets[f.key]; p != nil {
			r.release(p)
		}
		r.mu.Unlock()
		return nil, Dropped
	}
	if f.off == 0 && !f.more {
		r.reassembled.Add(1)
		return f.whole(out), Reassembled
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	now := r.cfg.Now()
	r.expire(now)
	p := r.packets[f.key]
	if p == nil {
		p = r.newPacket(f.key, now)
	}
	switch r.add(p, &f) {
	case Dropped:
		r.dropped.Add(1)
		r.release(p)
		return nil, Dropped
	case NotFragment: // a duplicate
		return nil, Held
	}
	if p.end >= 0 && p.have == p.end && p.head != nil {
		if !p.fits() {
			r.dropped.Add(1)
			r.release(p)
			return nil, Dropped
		}
		whole := p.assemble(out)
		r.release(p)
		r.reassembled.Add(1)
		return whole, Reassembled
	}
	r.enforce(p)
	r.arm()
	return nil, Held
}

// arm sets the timer for the expiry of the oldest packet, if there is one.
func (r *Reassembler) arm() {
	if r.oldest == nil || r.closed {
		return
	}
	d := r.cfg.Timeout - r.cfg.Now().Sub(r.oldest.created)
	if r.timer == nil {
		r.timer = time.AfterFunc(max(d, 0), r.expireLater)
		return
	}
	r.timer.Reset(max(d, 0))
}

// expireLater is the timer's: it discards what expired and sets the timer
// for what remains.
func (r *Reassembler) expireLater() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.expire(r.cfg.Now())
	r.arm()
}

// Close stops the timer and forgets every packet held. Process still works
// after it, expiring packets only as fragments arrive.
func (r *Reassembler) Close() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.closed = true
	if r.timer != nil {
		r.timer.Stop()
	}
	for r.oldest != nil {
		r.release(r.oldest)
	}
}

// add puts f into p: Held when kept, NotFragment for an exact duplicate
// (ignored), Dropped when f breaks the rules and p must go.
func (r *Reassembler) add(p *packet, f *parsed) Result {
	end := f.off + len(f.payload)
	if !f.more {
		if p.end >= 0 && p.end != end {
			return Dropped // two last fragments that disagree
		}
		if n := len(p.frags); n > 0 {
			last := p.frags[n-1]
			if last.off+len(last.data) > end {
				return Dropped // data beyond the end
			}
		}
		p.end = end
	} else if p.end >= 0 && end > p.end {
		return Dropped // data beyond the end
	}
	// i is where f goes: the first fragment starting at or after f.
	i, _ := slices.BinarySearchFunc(p.frags, f.off, func(g fragment, off int) int { return g.off - off })
	if i < len(p.frags) && p.frags[i].off == f.off && len(p.frags[i].data) == len(f.payload) {
		return NotFragment // an exact duplicate: RFC 8200 discards overlaps, not repeats
	}
	if i > 0 {
		if prev := p.frags[i-1]; prev.off+len(prev.data) > f.off {
			return Dropped // overlaps the fragment before it (RFC 5722)
		}
	}
	if i < len(p.frags) && p.frags[i].off < end {
		return Dropped // overlaps the fragment after it
	}
	if len(p.frags) >= maxFragments {
		return Dropped
	}
	var g fragment
	g.off = f.off
	if len(f.payload) > fragBufSmall && len(f.payload) <= fragBufSize {
		g.buf = fragBufs.Get().(*[]byte)
		g.data = (*g.buf)[:len(f.payload)]
	} else {
		g.data = make([]byte, len(f.payload))
	}
	copy(g.data, f.payload)
	p.frags = slices.Insert(p.frags, i, g)
	p.have += len(g.data)
	cost := cap(g.data) + fragmentOverhead
	if f.off == 0 {
		p.head = append([]byte(nil), f.head...)
		p.nextHeader, p.proto = f.nextHeader, f.proto
		cost += cap(p.head)
	}
	r.charge(p, cost)
	return Held
}

func (r *Reassembler) newPacket(k key, now time.Time) *packet {
	s := r.sources[k.src]
	if s == nil {
		s = &source{}
		r.sources[k.src] = s
	}
	p := &packet{key: k, src: s, created: now, end: -1}
	r.packets[k] = p
	p.prev = r.newest
	if r.newest != nil {
		r.newest.next = p
	} else {
		r.oldest = p
	}
	r.newest = p
	p.sprev = s.newest
	if s.newest != nil {
		s.newest.snext = p
	} else {
		s.oldest = p
	}
	s.newest = p
	r.charge(p, packetOverhead)
	return p
}

func (r *Reassembler) charge(p *packet, n int) {
	p.bytes += n
	p.src.bytes += n
	r.bytes += n
}

// release forgets p and returns its buffers.
func (r *Reassembler) release(p *packet) {
	if r.packets[p.key] != p {
		return // already released
	}
	delete(r.packets, p.key)
	if p.prev != nil {
		p.prev.next = p.next
	} else {
		r.oldest = p.next
	}
	if p.next != nil {
		p.next.prev = p.prev
	} else {
		r.newest = p.prev
	}
	s := p.src
	if p.sprev != nil {
		p.sprev.snext = p.snext
	} else {
		s.oldest = p.snext
	}
	if p.snext != nil {
		p.snext.sprev = p.sprev
	} else {
		s.newest = p.sprev
	}
	s.bytes -= p.bytes
	r.bytes -= p.bytes
	if s.oldest == nil {
		delete(r.sources, p.key.src)
	}
	for i := range p.frags {
		if b := p.frags[i].buf; b != nil {
			fragBufs.Put(b)
		}
	}
	p.frags, p.head = nil, nil
}

// expire discards packets older than the timeout.
func (r *Reassembler) expire(now time.Time) {
	for p := r.oldest; p != nil && now.Sub(p.created) >= r.cfg.Timeout; p = r.oldest {
		r.timedOut.Add(1)
		r.release(p)
	}
}

// enforce evicts the oldest packets, of p's source and then of any, until
// both bounds hold: p itself goes last.
func (r *Reassembler) enforce(p *packet) {
	s := p.src
	for s.bytes > r.cfg.MaxBytesPerSource && s.oldest != nil {
		r.evicted.Add(1)
		r.release(s.oldest)
	}
	for r.bytes > r.cfg.MaxBytes && r.oldest != nil {
		r.evicted.Add(1)
		r.release(r.oldest)
	}
}

// fits reports whether p's packet fits its length field. Each fragment was
// checked with its own headers, but an IPv4 fragment after the first may
// carry fewer options than the first, whose header the packet takes.
func (p *packet) fits() bool {
	if p.key.src.Is4() {
		return len(p.head)+p.end <= 0xffff
	}
	return len(p.head)-ipv6HeaderLen+p.end <= 0xffff
}

// assemble writes p's packet into out and returns it.
func (p *packet) assemble(out []byte) []byte {
	hl := len(p.head)
	n := hl + p.end
	out = out[:n]
	copy(out, p.head)
	for _, g := range p.frags {
		copy(out[hl+g.off:], g.data)
	}
	if p.key.src.Is4() {
		binary.BigEndian.PutUint16(out[2:], uint16(n))
		binary.BigEndian.PutUint16(out[6:], 0) // no flags, no offset
		setIPv4Checksum(out[:hl])
	} else {
		out[p.nextHeader] = p.proto
		binary.BigEndian.PutUint16(out[4:], uint16(n-ipv6HeaderLen))
	}
	return out
}

// Stats are a Reassembler's counters since it was made, and what it holds.
type Stats struct {
	Reassembled uint64 // packets completed
	Dropped     uint64 // invalid fragments, and packets discarded for overlaps or bad lengths
	Evicted     uint64 // packets discarded to stay within the memory bounds
	TimedOut    uint64 // packets discarded incomplete after the timeout
	Packets     int    // incomplete packets held now
	Bytes       int    // the memory they are charged
}

// Stats reads the counters.
func (r *Reassembler) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	return Stats{
		Reassembled: r.reassembled.Load(), Dropped: r.dropped.Load(),
		Evicted: r.evicted.Load(), TimedOut: r.timedOut.Load(),
		Packets: len(r.packets), Bytes: r.bytes,
	}
}
