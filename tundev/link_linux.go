package tundev

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// link configures one interface over rtnetlink and remembers what it
// changed, so that undo can put an attached persistent interface back as it
// was found. It is not safe for concurrent use; Device serialises calls.
type link struct {
	h       *netlink.Handle // socket in the interface's namespace; owned
	nl      netlink.Link
	name    string
	where   string // the namespace, for errors: "the current netns", "netns PATH"
	created bool   // we created the interface, so undo deletes it
	log     *slog.Logger

	// State found on an attached interface, restored by undo.
	origMTU int
	wasUp   bool

	mtuSet bool
	upSet  bool
	addrs  []netip.Prefix // addresses we added (not those already there)
	routes []netip.Prefix // routes we added (not those already there)
}

// newLink looks the interface up by name through h, which it takes over.
func newLink(h *netlink.Handle, name, where string, created bool, log *slog.Logger) (*link, error) {
	nl, err := h.LinkByName(name)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("look up tun %q in %s: %w", name, where, err)
	}
	return &link{
		h:       h,
		nl:      nl,
		name:    name,
		where:   where,
		created: created,
		log:     log,
		origMTU: nl.Attrs().MTU,
		wasUp:   nl.Attrs().Flags&net.FlagUp != 0,
	}, nil
}

func (l *link) setMTU(mtu int) error {
	if mtu == l.origMTU {
		return nil
	}
	if err := l.h.LinkSetMTU(l.nl, mtu); err != nil {
		return fmt.Errorf("set mtu %d on %s: %w", mtu, l.name, err)
	}
	l.mtuSet = true
	return nil
}

// setTxQueueLen sets the queue of packets the kernel holds for us to read
// (the TUN's transmit queue). Only on an interface we created: a
// persistent one keeps its owner's setting.
func (l *link) setTxQueueLen(n int) error {
	if !l.created {
		return nil
	}
	if err := l.h.LinkSetTxQLen(l.nl, n); err != nil {
		return fmt.Errorf("set txqueuelen %d on %s: %w", n, l.name, err)
	}
	return nil
}

// addAddr adds p to the interface. IPv6 addresses get IFA_F_NODAD: duplicate
// address detection keeps an address "tentative", unusable as a source, for
// about a second after the link goes up (RFC 4862 section 5.4), and on a
// point-to-point TUN there is nobody to collide with. The kernel already
// skips DAD on IFF_NOARP devices such as a TUN (addrconf_dad_begin); the flag
// makes that explicit, whatever the device flags and accept_dad sysctls. An
// address that is already there (a persistent interface left configured) is
// accepted and left in place by undo.
func (l *link) addAddr(p netip.Prefix) error {
	if err := l.checkAddrFree(p); err != nil {
		return err
	}
	a := &netlink.Addr{IPNet: ipNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	err := l.h.AddrAdd(l.nl, a)
	if errors.Is(err, unix.EEXIST) {
		l.log.Debug("address already present", "tun", l.name, "addr", p)
		return nil
	}
	if err != nil {
		return fmt.Errorf("add address %s to %s: %w", p, l.name, err)
	}
	l.addrs = append(l.addrs, p)
	l.log.Debug("address added", "tun", l.name, "addr", p)
	return nil
}

// ErrAddrInUse is returned by Create when an address it is to configure
// overlaps one that another interface of the namespace already holds.
var ErrAddrInUse = errors.New("address in use")

// checkAddrFree refuses p when another interface of the namespace holds an
// address in an overlapping subnet: the kernel would accept both and route
// the subnet by whichever prefix route came first, so a second netstackd
// started with the defaults would silently get none of its traffic, or take
// the first one's. Link-local addresses, which every interface has, are
// not compared.
func (l *link) checkAddrFree(p netip.Prefix) error {
	family := netlink.FAMILY_V4
	if p.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	addrs, err := l.h.AddrList(nil, family)
	if err != nil {
		return fmt.Errorf("list addresses %s: %w", l.where, err)
	}
	for _, a := range addrs {
		q := prefixOf(a.IPNet)
		if !q.IsValid() || q.Addr().IsLinkLocalUnicast() || a.LinkIndex == l.nl.Attrs().Index {
			continue
		}
		if q.Masked().Overlaps(p.Masked()) {
			owner := strconv.Itoa(a.LinkIndex)
			if other, err := l.h.LinkByIndex(a.LinkIndex); err == nil {
				owner = other.Attrs().Name
			}
			return fmt.Errorf("add address %s to %s: %w: %s on %s in %s overlaps it",
				p, l.name, ErrAddrInUse, q, owner, l.where)
		}
	}
	return nil
}

// up sets the link up and then adds routes, in that order, so that routes
// appearing means the device is ready. On failure it undoes both.
func (l *link) up(routes []netip.Prefix) error {
	if !l.wasUp {
		if err := l.h.LinkSetUp(l.nl); err != nil {
			return fmt.Errorf("set %s up: %w", l.name, err)
		}
		l.upSet = true
	}
	for _, r := range routes {
		if err := l.addRoute(r); err != nil {
			return errors.Join(err, l.down())
		}
	}
	return nil
}

// down removes the routes we added and sets the link down if we set it up.
func (l *link) down() error {
	var errs []error
	for i := len(l.routes) - 1; i >= 0; i-- {
		if err := l.h.RouteDel(l.route(l.routes[i])); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete route %s via %s: %w", l.routes[i], l.name, err))
		}
	}
	l.routes = nil
	if l.upSet {
		if err := l.h.LinkSetDown(l.nl); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("set %s down: %w", l.name, err))
		}
		l.upSet = false
	}
	return errors.Join(errs...)
}

