package dns

import (
	"container/list"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"time"
)

// maxPoolAddrs bounds the mappings of one family whatever the size of its
// range: a /96 holds 2^32 addresses, far more names than are worth keeping.
// 65536 is the size of the default IPv4 range.
const maxPoolAddrs = 1 << 16

// errPoolExhausted is returned when no address of a range may be given to
// a new name: each is held by a live flow or may still be cached by a
// client under the name it was last answered for.
var errPoolExhausted = errors.New("fake-ip pool exhausted: every address is held by a flow or may still be cached under its name")

// pool maps names to fake addresses and back: one IPv4 address (for A) and
// one IPv6 address (for AAAA) per name, on demand. When a range is full the
// least recently used mapping is recycled, but only once no flow holds it
// and reuseAfter has passed since it was last answered or used: until then
// a client may still have the answer cached, and reach another name through
// the address. Memory is bounded by the size of the ranges.
type pool struct {
	// reuseAfter is how long a mapping stays after its last use: the TTL
	// of the answers plus a margin for caches that keep answers longer.
	reuseAfter time.Duration
	// now is the clock, read under mu so that the recycling list stays in
	// the order of the times it records.
	now func() time.Time

	mu sync.Mutex
	v4 *poolRange // nil when there is no IPv4 range
	v6 *poolRange // nil when there is no IPv6 range
}

// poolRange is the state of one family.
type poolRange struct {
	prefix netip.Prefix
	size   uint64 // usable addresses, from offset firstOffset
	next   uint64 // addresses handed out before recycling starts
	byName map[string]*mapping
	byAddr map[netip.Addr]*mapping
	// lru holds the mappings no flow holds, most recently used at the
	// front; a held mapping leaves it until its last hold is released.
	// Every use sets reusable to the time of use plus the pool's constant
	// reuseAfter and moves the mapping to the front, so the list is also
	// in order of reusable: its back is the first mapping that may be
	// recycled, and if that one may not, none may.
	lru list.List
}

type mapping struct {
	name     string
	addr     netip.Addr
	holds    int
	elem     *list.Element // in lru; nil while held
	reusable time.Time     // not recycled before this
}

// firstOffset skips the network address (offset 0) and the first host
// address, which is often given to the TUN itself as a gateway. The last
// IPv4 address (broadcast) is skipped too.
const firstOffset = 2

// newPool builds a pool over at most one IPv4 and one IPv6 prefix, whose
// addresses are recycled no sooner than reuseAfter after their last use.
func newPool(prefixes []netip.Prefix, reuseAfter time.Duration) (*pool, error) {
	p := &pool{reuseAfter: reuseAfter, now: time.Now}
	for _, pfx := range prefixes {
		if !pfx.IsValid() || pfx.Addr().Is4In6() {
			return nil, fmt.Errorf("fake range %s: not a valid IPv4 or IPv6 prefix", pfx)
		}
		pfx = pfx.Masked()
		hostBits := pfx.Addr().BitLen() - pfx.Bits()
		if hostBits < 2 {
			return nil, fmt.Errorf("fake range %s: too small, want at most /%d", pfx, pfx.Addr().BitLen()-2)
		}
		var size uint64 = maxPoolAddrs
		if hostBits < 17 {
			size = 1<<hostBits - firstOffset
			if pfx.Addr().Is4() {
				size-- // broadcast
			}
		}
		r := &poolRange{
			prefix: pfx,
			size:   size,
			byName: make(map[string]*mapping),
			byAddr: make(map[netip.Addr]*mapping),
		}
		slot := &p.v6
		if pfx.Addr().Is4() {
			slot = &p.v4
		}
		if *slot != nil {
			return nil, fmt.Errorf("fake range %s: a range of that family is already given (%s)", pfx, (*slot).prefix)
		}
		*slot = r
	}
	return p, nil
}

