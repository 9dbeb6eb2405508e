package udpnat

import (
	"net"
	"net/netip"
	"sync"
)

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
