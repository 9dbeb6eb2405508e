package stack

import (
	"context"
	"net"
	"net/netip"
	"strconv"
	"sync"
)

// DNS answers the DNS queries the stack intercepts: UDP and TCP to port 53
// on any destination. *dns.Server fits it.
type DNS interface {
	// Answer returns the reply to one query, or nil to drop it.
	Answer(ctx context.Context, query []byte, overTCP bool) []byte
	// ServeStream answers length-prefixed queries on c until it ends; the
	// caller closes c.
	ServeStream(ctx context.Context, c net.Conn) error
}

// FakeNames maps the fake addresses handed out in DNS answers back to the
// names they stand for, so that a flow to one reaches the upstream as
// "name:port" and the name, not a locally resolved address, reaches the
// proxy. *dns.Server fits it.
type FakeNames interface {
	// IsFake reports whether addr lies in the fake ranges, mapped or not.
	IsFake(addr netip.Addr) bool
	// Hold pins addr's mapping for the life of a flow.
	Hold(addr netip.Addr) (release func())
	// Resolve returns the name addr stands for.
	Resolve(addr netip.Addr) (name string, ok bool)
}

// errUnmappedFake is why a flow to a fake address without a name is refused:
// its mapping expired or predates a restart, and dialing the fake address
// itself would send traffic nowhere useful.
type errUnmappedFake struct{ addr netip.Addr }

func (e errUnmappedFake) Error() string {
	return "no name for fake address " + e.addr.String() + " (expired, or from before a restart)"
}

// upstreamAddress returns the address to dial for dst: "name:port" for a
// mapped fake address, with a release function to call when the flow ends.
func (st *Stack) upstreamAddress(dst netip.AddrPort) (string, func(), error) {
	names := st.cfg.Names
	if names == nil || !names.IsFake(dst.Addr()) {
		return dst.String(), func() {}, nil
	}
	release := names.Hold(dst.Addr())
	name, ok := names.Resolve(dst.Addr())
	if !ok {
		release()
		return "", nil, errUnmappedFake{dst.Addr()}
	}
	return net.JoinHostPort(name, strconv.Itoa(int(dst.Port()))), release, nil
}

// hostAddr is a UDP destination given by name: proxies that carry UDP take
// the name as it is (SOCKS5 address type "domain name").
type hostAddr string

func (h hostAddr) Network() string { return "udp" }
func (h hostAddr) String() string  { return string(h) }

// fakeDest remembers the fake destinations an association has sent to, so a
// reply can be shown to the client as coming from the fake address it used.
type fakeDest struct {
	fake     netip.AddrPort
	hostport string
	release  func()
}

type fakeDests struct {
	mu    sync.Mutex
	byKey map[netip.AddrPort]*fakeDest
	order []*fakeDest // most recent last
}

func (f *fakeDests) lookup(dst netip.AddrPort) *fakeDest {
	f.mu.Lock()
	defer f.mu.Unlock()
	d := f.byKey[dst]
	if d != nil {
		f.bump(d)
	}
	return d
}

// maxFakeDests bounds the fake destinations one association remembers.
const maxFakeDests = 64

func (f *fakeDests) add(d *fakeDest) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.byKey == nil {
		f.byKey = make(map[netip.AddrPort]*fakeDest)
	}
	if len(f.order) >= maxFakeDests {
		old := f.order[0]
		f.order = f.order[1:]
		delete(f.byKey, old.fake)
		old.release()
	}
	f.byKey[d.fake] = d
	f.order = append(f.order, d)
}

func (f *fakeDests) empty() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.order) == 0
}

func (f *fakeDests) bump(d *fakeDest) {
	for i, o := range f.order {
		if o == d {
			copy(f.order[i:], f.order[i+1:])
			f.order[len(f.order)-1] = d
			return
		}
	}
}

// replySource maps the source of a reply back to the fake address the
// client sent to. A proxy names the source by the address it resolved, so
// the reply is matched by name where the proxy gave one, else by port to the
// most recently used fake destination.
func (f *fakeDests) replySource(from net.Addr, port uint16) (netip.AddrPort, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if from != nil {
		s := from.String()
		for _, d := range f.order {
			if d.hostport == s {
				return d.fake, true
			}
		}
	}
	for i := len(f.order) - 1; i >= 0; i-- {
		if f.order[i].fake.Port() == port {
			return f.order[i].fake, true
		}
	}
	return netip.AddrPort{}, false
}

func (f *fakeDests) releaseAll() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, d := range f.order {
		d.release()
	}
	f.order, f.byKey = nil, nil
}