func (l *link) route(p netip.Prefix) *netlink.Route {
	r := &netlink.Route{LinkIndex: l.nl.Attrs().Index, Dst: ipNet(p)}
	if p.Addr().Is4() {
		// What `ip route add PREFIX dev NAME` sets: the destination is
		// directly on the link, no gateway. IPv6 routes keep the universe
		// scope, as ip does.
		r.Scope = netlink.SCOPE_LINK
	}
	return r
}

// addRoute adds a route to p through the interface. A route to p that is
// already there through this interface (a persistent interface left
// configured) is accepted and left in place by undo; one through another
// interface is an error, since traffic would not reach us.
func (l *link) addRoute(p netip.Prefix) error {
	err := l.h.RouteAdd(l.route(p))
	if errors.Is(err, unix.EEXIST) {
		mine, lerr := l.hasRoute(p)
		if lerr != nil {
			return fmt.Errorf("add route %s via %s: %w (and listing routes: %w)", p, l.name, err, lerr)
		}
		if mine {
			l.log.Debug("route already present", "tun", l.name, "route", p)
			return nil
		}
		return fmt.Errorf("add route %s via %s: %w (a route to it with the same metric exists via another interface)", p, l.name, err)
	}
	if err != nil {
		return fmt.Errorf("add route %s via %s: %w", p, l.name, err)
	}
	l.routes = append(l.routes, p)
	l.log.Debug("route added", "tun", l.name, "route", p)
	return nil
}

// hasRoute reports whether the main table routes p through the interface.
func (l *link) hasRoute(p netip.Prefix) (bool, error) {
	family := netlink.FAMILY_V4
	if p.Addr().Is6() {
		family = netlink.FAMILY_V6
	}
	filter := &netlink.Route{LinkIndex: l.nl.Attrs().Index, Table: unix.RT_TABLE_MAIN}
	var rs []netlink.Route
	var err error
	// A dump that changed while the kernel wrote it is flagged
	// NLM_F_DUMP_INTR; netlink v1.3.1 then returns the partial result with
	// ErrDumpInterrupted. Ask again a few times.
	for range 3 {
		rs, err = l.h.RouteListFiltered(family, filter, netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			break
		}
	}
	if err != nil {
		return false, err
	}
	for _, r := range rs {
		if r.Dst != nil && prefixOf(r.Dst) == p {
			return true, nil
		}
	}
	return false, nil
}

// undo reverses what the link did to the interface, then closes the
// netlink handle. An interface we created is deleted if it still exists
// (closing its last fd usually deleted it already). On an attached one, the
// routes and addresses we added go, and the MTU and link state come back.
// Things already gone are not errors.
func (l *link) undo() error {
	defer l.h.Close()
	if l.created {
		cur, err := l.h.LinkByIndex(l.nl.Attrs().Index)
		if isNotFound(err) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("look up tun %s: %w", l.name, err)
		}
		if cur.Attrs().Name != l.name {
			return nil // ours is gone and its index was reused
		}
		if err := l.h.LinkDel(cur); err != nil && !isNotFound(err) {
			return fmt.Errorf("delete tun %s: %w", l.name, err)
		}
		return nil
	}
	errs := []error{l.down()}
	for i := len(l.addrs) - 1; i >= 0; i-- {
		p := l.addrs[i]
		if err := l.h.AddrDel(l.nl, &netlink.Addr{IPNet: ipNet(p)}); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("delete address %s from %s: %w", p, l.name, err))
		}
	}
	l.addrs = nil
	if l.mtuSet {
		if err := l.h.LinkSetMTU(l.nl, l.origMTU); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("restore mtu %d on %s: %w", l.origMTU, l.name, err))
		}
		l.mtuSet = false
	}
	return errors.Join(errs...)
}

// bringUpLoopback sets lo up through h. A fresh namespace has lo down, and
// without it nothing inside can reach even 127.0.0.1.
func bringUpLoopback(h *netlink.Handle) error {
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("look up lo: %w", err)
	}
	if lo.Attrs().Flags&net.FlagUp != 0 {
		return nil
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	return nil
}

// isNotFound reports whether err says that the link, address or route we
// meant to act on no longer exists.
func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) ||
		errors.Is(err, unix.ENODEV) || // link gone
		errors.Is(err, unix.EADDRNOTAVAIL) || // address gone
		errors.Is(err, unix.ESRCH) // route gone
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{
		IP:   p.Addr().AsSlice(),
		Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()),
	}
}

// prefixOf converts a route destination from netlink, giving the invalid
// Prefix for anything that is not an IP prefix.
func prefixOf(n *net.IPNet) netip.Prefix {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}
	}
	ones, bits := n.Mask.Size()
	if bits == 0 {
		return netip.Prefix{}
	}
	if bits == 32 {
		a = a.Unmap()
	}
	return netip.PrefixFrom(a, ones)
}
