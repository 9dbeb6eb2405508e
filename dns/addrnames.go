package dns

import (
	"net/netip"
	"sync"
	"time"

	"github.com/miekg/dns"
)

// addrNames remembers the name each real address in an answer stood for,
// so that a flow to that address can be named (the routing rules, the flow
// view): remote mode's forwarded answers and fake-ip mode's direct ones. It
// is bounded: past maxAddrNames the oldest entry goes.
type addrNames struct {
	mu    sync.Mutex
	m     map[netip.Addr]addrName
	order []netip.Addr // a ring, oldest at next
	next  int
}

type addrName struct {
	name    string
	expires int64 // unix nanoseconds
}

const (
	// maxAddrNames bounds the addresses remembered: a few hundred KiB.
	maxAddrNames = 8192
	// addrNameMargin keeps a name past its answer's TTL, as clients keep
	// answers longer than they should (the fake pool's margin, for the
	// same reason).
	addrNameMargin = fakeReuseMargin
)

// record remembers the addresses of the A and AAAA records in answer as
// name's.
func (a *addrNames) record(name string, answer []dns.RR, now time.Time) {
	for _, rr := range answer {
		var addr netip.Addr
		switch r := rr.(type) {
		case *dns.A:
			addr, _ = netip.AddrFromSlice(r.A.To4())
		case *dns.AAAA:
			addr, _ = netip.AddrFromSlice(r.AAAA)
		default:
			continue
		}
		if !addr.IsValid() {
			continue
		}
		ttl := time.Duration(rr.Header().Ttl) * time.Second
		a.put(addr.Unmap(), addrName{name: name, expires: now.Add(ttl + addrNameMargin).UnixNano()})
	}
}

func (a *addrNames) put(addr netip.Addr, n addrName) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.m == nil {
		a.m = make(map[netip.Addr]addrName)
	}
	if _, ok := a.m[addr]; !ok {
		if len(a.order) < maxAddrNames {
			a.order = append(a.order, addr)
		} else {
			delete(a.m, a.order[a.next])
			a.order[a.next] = addr
			a.next = (a.next + 1) % maxAddrNames
		}
	}
	a.m[addr] = n
}

// lookup returns the name addr stood for in an answer still fresh.
func (a *addrNames) lookup(addr netip.Addr, now time.Time) (string, bool) {
	a.mu.Lock()
	n, ok := a.m[addr.Unmap()]
	a.mu.Unlock()
	if !ok || now.UnixNano() > n.expires {
		return "", false
	}
	return n.name, true
}

// NameOf returns the name a real address stood for in an answer this
// server gave (forwarded in remote mode, or a direct name's in fake-ip
// mode) while that answer, and a minute more, is fresh. Several names may
// share an address: the last answered wins.
func (s *Server) NameOf(addr netip.Addr) (string, bool) {
	return s.addrNames.lookup(addr, s.now())
}
