package stack

import (
	"context"
	"net"
	"net/netip"
	"strconv"

	"github.com/netstackd/netstackd/stack/internal/udpnat"
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

// errRefusedDst is why a flow to an address Config.Refuse names is refused
// before anything is dialed.
type errRefusedDst struct{ addr netip.Addr }

func (e errRefusedDst) Error() string {
	return "destination " + e.addr.String() + " is refused: not relayed anywhere"
}

// refused reports whether Config.Refuse refuses dst.
func (st *Stack) refused(dst netip.Addr) bool {
	return st.cfg.Refuse != nil && st.cfg.Refuse(dst)
}

// upstreamAddress returns the address to dial for dst: "name:port" for a
// mapped fake address, with a release function to call when the flow ends.
// A refused dst is an error.
func (st *Stack) upstreamAddress(dst netip.AddrPort) (address, name string, release func(), err error) {
	names := st.cfg.Names
	if names == nil || !names.IsFake(dst.Addr()) {
		if st.refused(dst.Addr()) {
			return "", "", nil, errRefusedDst{dst.Addr()}
		}
		return dst.String(), "", func() {}, nil
	}
	release = names.Hold(dst.Addr())
	name, ok := names.Resolve(dst.Addr())
	if !ok {
		release()
		return "", "", nil, errUnmappedFake{dst.Addr()}
	}
	return hostPort(name, dst.Port()), name, release, nil
}

func hostPort(host string, port uint16) string {
	return net.JoinHostPort(host, strconv.Itoa(int(port)))
}

// fakeNames is the stack's Names as the UDP NAT consumes them; nil when
// there are none.
func (st *Stack) fakeNames() udpnat.Names {
	if st.cfg.Names == nil {
		return nil
	}
	return natNames{st}
}

type natNames struct{ st *Stack }

func (n natNames) IsFake(addr netip.Addr) bool { return n.st.cfg.Names.IsFake(addr) }

func (n natNames) Lookup(dst netip.AddrPort) (string, func(), error) {
	address, _, release, err := n.st.upstreamAddress(dst)
	return address, release, err
}
