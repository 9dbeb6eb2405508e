package stack

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/netstackd/netstackd/stack/internal/tcprelay"
	"github.com/netstackd/netstackd/stack/internal/udpnat"
)

// Routing (issue 17): each new outbound flow may be sent to its own
// upstream, rejected or dropped, by Config.Route. The stack asks once per
// flow (a TCP SYN, a UDP association's first datagrams, an echo request)
// and never per packet of a flow.

// Action is what a route does with a new flow.
type Action uint8

const (
	// Relay carries the flow to Decision.Dialer (TCP) or Decision.UDP.
	Relay Action = iota
	// Reject refuses it out loud: a TCP reset in reply to the SYN, ICMP
	// port unreachable for UDP, no reply to an echo request.
	Reject
	// Drop ignores it: the client's packets go nowhere and it times out.
	Drop
)

func (a Action) String() string {
	switch a {
	case Reject:
		return "reject"
	case Drop:
		return "drop"
	}
	return "relay"
}

// Where a flow's name came from (Flow.NameFrom).
const (
	NameFromFakeIP  = "fake-ip" // the client connected to a fake address from our DNS
	NameFromSniffed = "sniffed" // read from the client's first bytes: TLS SNI, HTTP Host, QUIC Initial
	NameFromDNS     = "dns"     // a real address our DNS gave for the name (Config.AddrNames)
)

// nameFlow gives f the name its destination is known by: a fake address's
// (name, from upstreamAddress), else the one a DNS answer gave it.
func (st *Stack) nameFlow(f *Flow, fakeName string) {
	switch {
	case fakeName != "":
		f.Name, f.NameFrom = fakeName, NameFromFakeIP
	case st.cfg.AddrNames != nil:
		if n, ok := st.cfg.AddrNames(f.Dst.Addr()); ok {
			f.Name, f.NameFrom = n, NameFromDNS
		}
	}
}

// Flow is a new outbound flow as Config.Route sees it.
type Flow struct {
	Proto       string // "tcp", "udp" or "icmp"
	Client, Dst netip.AddrPort
	// Name is the name Dst stands for, "" when none is known; NameFrom
	// says how it is known.
	Name, NameFrom string
}

// Decision is Config.Route's answer for one flow.
type Decision struct {
	Action Action
	// Dialer and UDP reach the flow's far end when it is relayed; nil
	// means Config.Dialer and Config.UDP.
	Dialer Dialer
	UDP    UDPDialer
	// Via names the upstream for the live view and the logs. A dialer
	// that names the upstream it used (UpstreamDialer, a failover group)
	// says it instead.
	Via string
	// Rule names the rule that decided, for the same.
	Rule string
	// Sniff asks the stack to find the flow's name in what the client
	// sends first (TLS SNI, an HTTP Host header, a QUIC Initial) and ask
	// again with it: the decision depends on a name the stack does not
	// know. TCP then completes the client's handshake before the
	// upstream is dialed. Ignored when Flow.Name is already set.
	Sniff bool
	// DialName dials a sniffed name rather than the address the client
	// connected to, so that a proxy resolves it.
	DialName bool
}

// UpstreamDialer is a Dialer that says which of its upstreams carried a
// conn, as a failover group does: the flow shows that name.
type UpstreamDialer interface {
	DialUpstream(ctx context.Context, network, address string) (conn net.Conn, upstream string, err error)
}

// UpstreamListener is a UDPDialer that says which of its upstreams
// carries an association.
type UpstreamListener = udpnat.UpstreamListener

// decide asks Config.Route about f; without one every flow is relayed to
// the Config's dialers.
func (st *Stack) decide(f Flow) Decision {
	if st.cfg.Route == nil {
		return Decision{}
	}
	d := st.cfg.Route(f)
	if f.Name != "" {
		d.Sniff = false
	}
	return d
}

// dialer is the TCP dialer a decision names.
func (st *Stack) dialer(d Decision) Dialer {
	if d.Dialer != nil {
		return d.Dialer
	}
	return st.cfg.Dialer
}

