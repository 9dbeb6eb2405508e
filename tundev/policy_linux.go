package tundev

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Host-wide policy routing, in the manner of wg-quick(8): the routes through
// the TUN go into a table of their own, not main, and two rules choose
// between that table and main per packet:
//
//	PRIO:   from all lookup main suppress_prefixlength 0
//	PRIO+1: not from all fwmark MARK lookup TABLE
//
// The first lets every route of main more specific than a default route
// (the LAN, container bridges, the TUN's own prefix) win as before, and
// ignores main's default routes. The second sends what is left to the TUN,
// unless the socket carries MARK: netstackd marks its own upstream sockets
// (SO_MARK), which therefore fall through to main's rule and leave by the
// original default route instead of looping back into the TUN. Excluded
// destinations are "throw" routes in TABLE: a lookup that hits one goes on
// to the next rule, main.
//
// Everything is identified by the table number and the two priorities, so
// that what a killed instance left behind is found and removed by the next
// one.

// DefaultPolicyPriority is the priority of the first of the two rules when
// PolicyConfig.Priority is 0; the second has the next one. Both sit before
// main's rule (32766), away from the priorities wg-quick (32764, 32765) and
// ip rule add (counting down from 32765) pick for themselves.
const DefaultPolicyPriority = 28270

// PolicyConfig describes the policy routing that InstallPolicy sets up.
type PolicyConfig struct {
	// NetnsPath is the network namespace to act in; "" means the current
	// one, where netstackd's own sockets live.
	NetnsPath string
	// Link is the interface the routes go through (the TUN); it must exist.
	Link string
	// Routes are the destinations to send through Link for unmarked
	// traffic; rules are added for the families present. Host bits must be
	// zero. At least one is required.
	Routes []netip.Prefix
	// Exclude are destinations kept off Link whatever Routes say. Those of
	// a family without Routes are ignored.
	Exclude []netip.Prefix
	// Mark is the firewall mark of the sockets that must not enter Link;
	// not 0.
	Mark uint32
	// Table is the routing table Routes go into: not 0, nor main, local or
	// default (253 to 255).
	Table int
	// Priority is the priority of the first rule, the second has the next;
	// 0 means DefaultPolicyPriority.
	Priority int
	// Logger receives what was installed and what stale state was removed;
	// nil means discard.
	Logger *slog.Logger
}

// Policy is installed policy routing. Close removes it.
type Policy struct {
	h      *netlink.Handle
	log    *slog.Logger
	table  int
	rules  []*netlink.Rule  // added, in order
	routes []*netlink.Route // added, in order

	closeOnce sync.Once
	closeErr  error
}

// ErrPolicyInUse means the routing table already routes through another
// live interface: another instance in host-wide mode, most likely.
var ErrPolicyInUse = errors.New("routing table in use")

// InstallPolicy removes what an earlier instance with the same table and
// priorities left behind (logging it), adds the routes to the table and then
// the rules, so that the rules appearing means the policy is complete. On
// error it removes what it added.
func InstallPolicy(cfg PolicyConfig) (_ *Policy, err error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	ns := noNetns
	if cfg.NetnsPath != "" {
		if ns, err = openNetns(cfg.NetnsPath); err != nil {
			return nil, err
		}
		defer unix.Close(ns)
	}
	h, err := newHandle(ns)
	if err != nil {
		return nil, err
	}
	p := &Policy{h: h, log: log, table: cfg.Table}
	defer func() {
		if err != nil {
			err = errors.Join(err, p.Close())
		}
	}()
	link, err := h.LinkByName(cfg.Link)
	if err != nil {
		return nil, fmt.Errorf("host-wide routing: look up %s: %w", cfg.Link, err)
	}
	if err := p.removeStale(cfg, link.Attrs().Index); err != nil {
		return nil, err
	}

	families := map[int]bool{}
	for _, r := range cfg.Routes {
		families[family(r)] = true
		rt := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipNet(r), Table: cfg.Table}
		if r.Addr().Is4() {
			rt.Scope = netlink.SCOPE_LINK // as `ip route add PREFIX dev NAME`
		}
		if err := p.addRoute(rt); err != nil {
			return nil, err
		}
	}
	var excluded []netip.Prefix
	for _, x := range cfg.Exclude {
		if !families[family(x)] {
			log.Debug("exclusion ignored: no route of its family goes through the tun", "exclude", x)
			continue
		}
		if err := p.addRoute(&netlink.Route{Dst: ipNet(x), Table: cfg.Table, Type: unix.RTN_THROW}); err != nil {
			return nil, err
		}
		excluded = append(excluded, x)
	}
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if !families[fam] {
			continue
		}
		for _, r := range policyRules(fam, cfg.Mark, cfg.Table, cfg.Priority) {
			if err := h.RuleAdd(r); err != nil {
				return nil, fmt.Errorf("host-wide routing: add rule %s: %w", ruleString(r), err)
			}
			p.rules = append(p.rules, r)
		}
	}
	log.Info("host-wide routing installed", "tun", cfg.Link, "table", cfg.Table,
		"fwmark", fmt.Sprintf("%#x", cfg.Mark), "priorities", fmt.Sprintf("%d,%d", cfg.Priority, cfg.Priority+1),
		"routes", fmt.Sprint(cfg.Routes), "exclude", fmt.Sprint(excluded))
	return p, nil
}

