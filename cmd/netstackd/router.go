package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/internal/sockowner"
	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/rules"
	"github.com/netstackd/netstackd/stack"
)

// Routing rules (issue 17): --rule and the config file's `rule` list,
// first match wins, compiled into a rules.Set. The router is the stack's
// Config.Route and the DNS server's Config.Policy; a reload compiles the
// rules again and swaps the table whole, so a flow is routed by one
// version of the rules from start to end.

// router routes new flows by the rules in effect.
type router struct {
	cur atomic.Pointer[routeTable]
	// direct reaches a destination from netstackd's own namespace, as
	// direct mode does: refusing its own addresses and, unless
	// --allow-host-loopback, the host's loopback.
	direct proxy.Direct
	// owners finds the local process behind a flow in host-wide mode
	// (uid:, exe:); nil elsewhere.
	owners *sockowner.Finder
	log    *slog.Logger
}

// ownerTimeout bounds the search for a flow's process: its uid comes from
// one netlink round trip; the executable may need a walk of /proc, which
// on a busy host takes milliseconds (docs/sockowner.md).
const ownerTimeout = 5 * time.Millisecond

// routeTable is one version of the rules with what their actions reach.
type routeTable struct {
	set *rules.Set
	// group holds the named upstreams (proxy:NAME); nil in direct mode.
	group *proxy.Group
	// dialName asks a proxy for a sniffed name rather than the address
	// (--dial-sniffed-name); defaultProxy says the default upstream is
	// one.
	dialName, defaultProxy bool
	r                      *router
}

// newRouter compiles the rules of opts for the upstreams of up. In
// host-wide mode it can look up the process behind a flow.
func newRouter(opts *options, up *upstream, refused *refusals, log *slog.Logger) (*router, error) {
	r := &router{direct: up.direct, log: log}
	r.direct.Refuse = refused.refuser(ownSet(opts), routeSet(opts), loopbackSet(opts))
	if opts.hostWide {
		f, err := sockowner.New()
		if err != nil {
			log.Warn("rules: cannot look up the processes behind flows; uid: and exe: rules match nothing", "err", err)
		} else {
			r.owners = f
		}
	}
	t, err := r.compile(opts, up.group())
	if err != nil {
		r.Close()
		return nil, err
	}
	r.cur.Store(t)
	return r, nil
}

// Close releases the owner lookups' socket.
func (r *router) Close() {
	if r != nil && r.owners != nil {
		r.owners.Close()
	}
}

// compile builds a table of opts' rules over group's upstreams; every
// upstream a rule names must be among them. List files are read again.
func (r *router) compile(opts *options, group *proxy.Group) (*routeTable, error) {
	rs, err := rules.ParseAll(opts.rules)
	if err != nil {
		return nil, fmt.Errorf("--rule: %w", err)
	}
	set, err := rules.Compile(rs, rules.Options{Dir: opts.configDir})
	if err != nil {
		return nil, fmt.Errorf("--rule: %w", err)
	}
	for i := range set.Len() {
		rule := set.Rule(i)
		if a := rule.Action; a.Kind == rules.Proxy && a.Upstream != "" {
			if group == nil {
				return nil, fmt.Errorf("--rule: %s: no upstream %q: there is no proxy (see --proxy NAME=URL)", rule.Label(), a.Upstream)
			}
			if _, ok := group.Only(a.Upstream); !ok {
				return nil, fmt.Errorf("--rule: %s: no upstream named %q (the upstreams are %s)", rule.Label(), a.Upstream, upstreamNames(opts.proxies))
			}
		}
	}
	return &routeTable{set: set, group: group, dialName: opts.dialSniffed, defaultProxy: group != nil, r: r}, nil
}

// swap puts a new table in effect for new flows.
func (r *router) swap(t *routeTable) { r.cur.Store(t) }

