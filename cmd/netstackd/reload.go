package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"os"
	"os/signal"
	"slices"
	"sync/atomic"
	"syscall"

	"github.com/netstackd/netstackd/proxy"
)

// SIGHUP makes the daemon read its command line and --config file again
// and apply what can change while flows run: the log level and the proxy
// (new flows use the new one; flows already open keep theirs). What cannot
// change without a restart (the TUN, its addresses and routes, the DNS
// mode, the limits the tables were sized with) is reported and kept. A file
// that does not parse, or a proxy URL that is not valid, is refused with
// the reason and nothing changes. `run` passes SIGHUP to its program
// instead.

// liveDialer is the proxy that the stack, its UDP associations and the DNS
// forwarder dial through; a reload replaces it.
type liveDialer struct {
	cur atomic.Pointer[dialerBox]
}

type dialerBox struct{ d proxy.Dialer }

func newLiveDialer(d proxy.Dialer) *liveDialer {
	l := &liveDialer{}
	l.set(d)
	return l
}

func (l *liveDialer) get() proxy.Dialer  { return l.cur.Load().d }
func (l *liveDialer) set(d proxy.Dialer) { l.cur.Store(&dialerBox{d}) }

func (l *liveDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return l.get().DialContext(ctx, network, address)
}

// ListenPacket opens a UDP association through the proxy in use, if it
// carries UDP.
func (l *liveDialer) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	d := l.get()
	pl, ok := d.(proxy.PacketListener)
	if !ok {
		return nil, fmt.Errorf("udp via %v: %w", d, errors.ErrUnsupported)
	}
	return pl.ListenPacket(ctx, network, address)
}

// Probe checks the proxy in use (proxy.Prober).
func (l *liveDialer) Probe(ctx context.Context) error { return proxy.Probe(ctx, l.get()) }

func (l *liveDialer) String() string { return fmt.Sprint(l.get()) }

// LogValue keeps the proxy's own, which leaves out its password.
func (l *liveDialer) LogValue() slog.Value {
	if v, ok := l.get().(slog.LogValuer); ok {
		return v.LogValue()
	}
	return slog.StringValue(l.String())
}

// reloader applies a new configuration on SIGHUP.
type reloader struct {
	args []string // the command line, read again
	// running is each configuration key's value in effect: what the
	// daemon started with, and what reloads have applied since. A
	// reload's own copy: the options the daemon runs on stay untouched.
	running map[string]string
	level   *slog.LevelVar
	live    *liveDialer // nil in direct and host-wide mode
	refused *refusals
	log     *slog.Logger
}

func newReloader(args []string, opts *options, level *slog.LevelVar, live *liveDialer, refused *refusals, log *slog.Logger) *reloader {
	return &reloader{args: args, running: maps.Clone(opts.effective), level: level, live: live, refused: refused, log: log}
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
	var newUp *upstream
	for _, k := range diffConfig(r.running, next.effective) {
		switch {
		case k == "log-level":
			changed = append(changed, k)
		case (k == "proxy" || k == "socks") && r.live != nil && isProxy(next.proxyURL):
			if newUp == nil {
				if newUp, err = newUpstream(ctx, next, r.refused); err != nil {
					r.log.Error("reload refused: the configuration in effect stays", "err", fmt.Errorf("--proxy: %w", err))
					return nil, nil, err
				}
			}
			changed = append(changed, k)
		default:
			kept = append(kept, k)
		}
	}
	if slices.Contains(changed, "log-level") {
		r.level.Set(next.logLevel)
	}
	if newUp != nil {
		r.live.set(newUp.dialer)
	}
	// Only what was applied is running now: a key kept keeps differing,
	// and is reported again by the next reload.
	for _, k := range changed {
		r.running[k] = next.effective[k]
	}
	attrs := []any{"changed", changed, "kept", kept}
	if newUp != nil {
		attrs = append(attrs, "proxy", r.live)
	}
	r.log.Info("reloaded", attrs...)
	if len(kept) > 0 {
		r.log.Warn("reload: these cannot change while running and keep their values; restart to apply them", "keys", kept)
	}
	return changed, kept, nil
}

// isProxy reports whether url names a proxy, not direct://.
func isProxy(url string) bool { return url != "" && url != "direct://" }

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