// normaliseName lower-cases an ASCII name and drops its trailing dot. The
// names miekg/dns produces are ASCII: other bytes appear as \DDD escapes.
func normaliseName(name string) string {
	name = strings.TrimSuffix(name, ".")
	for i := 0; i < len(name); i++ {
		if c := name[i]; 'A' <= c && c <= 'Z' {
			b := []byte(name)
			for j := i; j < len(b); j++ {
				if 'A' <= b[j] && b[j] <= 'Z' {
					b[j] += 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return name
}

// rangeFor returns the range an address belongs to, or nil.
func (p *pool) rangeFor(addr netip.Addr) *poolRange {
	addr = addr.Unmap()
	for _, r := range []*poolRange{p.v4, p.v6} {
		if r != nil && r.prefix.Contains(addr) {
			return r
		}
	}
	return nil
}

// hasV6 reports whether AAAA queries can be given fake addresses.
func (p *pool) hasV6() bool { return p.v6 != nil }

// hasV4 reports whether A queries can be given fake addresses.
func (p *pool) hasV4() bool { return p.v4 != nil }

// lookup returns the address of name in the IPv6 range if v6, else in the
// IPv4 range, allocating one if the name has none, and marks the mapping
// used: the caller is about to answer with it. A new name gets a fresh
// address while the range has some, then the least recently used mapping
// that is neither held nor possibly cached; errPoolExhausted when there is
// none. The name must already be normalised and the range must exist.
func (p *pool) lookup(name string, v6 bool) (netip.Addr, error) {
	r := p.v4
	if v6 {
		r = p.v6
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.now()
	if m, ok := r.byName[name]; ok {
		p.touch(r, m, now)
		return m.addr, nil
	}
	var m *mapping
	if r.next < r.size {
		m = &mapping{addr: r.addrAt(firstOffset + r.next)}
		r.next++
		r.byAddr[m.addr] = m
	} else {
		back := r.lru.Back()
		if back == nil || now.Before(back.Value.(*mapping).reusable) {
			return netip.Addr{}, errPoolExhausted
		}
		m = back.Value.(*mapping)
		r.lru.Remove(back)
		m.elem = nil
		delete(r.byName, m.name)
	}
	m.name = name
	r.byName[name] = m
	p.touch(r, m, now)
	return m.addr, nil
}

// touch marks m used at now: it may not be recycled for reuseAfter, and
// moves to the front of the recycling list unless a flow holds it. reusable
// never moves back, so a clock that did could delay recycling but never
// hasten it (time.Now's monotonic reading does not go back anyway).
func (p *pool) touch(r *poolRange, m *mapping, now time.Time) {
	if t := now.Add(p.reuseAfter); t.After(m.reusable) {
		m.reusable = t
	}
	switch {
	case m.holds > 0:
	case m.elem == nil:
		m.elem = r.lru.PushFront(m)
	default:
		r.lru.MoveToFront(m.elem)
	}
}

// addrAt returns the address at offset off from the start of the range.
func (r *poolRange) addrAt(off uint64) netip.Addr {
	if r.prefix.Addr().Is4() {
		b := r.prefix.Addr().As4()
		binary.BigEndian.PutUint32(b[:], binary.BigEndian.Uint32(b[:])+uint32(off))
		return netip.AddrFrom4(b)
	}
	// off < maxPoolAddrs fits in the host bits, which are zero in the
	// masked prefix, so adding to the low 64 bits cannot carry.
	b := r.prefix.Addr().As16()
	binary.BigEndian.PutUint64(b[8:], binary.BigEndian.Uint64(b[8:])+off)
	return netip.AddrFrom16(b)
}

// name returns the name mapped to addr and marks the mapping used.
func (p *pool) name(addr netip.Addr) (string, bool) {
	r := p.rangeFor(addr)
	if r == nil {
		return "", false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, ok := r.byAddr[addr.Unmap()]
	if !ok {
		return "", false
	}
	p.touch(r, m, p.now())
	return m.name, true
}

// hold pins the mapping of addr, if any, until release is called. release
// may be called more than once; only the first call counts. The last
// release marks the mapping used: a client that just used the address may
// use it again, and some keep addresses longer than their TTL says.
func (p *pool) hold(addr netip.Addr) (release func()) {
	r := p.rangeFor(addr)
	if r == nil {
		return func() {}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	m, ok := r.byAddr[addr.Unmap()]
	if !ok {
		return func() {}
	}
	m.holds++
	if m.elem != nil {
		r.lru.Remove(m.elem)
		m.elem = nil
	}
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			defer p.mu.Unlock()
			m.holds--
			if m.holds == 0 {
				p.touch(r, m, p.now())
			}
		})
	}
}

// mappings returns how many names the IPv4 and IPv6 ranges hold.
func (p *pool) mappings() (v4, v6 int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.v4 != nil {
		v4 = len(p.v4.byName)
	}
	if p.v6 != nil {
		v6 = len(p.v6.byName)
	}
	return v4, v6
}
