package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
)

// Host-wide mode: the TUN gets the default routes of netstackd's own
// namespace. Its routes go into a table of their own (--table) that only
// unmarked traffic consults, and every socket netstackd opens towards the
// outside carries the firewall mark (--fwmark): flows, the proxy server's
// connection, direct UDP, ping sockets, DNS forwarding and netstackd's own
// name lookups. Marked traffic is routed by the main table as if netstackd
// were not there, so nothing loops back into the TUN. tundev/policy_linux.go
// holds the rules and routes.

const (
	// defaultFwmark and defaultTable: "ns" in ASCII, 28275.
	defaultFwmark = 0x6e73
	defaultTable  = 0x6e73
)

// markControl returns a Control func for net.Dialer and net.ListenConfig
// that puts mark on the socket (SO_MARK needs CAP_NET_ADMIN).
func markControl(mark uint32) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		})
		if err = errors.Join(err, serr); err != nil {
			return fmt.Errorf("set fwmark %#x: %w", mark, err)
		}
		return nil
	}
}

// chainControl returns a Control func that calls each of controls in turn,
// stopping at the first error.
func chainControl(controls ...func(network, address string, c syscall.RawConn) error) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		for _, control := range controls {
			if err := control(network, address, c); err != nil {
				return err
			}
		}
		return nil
	}
}

// markedResolver is a pure-Go resolver (it reads /etc/resolv.conf as usual)
// whose DNS sockets pass through control.
func markedResolver(control func(network, address string, c syscall.RawConn) error) *net.Resolver {
	return &net.Resolver{
		PreferGo: true,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			d := net.Dialer{Control: control}
			return d.DialContext(ctx, network, address)
		},
	}
}

// upstream is how netstackd reaches the far end of its flows.
type upstream struct {
	// noUDP: no upstream at start carries UDP, though dialer (a
	// liveDialer) has a ListenPacket; UDP is refused from the start, as
	// for SOCKS4 and HTTP.
	noUDP bool
	// dialer reaches the flows' destinations: a Direct that also refuses
	// loopback (unless --allow-host-loopback), or live.
	dialer proxy.Dialer
	// live is the group of proxy upstreams in use (upstreams.go); nil when
	// direct.
	live *liveDialer
	// routes are the routing rules (router.go), set once the upstreams
	// are.
	routes *router
	// direct makes netstackd's own direct sockets and name lookups: marked
	// when opts.fwmark is set, never to netstackd's own addresses
	// (refuse.go). It reaches the proxy servers and, in direct mode, the
	// DNS upstream, either of which may be on loopback.
	direct proxy.Direct
	// refuse is the stack's Config.Refuse: what the dialer refuses, or
	// with a proxy netstackd's own addresses, refused before the proxy is
	// asked.
	refuse func(netip.Addr) bool
	// serverAddrs are the proxy servers' addresses, resolved once at start
	// in host-wide mode; nil otherwise or when direct.
	serverAddrs []netip.Addr
}

// errResolveProxy marks a failure to resolve the proxy server at start: the
// network's fault, not the command line's.
var errResolveProxy = errors.New("resolve proxy server")

// newUpstream builds the dialer of --proxy on top of a marked Direct: the
// Direct itself, or a group of the proxies with health checks, started
// (upstreams.go); onDown is the group's proxy.GroupConfig.OnDown.
//
// Every Direct in it refuses destinations as refuse.go describes, counted
// and logged by refused.
func newUpstream(ctx context.Context, opts *options, refused *refusals, onDown func(string), log *slog.Logger) (*upstream, error) {
	up := &upstream{}
	own := refused.refuser(ownSet(opts), routeSet(opts))
	up.direct.Refuse = own
	if opts.fwmark != 0 {
		up.direct.Control = markControl(opts.fwmark)
		// Its lookups too: a resolv.conf naming --dns-addr would send
		// them into the TUN.
		up.direct.Resolver = markedResolver(chainControl(proxy.RefuseControl(own), up.direct.Control))
	}
	if opts.isDirect() {
		flows := refused.refuser(ownSet(opts), routeSet(opts), loopbackSet(opts))
		direct := up.direct
		direct.Refuse = flows
		up.dialer, up.refuse = direct, flows
		return up, nil
	}
	g, addrs, err := newGroup(ctx, opts, up.direct, onDown, log)
	if err != nil {
		return nil, err
	}
	up.serverAddrs = addrs
	up.refuse = refused.refuser(ownSet(opts))
	up.live = newLiveDialer(g)
	up.dialer, up.noUDP = up.live, !g.CarriesUDP()
	return up, nil
}

// newGroup makes the proxy.Group of opts.proxies, each dialing its server
// through direct; it has not started checking. In host-wide mode a proxy
// server given by name is resolved now, once, and always dialed at those
// addresses (returned), which are then excluded from the TUN: a later
// lookup could go through the TUN (a local stub resolver forwards without
// the mark) and come back with a fake address.
func newGroup(ctx context.Context, opts *options, direct proxy.Direct, onDown func(string), log *slog.Logger) (*proxy.Group, []netip.Addr, error) {
	var members []proxy.Upstream
	var serverAddrs []netip.Addr
	for _, p := range opts.proxies {
		d, err := proxy.FromURL(p.url, direct)
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", p.name, err)
		}
		if opts.hostWide {
			var addrs []netip.Addr
			if d, addrs, err = pinServer(ctx, d, direct); err != nil {
				return nil, nil, fmt.Errorf("%s: %w", p.name, err)
			}
			serverAddrs = append(serverAddrs, addrs...)
		}
		members = append(members, proxy.Upstream{Name: p.name, Dialer: d})
	}
	g, err := proxy.NewGroup(proxy.GroupConfig{
		Members:      members,
		Interval:     healthInterval,
		ProbeTimeout: min(opts.dialTimeout, healthInterval),
		OnDown:       onDown,
		Logger:       log,
	})
	return g, serverAddrs, err
}