// owner finds the local process behind a flow; ok is false when its
// socket cannot be found in time, and then no uid is guessed. A socket
// found without its process still gives its uid.
func (r *router) owner(proto string, client, dst netip.AddrPort) (uint32, string, bool) {
	if proto != "tcp" && proto != "udp" {
		return 0, "", false
	}
	ctx, cancel := context.WithTimeout(context.Background(), ownerTimeout)
	defer cancel()
	o, err := r.owners.Lookup(ctx, proto, client, dst)
	switch {
	case err == nil:
		return o.UID, o.Exe, true
	case errors.Is(err, sockowner.ErrNoProcess):
		return o.UID, "", true
	}
	return 0, "", false
}

func protoOf(s string) rules.Proto {
	switch s {
	case "udp":
		return rules.UDP
	case "icmp":
		return rules.ICMP
	}
	return rules.TCP
}

// route is the stack's Config.Route.
func (r *router) route(f stack.Flow) stack.Decision {
	t := r.cur.Load()
	if t.set.Len() == 0 {
		return stack.Decision{}
	}
	rf := rules.Flow{Proto: protoOf(f.Proto), Dst: f.Dst, Src: f.Client.Addr(), Name: f.Name}
	if r.owners != nil && t.set.HasOwnerRules() {
		// Decide asks at most once per flow.
		rf.Owner = func() (uint32, string, bool) { return r.owner(f.Proto, f.Client, f.Dst) }
	}
	_, rule, needsName := t.set.Decide(&rf)
	d := t.decision(f, rule)
	if needsName && f.Proto != "icmp" {
		d.Sniff = true
	}
	return d
}

// decision carries out rule's action for f; nil takes the default
// upstream.
func (t *routeTable) decision(f stack.Flow, rule *rules.Rule) stack.Decision {
	if rule == nil {
		return stack.Decision{DialName: t.dialName && t.defaultProxy}
	}
	d := stack.Decision{Rule: rule.Label()}
	switch a := rule.Action; a.Kind {
	case rules.Direct:
		d.Dialer, d.UDP, d.Via = t.r.direct, t.r.direct, directName
	case rules.Proxy:
		d.DialName = t.dialName && t.defaultProxy
		if a.Upstream == "" {
			break // the default upstream names itself
		}
		only, _ := t.group.Only(a.Upstream) // compile checked it
		d.Dialer, d.Via = only, a.Upstream
		if only.CarriesUDP() {
			d.UDP = only
		} else if f.Proto == "udp" {
			// SOCKS4 and HTTP CONNECT carry no UDP: refused out loud
			// rather than sent elsewhere.
			d.Action = stack.Reject
		}
	case rules.Reject:
		d.Action = stack.Reject
	case rules.Drop:
		d.Action = stack.Drop
	}
	return d
}

// namePolicy is the DNS server's Config.Policy: what the rules decide for
// a name alone.
func (r *router) namePolicy(name string) dns.NameAction {
	a, ok := r.cur.Load().set.MatchName(name)
	switch {
	case !ok:
		return dns.NameDefault
	case a.Kind == rules.Reject || a.Kind == rules.Drop:
		return dns.NameReject
	case a.Kind == rules.Direct:
		return dns.NameDirect
	}
	return dns.NameDefault
}

// ruleCounts are the rules in effect, as they are written, with how many
// flows each has decided, for the metrics.
func (r *router) ruleCounts() (texts []string, counts []uint64) {
	t := r.cur.Load()
	counts = t.set.Counts()
	texts = make([]string, len(counts))
	for i := range counts {
		texts[i] = t.set.Rule(i).Text
	}
	return texts, counts
}

// noUDP is the UDP side of an upstream that carries none: each
// association is refused, with ICMP port unreachable to the client.
type noUDP struct{}

func (noUDP) ListenPacket(context.Context, string, string) (net.PacketConn, error) {
	return nil, fmt.Errorf("udp: the default upstream carries none: %w", errors.ErrUnsupported)
}