func (c *PolicyConfig) normalize() error {
	if c.Priority == 0 {
		c.Priority = DefaultPolicyPriority
	}
	switch {
	case c.Link == "":
		return errors.New("host-wide routing: no interface")
	case c.Mark == 0:
		return errors.New("host-wide routing: fwmark 0 marks nothing")
	case c.Table <= 0 || (c.Table >= unix.RT_TABLE_DEFAULT && c.Table <= unix.RT_TABLE_LOCAL):
		return fmt.Errorf("host-wide routing: table %d is reserved (want 1 to 252 or above 255)", c.Table)
	case c.Priority < 1 || c.Priority+1 >= 32766:
		return fmt.Errorf("host-wide routing: rule priority %d: want 1 to 32764, before main's 32766", c.Priority)
	case len(c.Routes) == 0:
		return errors.New("host-wide routing: no routes")
	}
	for _, list := range [][]netip.Prefix{c.Routes, c.Exclude} {
		for _, p := range list {
			if !p.IsValid() || p.Addr().Is4In6() {
				return fmt.Errorf("host-wide routing: %s: not an IPv4 or IPv6 prefix", p)
			}
			if p != p.Masked() {
				return fmt.Errorf("host-wide routing: %s: host bits set (did you mean %s?)", p, p.Masked())
			}
		}
	}
	c.Routes = slices.Compact(sortedPrefixes(c.Routes))
	c.Exclude = slices.Compact(sortedPrefixes(c.Exclude))
	return nil
}

func sortedPrefixes(ps []netip.Prefix) []netip.Prefix {
	ps = slices.Clone(ps)
	slices.SortFunc(ps, func(a, b netip.Prefix) int {
		if c := a.Addr().Compare(b.Addr()); c != 0 {
			return c
		}
		return a.Bits() - b.Bits()
	})
	return ps
}

// policyRules are the two rules of one family, in the order they are added.
func policyRules(fam int, mark uint32, table, prio int) []*netlink.Rule {
	main := netlink.NewRule()
	main.Family = fam
	main.Priority = prio
	main.Table = unix.RT_TABLE_MAIN
	main.SuppressPrefixlen = 0

	tun := netlink.NewRule()
	tun.Family = fam
	tun.Priority = prio + 1
	tun.Table = table
	tun.Mark = mark
	mask := uint32(0xffffffff)
	tun.Mask = &mask
	tun.Invert = true
	return []*netlink.Rule{main, tun}
}

// isOurRule reports whether r is one of the rules policyRules makes for this
// table and priority, whatever the mark.
func isOurRule(r netlink.Rule, table, prio int) bool {
	switch r.Priority {
	case prio:
		return r.Table == unix.RT_TABLE_MAIN && r.SuppressPrefixlen == 0
	case prio + 1:
		return r.Table == table && r.Invert
	}
	return false
}

func ruleString(r *netlink.Rule) string {
	if r.Table == unix.RT_TABLE_MAIN {
		return fmt.Sprintf("%d: lookup main suppress_prefixlength %d", r.Priority, r.SuppressPrefixlen)
	}
	return fmt.Sprintf("%d: not fwmark %#x lookup %d", r.Priority, r.Mark, r.Table)
}