// pinServer resolves d's proxy server once and returns a copy of d that
// always dials it at those addresses, and the addresses.
func pinServer(ctx context.Context, d proxy.Dialer, direct proxy.Direct) (proxy.Dialer, []netip.Addr, error) {
	server, withForward := proxyServer(d)
	if server == "" {
		return d, nil, nil
	}
	host, port, err := net.SplitHostPort(server)
	if err != nil {
		return nil, nil, fmt.Errorf("proxy server %q: %w", server, err)
	}
	if a, err := netip.ParseAddr(host); err == nil {
		return d, []netip.Addr{a.Unmap()}, nil
	}
	resolver := direct.Resolver
	if resolver == nil {
		resolver = net.DefaultResolver
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	addrs, err := resolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, nil, fmt.Errorf("%w %s: %w", errResolveProxy, host, err)
	}
	pinned := pinnedDialer{Direct: direct, server: server}
	var out []netip.Addr
	for _, a := range addrs {
		a = a.Unmap()
		out = append(out, a)
		pinned.addrs = append(pinned.addrs, net.JoinHostPort(a.String(), port))
	}
	return withForward(pinned), out, nil
}

// proxyServer returns the server of a proxy dialer and a func that gives a
// copy of it with another Forward; "" for Direct.
func proxyServer(d proxy.Dialer) (string, func(proxy.Dialer) proxy.Dialer) {
	switch p := d.(type) {
	case proxy.SOCKS5:
		return p.Server, func(f proxy.Dialer) proxy.Dialer { p.Forward = f; return p }
	case proxy.SOCKS4:
		return p.Server, func(f proxy.Dialer) proxy.Dialer { p.Forward = f; return p }
	case proxy.HTTPConnect:
		return p.Server, func(f proxy.Dialer) proxy.Dialer { p.Forward = f; return p }
	}
	return "", nil
}

// pinnedDialer dials server at the addresses it was resolved to at start,
// in order, and anything else as its Direct would. Its ListenPacket is the
// Direct's, so the socket a SOCKS5 UDP association opens is marked too.
type pinnedDialer struct {
	proxy.Direct
	server string   // "host:port" as the proxy dialer asks for it
	addrs  []string // "ip:port"
}

func (p pinnedDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	if address != p.server {
		return p.Direct.DialContext(ctx, network, address)
	}
	var errs []error
	for _, a := range p.addrs {
		c, err := p.Direct.DialContext(ctx, network, a)
		if err == nil {
			return c, nil
		}
		errs = append(errs, err)
		if ctx.Err() != nil {
			break
		}
	}
	return nil, errors.Join(errs...)
}

// hostWideExcludes is --exclude plus the proxy server's own addresses
// (loopback ones need nothing: the local table answers for them first).
func hostWideExcludes(opts *options, up *upstream) []netip.Prefix {
	ex := append([]netip.Prefix(nil), opts.excludes...)
	for _, a := range up.serverAddrs {
		if !a.IsLoopback() {
			ex = append(ex, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return ex
}

// warnStrictRPFilter warns about interfaces whose strict reverse-path
// filter (rp_filter 1, the larger of "all" and the interface's value
// applies) drops the replies to netstackd's marked IPv4 connections: the
// kernel checks a reply's source without the mark, finds the TUN's route,
// and the reply came in elsewhere. Loose mode (2) accepts them.
func warnStrictRPFilter(tun string, log *slog.Logger) {
	read := func(dev string) int {
		b, err := os.ReadFile(filepath.Join("/proc/sys/net/ipv4/conf", dev, "rp_filter"))
		if err != nil {
			return 0
		}
		switch strings.TrimSpace(string(b)) {
		case "1":
			return 1
		case "2":
			return 2
		}
		return 0
	}
	all := read("all")
	devs, _ := filepath.Glob("/proc/sys/net/ipv4/conf/*")
	var strict []string
	for _, d := range devs {
		name := filepath.Base(d)
		if name == "all" || name == "default" || name == "lo" || name == tun {
			continue
		}
		if max(all, read(name)) == 1 {
			strict = append(strict, name)
		}
	}
	if len(strict) > 0 {
		log.Warn("strict reverse-path filtering drops replies to netstackd's own IPv4 connections in host-wide mode: set loose mode (sysctl net.ipv4.conf.all.rp_filter=2 and on each interface listed)",
			"interfaces", strings.Join(strict, ","))
	}
}

// group is the group of proxy upstreams in use; nil when direct.
func (u *upstream) group() *proxy.Group {
	if u.live == nil {
		return nil
	}
	return u.live.get()
}

// udp is what opens the flows' UDP associations: nil when the upstream
// carries no UDP (SOCKS4, HTTP CONNECT), which the stack then refuses.
func (u *upstream) udp() stack.UDPDialer {
	if d, ok := u.dialer.(stack.UDPDialer); ok && !u.noUDP {
		return d
	}
	return nil
}
