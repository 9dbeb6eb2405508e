package main

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"os"
	"os/signal"
	"slices"
	"syscall"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
)

// SIGHUP makes the daemon read its command line and --config file again
// and apply what can change while flows run: the log level, the upstreams
// (a new group replaces the old: new flows use it, flows already open keep
// their conns), the routing rules (compiled again, list files read again,
// whether or not they changed: new flows take them, open ones keep their
// route), the DNS upstream (--dns-upstream) and the timeouts
// (--dial-timeout, --tcp-handshake-timeout, --sniff-timeout,
// --udp-timeout). What cannot change without a restart (the TUN, its
// addresses and routes, the other DNS settings, the limits the tables were
// sized with) is reported and kept. A file that does not parse, or a proxy
// URL that is not valid, is refused with the reason and nothing changes.
// `run` passes SIGHUP to its program instead.

// reloader applies a new configuration on SIGHUP.
type reloader struct {
	args []string // the command line, read again
	// running is each configuration key's value in effect: what the
	// daemon started with, and what reloads have applied since. A
	// reload's own copy: the options the daemon runs on stay untouched.
	running map[string]string
	level   *slog.LevelVar
	// live is the proxy group a reload replaces: nil in direct, host-wide
	// and run mode. Its replacement dials through direct and calls
	// onDown, as the first did.
	live *liveDialer
	// group is the proxy group in use, which a reload's rules name with
	// proxy:NAME: the one live holds, or host-wide mode's, which a reload
	// keeps; nil when direct.
	group  func() *proxy.Group
	direct proxy.Direct
	onDown func(string)
	// resolver's upstream (--dns-upstream) a reload changes; nil with
	// --dns off.
	resolver *dns.Server
	// routes are the rules a reload compiles again.
	routes *router
	// stack is the running stack, whose timeouts a reload changes; nil
	// until it runs.
	stack func() *stack.Stack
	log   *slog.Logger
}

func newReloader(args []string, opts *options, level *slog.LevelVar, up *upstream, onDown func(string), resolver *dns.Server, log *slog.Logger) *reloader {
	r := &reloader{args: args, running: maps.Clone(opts.effective), level: level, group: up.group, direct: up.direct, onDown: onDown, resolver: resolver, routes: up.routes, log: log}
	if !opts.hostWide {
		r.live = up.live
	}
	return r
}

// run reloads on every signal from sigs until ctx ends.
func (r *reloader) run(ctx context.Context, sigs <-chan os.Signal) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-sigs:
			r.reload(ctx)
		}
	}
}

// reload reads the configuration again and applies it; it returns the keys
// it changed, those that differ but cannot change now, and why nothing
// changed when it refused the new configuration.
func (r *reloader) reload(ctx context.Context) (changed, kept []string, err error) {
	next, err := parseFlags(r.args, false, io.Discard)
	if err != nil {
		r.log.Error("reload refused: the configuration in effect stays", "err", err)
		return nil, nil, err
	}
	var group *proxy.Group
	for _, k := range diffConfig(r.running, next.effective) {
		switch {
		case k == "log-level":
			changed = append(changed, k)
		case (k == "proxy" || k == "socks") && r.live != nil && !next.isDirect():
			if group == nil {
				if group, _, err = newGroup(ctx, next, r.direct, r.onDown, r.log); err != nil {
					r.log.Error("reload refused: the configuration in effect stays", "err", fmt.Errorf("--proxy: %w", err))
					return nil, nil, err
				}
			}
			changed = append(changed, k)
		case k == "dns-upstream" && r.resolver != nil:
			changed = append(changed, k)
		case (k == "rule" || k == "dial-sniffed-name") && r.routes != nil:
			changed = append(changed, k)
		case timeoutKeys[k] && r.stack != nil && r.stack() != nil:
			changed = append(changed, k)
		default:
			kept = append(kept, k)
		}
	}
	// The changes that may still fail go first: a refused reload changes
	// nothing (the group built above is not started yet).
	var routes *routeTable
	if r.routes != nil {
		g := group
		if g == nil {
			g = r.group()
		}
		if routes, err = r.routes.compile(next, g); err != nil {
			r.log.Error("reload refused: the configuration in effect stays", "err", err)
			return nil, nil, err
		}
	}
	if slices.Contains(changed, "dns-upstream") {
		if err := r.resolver.SetUpstream(next.dnsUpstream); err != nil {
			r.log.Error("reload refused: the configuration in effect stays", "err", fmt.Errorf("--dns-upstream: %w", err))
			return nil, nil, err
		}
	}
	if slices.Contains(changed, "log-level") {
		r.level.Set(next.logLevel)
	}
	if group != nil {
		r.live.swap(group)
	}
	if routes != nil {
		r.routes.swap(routes)
	}
	if slices.ContainsFunc(changed, func(k string) bool { return timeoutKeys[k] }) {
		r.stack().SetTimeouts(stack.Timeouts{
			Dial: next.dialTimeout, Handshake: next.handshakeTimeout, Sniff: next.sniffTimeout, UDP: next.udpTimeout,
		})
	}
	// Only what was applied is running now: a key kept keeps differing,
	// and is reported again by the next reload.
	for _, k := range changed {
		r.running[k] = next.effective[k]
	}
	attrs := []any{"changed", changed, "kept", kept}
	if group != nil {
		attrs = append(attrs, "proxy", r.live)
	}
	r.log.Info("reloaded", attrs...)
	if len(kept) > 0 {
		r.log.Warn("reload: these cannot change while running and keep their values; restart to apply them", "keys", kept)
	}
	return changed, kept, nil
}

// timeoutKeys are the limits a reload applies to the running stack: new
// flows, and each UDP association's next idle check, take them.
var timeoutKeys = map[string]bool{"dial-timeout": true, "tcp-handshake-timeout": true, "sniff-timeout": true, "udp-timeout": true}

// diffConfig lists the keys whose values differ, in order.
func diffConfig(a, b map[string]string) []string {
	var keys []string
	for k, v := range a {
		if b[k] != v {
			keys = append(keys, k)
		}
	}
	for k := range b {
		if _, ok := a[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// notifyReload delivers SIGHUP on the channel it returns until stop.
func notifyReload() (<-chan os.Signal, func()) {
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGHUP)
	return c, func() { signal.Stop(c) }
}
