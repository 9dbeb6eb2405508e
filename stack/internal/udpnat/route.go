package udpnat

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
)

// Route is where a new association goes (Config.Route).
type Route struct {
	// Dialer opens its far side; nil means Config.Dialer.
	Dialer UDPDialer
	// Reject answers the client's datagrams with ICMP port unreachable;
	// Drop ignores them. Either holds for a while, as a failed
	// association does, before the client's next datagram asks again.
	Reject, Drop bool
	// For the live view: the upstream's name (an UpstreamListener's
	// overrides it), the rule that decided, and the name the association
	// was routed by with where it came from.
	Via, Rule, Name, NameFrom string
	// DialName sends the datagrams to the association's first
	// destination by Name, so that a proxy resolves it: only through a
	// conn that is not a kernel socket (a proxy's); a kernel socket sends
	// to the address.
	DialName bool
}

// UpstreamListener is a UDPDialer that says which of its upstreams
// carries an association, as a failover group does.
type UpstreamListener interface {
	ListenUpstream(ctx context.Context, network, address string) (conn net.PacketConn, upstream string, err error)
}

// errRejected is why a rejected association refuses its datagrams.
var errRejected = errors.New("rejected by a rule")

// Opening is an association being routed: its client, the destination of
// its first datagram, and the datagrams the client has sent there so far.
type Opening struct {
	Client, Dst netip.AddrPort
	a           *udpAssoc
}

// Datagram returns the payload of the i-th datagram (from 0) the client
// sent to Dst while the association opens, waiting for it until ctx ends;
// ok is false if it did not come. The payload must not be changed.
func (o *Opening) Datagram(ctx context.Context, i int) (payload []byte, ok bool) {
	a := o.a
	for {
		a.mu.Lock()
		n := 0
		for _, d := range a.pending {
			if d.dst != o.Dst {
				continue
			}
			if n == i {
				a.mu.Unlock()
				return d.payload, true
			}
			n++
		}
		full := len(a.pending) >= udpPendingMax
		a.mu.Unlock()
		if full {
			return nil, false
		}
		select {
		case <-a.more:
		case <-ctx.Done():
			return nil, false
		}
	}
}

// open routes the association and opens its far side.
func (a *udpAssoc) open(ctx context.Context) (net.PacketConn, error) {
	var rt Route
	if a.t.cfg.Route != nil {
		rt = a.t.cfg.Route(ctx, &Opening{Client: a.client, Dst: a.firstDst, a: a})
	}
	a.route = rt
	a.route.Dialer = nil // the live view has no use for it
	switch {
	case rt.Reject:
		return nil, errRejected
	case rt.Drop:
		a.dropping = true
		return nil, errRejected
	}
	d := rt.Dialer
	if d == nil {
		d = a.t.cfg.Dialer
	}
	var (
		conn net.PacketConn
		err  error
	)
	if ul, ok := d.(UpstreamListener); ok {
		var via string
		conn, via, err = ul.ListenUpstream(ctx, "udp", "")
		if via != "" {
			a.route.Via = via
		}
	} else {
		conn, err = d.ListenPacket(ctx, "udp", "")
	}
	if err == nil && rt.DialName && rt.Name != "" && kernelSocket(conn) == nil {
		// Replies name their source by the address the proxy resolved:
		// as for a fake address, they are shown as coming from the one
		// the client sent to.
		a.named = &fakeDest{fake: a.firstDst, hostport: net.JoinHostPort(rt.Name, strconv.Itoa(int(a.firstDst.Port()))), release: func() {}}
		a.fakes.add(a.named)
	}
	return conn, err
}

// AbortVia ends every association whose upstream is named via, and
// returns how many.
func (t *Table) AbortVia(via string) int {
	return t.abortWhere(func(a *udpAssoc) bool { return a.routed() && a.route.Via == via }, false)
}

// routed reports whether the association's route is set: it is written
// before ready is closed.
func (a *udpAssoc) routed() bool {
	select {
	case <-a.ready:
		return true
	default:
		return false
	}
}
