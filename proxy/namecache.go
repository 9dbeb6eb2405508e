package proxy

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"time"
)

// The bounds of a nameCache. The cache sits on the packet path, where a
// lookup delays every datagram queued behind it, hence the short timeout;
// a failed lookup is remembered briefly so that a dead name costs one
// timeout per few seconds rather than one per datagram.
const (
	nameCacheSize        = 256
	nameCacheTTL         = 30 * time.Second
	nameCacheNegativeTTL = 5 * time.Second
	nameLookupTimeout    = 2 * time.Second
)

// nameCache resolves names to one address each and remembers the answers,
// failures included, for a while. It is safe for concurrent use; two
// callers missing the same name both look it up.
type nameCache struct {
	// network is what the resolver is asked for: "ip", "ip4" or "ip6".
	network string
	// lookupNetIP is net.DefaultResolver.LookupNetIP outside tests.
	lookupNetIP func(ctx context.Context, network, host string) ([]netip.Addr, error)

	mu      sync.Mutex
	entries map[string]nameEntry
}

type nameEntry struct {
	ip      netip.Addr
	err     error
	expires time.Time
}

func newNameCache(network string) *nameCache {
	return &nameCache{
		network:     network,
		lookupNetIP: net.DefaultResolver.LookupNetIP,
		entries:     make(map[string]nameEntry),
	}
}

// lookup returns the first address the resolver gives for host, from the
// cache while the answer is fresh.
func (nc *nameCache) lookup(host string) (netip.Addr, error) {
	now := time.Now()
	nc.mu.Lock()
	e, ok := nc.entries[host]
	nc.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.ip, e.err
	}

	ctx, cancel := context.WithTimeout(context.Background(), nameLookupTimeout)
	ips, err := nc.lookupNetIP(ctx, nc.network, host)
	cancel()
	e = nameEntry{expires: time.Now().Add(nameCacheTTL)}
	switch {
	case err != nil:
		e.err = err
	case len(ips) == 0:
		e.err = &net.DNSError{Err: "no suitable address", Name: host, IsNotFound: true}
	default:
		e.ip = ips[0]
	}
	if e.err != nil {
		e.expires = time.Now().Add(nameCacheNegativeTTL)
	}
	nc.store(host, e)
	return e.ip, e.err
}

// store adds e, making room first: expired entries go, then, if the cache
// is still full, whichever entry map iteration yields first.
func (nc *nameCache) store(host string, e nameEntry) {
	nc.mu.Lock()
	defer nc.mu.Unlock()
	if _, ok := nc.entries[host]; !ok && len(nc.entries) >= nameCacheSize {
		now := time.Now()
		for h, old := range nc.entries {
			if !now.Before(old.expires) {
				delete(nc.entries, h)
			}
		}
		for h := range nc.entries {
			if len(nc.entries) < nameCacheSize {
				break
			}
			delete(nc.entries, h)
		}
	}
	nc.entries[host] = e
}
