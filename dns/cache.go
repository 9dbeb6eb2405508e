package dns

import (
	"container/list"
	"slices"
	"sync"
	"time"

	"github.com/miekg/dns"
)

const (
	// maxCacheTTL caps how long a positive answer is kept, whatever its TTL.
	maxCacheTTL = 24 * time.Hour
	// maxNegativeTTL caps how long NXDOMAIN and NODATA are kept.
	maxNegativeTTL = 60 * time.Second
)

// cacheKey identifies an answer: the lower-cased name, type and class of
// its question.
type cacheKey struct {
	name   string
	qtype  uint16
	qclass uint16
}

type cacheEntry struct {
	key     cacheKey
	msg     *dns.Msg // never changed once stored
	stored  time.Time
	expires time.Time
}

// cache is a bounded LRU of upstream replies.
type cache struct {
	max int

	mu      sync.Mutex
	lru     list.List // *cacheEntry, most recently used at the front
	entries map[cacheKey]*list.Element
}

func newCache(max int) *cache {
	return &cache{max: max, entries: make(map[cacheKey]*list.Element)}
}

// get returns a copy of the reply stored under k, its TTLs decremented by
// the time it has spent in the cache, if it has not expired at now.
func (c *cache) get(k cacheKey, now time.Time) (*dns.Msg, bool) {
	c.mu.Lock()
	el, ok := c.entries[k]
	if !ok {
		c.mu.Unlock()
		return nil, false
	}
	e := el.Value.(*cacheEntry)
	if !now.Before(e.expires) {
		c.lru.Remove(el)
		delete(c.entries, k)
		c.mu.Unlock()
		return nil, false
	}
	c.lru.MoveToFront(el)
	c.mu.Unlock()

	m := e.msg.Copy()
	age := uint32(max(now.Sub(e.stored), 0) / time.Second)
	for _, rrs := range [][]dns.RR{m.Answer, m.Ns, m.Extra} {
		for _, rr := range rrs {
			h := rr.Header()
			h.Ttl -= min(h.Ttl, age)
		}
	}
	return m, true
}

// put stores a copy of msg under k for ttl, evicting the least recently
// used entries beyond the bound.
func (c *cache) put(k cacheKey, msg *dns.Msg, ttl time.Duration, now time.Time) {
	m := msg.Copy()
	// The OPT record is hop by hop, and its TTL field holds flags that the
	// TTL countdown in get would corrupt.
	m.Extra = slices.DeleteFunc(m.Extra, func(rr dns.RR) bool { return rr.Header().Rrtype == dns.TypeOPT })
	e := &cacheEntry{key: k, msg: m, stored: now, expires: now.Add(ttl)}
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.entries[k]; ok {
		el.Value = e
		c.lru.MoveToFront(el)
		return
	}
	c.entries[k] = c.lru.PushFront(e)
	for c.lru.Len() > c.max {
		back := c.lru.Back()
		c.lru.Remove(back)
		delete(c.entries, back.Value.(*cacheEntry).key)
	}
}

// clear forgets every entry.
func (c *cache) clear() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.lru.Init()
	clear(c.entries)
}

// len returns the number of entries, expired ones included.
func (c *cache) len() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.lru.Len()
}

// cacheTTL says how long a reply may be cached. A positive answer is kept
// for the smallest TTL of its answer records. NXDOMAIN and NODATA are kept
// for the smaller of the SOA record's TTL and its MINIMUM field (RFC 2308
// §5), at most maxNegativeTTL; without an SOA they are not cached (RFC
// 2308 §5: nothing bounds them). Truncated replies and other rcodes, such
// as SERVFAIL, are not cached.
func cacheTTL(m *dns.Msg) (time.Duration, bool) {
	if m.Truncated {
		return 0, false
	}
	var ttl uint32
	switch {
	case m.Rcode == dns.RcodeSuccess && len(m.Answer) > 0:
		ttl = m.Answer[0].Header().Ttl
		for _, rr := range m.Answer[1:] {
			ttl = min(ttl, rr.Header().Ttl)
		}
	case m.Rcode == dns.RcodeSuccess || m.Rcode == dns.RcodeNameError:
		soa := findSOA(m.Ns)
		if soa == nil {
			return 0, false
		}
		ttl = min(soa.Hdr.Ttl, soa.Minttl, uint32(maxNegativeTTL/time.Second))
	default:
		return 0, false
	}
	if ttl == 0 || ttl >= 1<<31 { // RFC 2181 §8: a TTL with the top bit set means zero
		return 0, false
	}
	return min(time.Duration(ttl)*time.Second, maxCacheTTL), true
}

func findSOA(rrs []dns.RR) *dns.SOA {
	for _, rr := range rrs {
		if soa, ok := rr.(*dns.SOA); ok {
			return soa
		}
	}
	return nil
}