// routes interns the live view's routes: flows routed alike (same
// upstream, same rule, no name of their own) share one, so a flow holds a
// pointer, not its own copy.
type routes struct {
	mu sync.Mutex
	m  map[tcprelay.Route]*tcprelay.Route
}

// maxInterned bounds the interned routes; beyond it each flow gets its own
// (upstreams and rules are few; the bound only guards against a Route
// callback inventing names).
const maxInterned = 4096

// of returns the shared route for via and rule, nil when both are empty.
func (r *routes) of(via, rule string) *tcprelay.Route {
	if via == "" && rule == "" {
		return nil
	}
	key := tcprelay.Route{Via: via, Rule: rule}
	r.mu.Lock()
	defer r.mu.Unlock()
	if rt, ok := r.m[key]; ok {
		return rt
	}
	rt := &key
	if r.m == nil {
		r.m = make(map[tcprelay.Route]*tcprelay.Route)
	}
	if len(r.m) < maxInterned {
		r.m[key] = rt
	}
	return rt
}

// CloseFlowsVia resets every live TCP flow and ends every UDP association
// that went through the upstream named via (Decision.Via, or the name an
// UpstreamDialer gave), and returns how many it ended: netstackd ends the
// flows of an upstream that died, which would otherwise hang on a socket
// that may never hear from it again.
func (st *Stack) CloseFlowsVia(via string) int {
	if via == "" {
		return 0
	}
	n := 0
	for _, f := range st.relay.Flows(nil) {
		if f.Route != nil && f.Route.Via == via && st.relay.Abort(f.ID) {
			n++
		}
	}
	if st.udp != nil {
		n += st.udp.AbortVia(via)
	}
	return n
}

// udpRoute is the UDP NAT's Config.Route: nil without Config.Route.
func (st *Stack) udpRoute() func(context.Context, *udpnat.Opening) udpnat.Route {
	if st.cfg.Route == nil {
		return nil
	}
	return st.routeAssociation
}

// refuseEcho reports whether Config.Route rejects or drops an echo
// request: either way it gets no reply. Each request is asked about, as
// each is its own exchange.
func (st *Stack) refuseEcho(src, dst netip.Addr) bool {
	d := st.decide(Flow{Proto: "icmp", Client: netip.AddrPortFrom(src, 0), Dst: netip.AddrPortFrom(dst, 0)})
	return st.countRefused(d.Action)
}

// countRefused counts a flow a route rejects or drops, and reports whether
// the action refuses it.
func (st *Stack) countRefused(a Action) bool {
	switch a {
	case Reject:
		st.rejected.Add(1)
	case Drop:
		st.dropped.Add(1)
	default:
		return false
	}
	return true
}

// Timeouts are the stack's timeouts that may change while it runs (a
// reload): each new flow, and each association's next idle check, takes
// the values in effect then. A zero field keeps its value.
type Timeouts struct {
	Dial      time.Duration // Config.DialTimeout
	Handshake time.Duration // Config.HandshakeTimeout
	Sniff     time.Duration // Config.SniffTimeout
	UDP       time.Duration // Config.UDPTimeout, for outbound associations
}

// SetTimeouts changes the timeouts in t that are not zero.
func (st *Stack) SetTimeouts(t Timeouts) {
	cur := *st.timeouts.Load()
	for _, f := range []struct{ cur, next *time.Duration }{
		{&cur.Dial, &t.Dial}, {&cur.Handshake, &t.Handshake}, {&cur.Sniff, &t.Sniff}, {&cur.UDP, &t.UDP},
	} {
		if *f.next > 0 {
			*f.cur = *f.next
		}
	}
	st.timeouts.Store(&cur)
	if st.udp != nil {
		st.udp.SetTimeouts(t.UDP, t.Dial)
	}
}

// Timeouts returns the timeouts in effect.
func (st *Stack) Timeouts() Timeouts { return *st.timeouts.Load() }