func family(p netip.Prefix) int {
	if p.Addr().Is4() {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}

func (p *Policy) addRoute(rt *netlink.Route) error {
	if err := p.h.RouteAdd(rt); err != nil {
		what := "route"
		if rt.Type == unix.RTN_THROW {
			what = "throw route"
		}
		return fmt.Errorf("host-wide routing: add %s %s to table %d: %w", what, prefixOf(rt.Dst), p.table, err)
	}
	p.routes = append(p.routes, rt)
	return nil
}

// removeStale deletes the rules with our priorities and table, and every
// route in our table, that an earlier instance left: one killed with
// SIGKILL never ran its Close. A route of the table through an interface
// that is still up and is not ours means a live owner: ErrPolicyInUse.
func (p *Policy) removeStale(cfg PolicyConfig, ours int) error {
	var rules []netlink.Rule
	var routes []netlink.Route
	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		rs, err := retryDump(func() ([]netlink.Rule, error) { return p.h.RuleList(fam) })
		if errors.Is(err, unix.EAFNOSUPPORT) {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return fmt.Errorf("host-wide routing: list rules: %w", err)
		}
		for _, r := range rs {
			if isOurRule(r, cfg.Table, cfg.Priority) {
				rules = append(rules, r)
			}
		}
		filter := &netlink.Route{Table: cfg.Table}
		rts, err := retryDump(func() ([]netlink.Route, error) {
			return p.h.RouteListFiltered(fam, filter, netlink.RT_FILTER_TABLE)
		})
		if err != nil {
			return fmt.Errorf("host-wide routing: list table %d: %w", cfg.Table, err)
		}
		for _, rt := range rts {
			// Throw routes name no interface (IPv6 ones show lo).
			if rt.Type == unix.RTN_UNICAST && rt.LinkIndex > 0 && rt.LinkIndex != ours {
				l, err := p.h.LinkByIndex(rt.LinkIndex)
				if err == nil && l.Attrs().RawFlags&unix.IFF_LOWER_UP != 0 {
					return fmt.Errorf("host-wide routing: table %d routes %s through %s, which is up: %w (another netstackd in host-wide mode? choose another --table and --fwmark)",
						cfg.Table, prefixOf(rt.Dst), l.Attrs().Name, ErrPolicyInUse)
				}
			}
			routes = append(routes, rt)
		}
	}
	if len(rules) == 0 && len(routes) == 0 {
		return nil
	}
	var errs []error
	for i := range rules {
		if err := p.h.RuleDel(&rules[i]); err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("delete stale rule %s: %w", ruleString(&rules[i]), err))
		}
	}
	for i := range routes {
		if err := p.h.RouteDel(&routes[i]); err != nil && !isGone(err) {
			errs = append(errs, fmt.Errorf("delete stale route %s from table %d: %w", prefixOf(routes[i].Dst), cfg.Table, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("host-wide routing: %w", err)
	}
	p.log.Info("removed stale host-wide routing left by an earlier netstackd", "table", cfg.Table,
		"priorities", fmt.Sprintf("%d,%d", cfg.Priority, cfg.Priority+1), "rules", len(rules), "routes", len(routes))
	return nil
}

// retryDump asks again when a dump changed while the kernel wrote it
// (netlink v1.3.1 returns ErrDumpInterrupted with a partial result).
func retryDump[T any](list func() ([]T, error)) ([]T, error) {
	var res []T
	var err error
	for range 3 {
		res, err = list()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	return res, err
}

// isGone reports whether a delete failed only because the rule or route
// is no longer there.
func isGone(err error) bool {
	return isNotFound(err) || errors.Is(err, unix.ENOENT)
}

// Close removes the rules and then the routes InstallPolicy added; things
// already gone are not errors. Later calls return the first call's result.
// It needs CAP_NET_ADMIN, which netstackd keeps for it after dropping
// privileges.
func (p *Policy) Close() error {
	p.closeOnce.Do(func() {
		var errs []error
		for i := len(p.rules) - 1; i >= 0; i-- {
			if err := p.h.RuleDel(p.rules[i]); err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("delete rule %s: %w", ruleString(p.rules[i]), err))
			}
		}
		for i := len(p.routes) - 1; i >= 0; i-- {
			if err := p.h.RouteDel(p.routes[i]); err != nil && !isGone(err) {
				errs = append(errs, fmt.Errorf("delete route %s from table %d: %w", prefixOf(p.routes[i].Dst), p.table, err))
			}
		}
		p.h.Close()
		if err := errors.Join(errs...); err != nil {
			p.closeErr = fmt.Errorf("host-wide routing: %w", err)
		}
		if len(p.rules)+len(p.routes) > 0 {
			p.log.Info("host-wide routing removed", "table", p.table, "rules", len(p.rules), "routes", len(p.routes), "err", p.closeErr)
		}
	})
	return p.closeErr
}
