package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// A Group is an ordered list of named upstreams with failover: a dial goes
// to the first member that is not known to be down, and a member whose
// proxy server cannot be reached is marked down at once and the dial moves
// on to the next. A background check (Probe, a cheap handshake) decides
// when a member is up or down again.
//
// Health-check timing, with Interval I (default 5s) and MaxBackoff M
// (default 60s):
//   - a member that is up is probed every I: a dead proxy is seen within
//     I plus the probe timeout, even with no flow to notice it;
//   - a member that is down and that new flows would use if it came back
//     (no member before it is up) is probed every I too, so that it takes
//     its flows back within I of returning;
//   - any other member that is down backs off: 2I, 4I, ... up to M between
//     probes, since nothing would change if it returned. When a member
//     before it goes down, it is probed at once.
//
// Members with nothing to probe (Direct) are always up.

// ErrNoUpstream is the error of a dial when every member of a Group is
// down: it fails at once, without waiting for a dial timeout.
var ErrNoUpstream = errors.New("no upstream is usable")

// Upstream is one member of a Group.
type Upstream struct {
	// Name is the member's name, as logs, metrics and flows show it.
	Name string
	// Dialer reaches destinations through the member; if it is also a
	// PacketListener, the member carries UDP.
	Dialer Dialer
	// URL is how the member is shown to people: its proxy URL without a
	// password. "" means fmt.Sprint(Dialer).
	URL string
}

// GroupConfig configures a Group. Zero values are the defaults.
type GroupConfig struct {
	// Members in order of preference; at least one, names unique.
	Members []Upstream
	// Interval between health checks of a usable member; 0 means 5s.
	Interval time.Duration
	// MaxBackoff bounds the wait between checks of a member that is down
	// and not needed; 0 means 60s.
	MaxBackoff time.Duration
	// ProbeTimeout bounds one check; 0 means Interval.
	ProbeTimeout time.Duration
	// OnDown, if not nil, is called once each time a member goes down
	// (health check or failed dial), on the goroutine that saw it: the
	// flows through it are likely dead too.
	OnDown func(name string)
	// Logger gets one line per change of a member's state: Warn when it
	// goes down, Info when it comes up. nil means discard.
	Logger *slog.Logger
}

// Member states.
const (
	stateUnknown int32 = iota // not probed yet: dialed, not counted healthy
	stateUp
	stateDown
)

// MemberState is a snapshot of one member's health.
type MemberState struct {
	Name string
	URL  string
	// State is "up", "down" or "unknown" (not checked yet).
	State string
	// Err is why it is down; "" otherwise.
	Err string
	// Since is when the state last changed (the group's start at first).
	Since time.Time
	// Dials and DialErrors count the connections and UDP associations
	// asked of the member, and those that failed.
	Dials, DialErrors uint64
}

type member struct {
	Upstream
	probes bool          // has something to probe (a Prober)
	kick   chan struct{} // wakes the checker for an early probe
	mu     sync.Mutex
	state  int32 // guarded by mu; read without it through cur
	cur    atomic.Int32
	err    error // why it is down
	since  time.Time

	dials, dialErrors atomic.Uint64
}

// Group is a Dialer and PacketListener over its members. Start runs the
// health checks; Close stops them. Conns it returned stay the caller's.
type Group struct {
	cfg     GroupConfig
	members []*member
	log     *slog.Logger

	cancel    context.CancelFunc
	wg        sync.WaitGroup // one checker per member that probes
	startOnce sync.Once
	closeOnce sync.Once
}

// NewGroup checks cfg and returns a Group that has not started checking.
func NewGroup(cfg GroupConfig) (*Group, error) {
	if len(cfg.Members) == 0 {
		return nil, errors.New("upstream group: no members")
	}
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.MaxBackoff < cfg.Interval {
		cfg.MaxBackoff = max(60*time.Second, cfg.Interval)
	}
	if cfg.ProbeTimeout <= 0 {
		cfg.ProbeTimeout = cfg.Interval
	}
	g := &Group{cfg: cfg, log: cfg.Logger}
	if g.log == nil {
		g.log = slog.New(slog.DiscardHandler)
	}
	seen := map[string]bool{}
	now := time.Now()
	for _, u := range cfg.Members {
		if u.Name == "" || seen[u.Name] {
			return nil, fmt.Errorf("upstream group: member name %q empty or not unique", u.Name)
		}
		seen[u.Name] = true
		if u.URL == "" {
			u.URL = fmt.Sprint(u.Dialer)
		}
		_, probes := u.Dialer.(Prober)
		m := &member{Upstream: u, probes: probes, kick: make(chan struct{}, 1), since: now}
		if !probes {
			m.state = stateUp
			m.cur.Store(stateUp)
		}
		g.members = append(g.members, m)
	}
	return g, nil
}

// Start begins the health checks; the first probe of every member is made
// at once. Calling it twice does nothing.
func (g *Group) Start() {
	g.startOnce.Do(func() {
		ctx, cancel := context.WithCancel(context.Background())
		g.cancel = cancel
		for i, m := range g.members {
			if m.probes {
				g.wg.Go(func() { g.checkMember(ctx, i) })
			}
		}
	})
}

// Close stops the health checks and waits for them. Safe to call twice,
// and without Start.
func (g *Group) Close() {
	g.closeOnce.Do(func() {
		g.startOnce.Do(func() {}) // a later Start starts nothing
		if g.cancel != nil {
			g.cancel()
		}
		g.wg.Wait()
	})
}

// checkMember probes member i until ctx ends, on the schedule in the
// Group's doc comment.
func (g *Group) checkMember(ctx context.Context, i int) {
	m := g.members[i]
	backoff := g.cfg.Interval
	for {
		pctx, cancel := context.WithTimeout(ctx, g.cfg.ProbeTimeout)
		err := Probe(pctx, m.Dialer)
		cancel()
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			g.setState(i, stateUp, nil)
		} else {
			g.setState(i, stateDown, err)
		}
		wait := g.cfg.Interval
		if err == nil || g.preferred(i) {
			backoff = g.cfg.Interval
		} else {
			backoff = min(2*backoff, g.cfg.MaxBackoff)
			wait = backoff
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-m.kick:
			backoff = g.cfg.Interval
		case <-t.C:
		}
		t.Stop()
	}
}

// preferred reports whether no member before i is up: new flows would go
// to member i if it were.
func (g *Group) preferred(i int) bool {
	for _, m := range g.members[:i] {
		if m.cur.Load() == stateUp {
			return false
		}
	}
	return true
}

// setState records member i's new state and logs a change; on a change to
// down it calls OnDown and wakes the checkers of the members after it,
// which may now be the ones new flows need.
func (g *Group) setState(i int, state int32, err error) {
	m := g.members[i]
	m.mu.Lock()
	old := m.state
	m.state = state
	m.cur.Store(state)
	m.err = err
	if old != state {
		m.since = time.Now()
	}
	m.mu.Unlock()
	if old == state {
		return
	}
	if state == stateUp {
		g.log.Info("proxy answers", "upstream", m.Name, "proxy", m.URL)
		return
	}
	g.log.Warn("proxy does not answer: new flows go to the next upstream, flows through it are reset", "upstream", m.Name, "proxy", m.URL, "err", err)
	for _, next := range g.members[i+1:] {
		select {
		case next.kick <- struct{}{}:
		default:
		}
	}
	if g.cfg.OnDown != nil {
		g.cfg.OnDown(m.Name)
	}
}

// DialContext dials address through the first usable member.
func (g *Group) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, _, err := g.DialUpstream(ctx, network, address)
	return c, err
}

// DialUpstream dials address through the first usable member and returns
// the conn with that member's name.
func (g *Group) DialUpstream(ctx context.Context, network, address string) (net.Conn, string, error) {
	return g.dialMembers(ctx, 0, len(g.members), network, address)
}

// dialMembers dials through the first usable member from lo up to hi.
func (g *Group) dialMembers(ctx context.Context, lo, hi int, network, address string) (net.Conn, string, error) {
	var c net.Conn
	name, err := g.eachOf(ctx, lo, hi, false, func(m *member) error {
		var err error
		c, err = m.Dialer.DialContext(ctx, network, address)
		return err
	})
	return c, name, err
}

// ListenPacket opens a UDP association through the first usable member
// that carries UDP.
func (g *Group) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	pc, _, err := g.ListenUpstream(ctx, network, address)
	return pc, err
}

// ListenUpstream is ListenPacket that also returns the member's name.
func (g *Group) ListenUpstream(ctx context.Context, network, address string) (net.PacketConn, string, error) {
	return g.listenMembers(ctx, 0, len(g.members), network, address)
}

// listenMembers opens a UDP association through the first usable member
// from lo up to hi that carries UDP.
func (g *Group) listenMembers(ctx context.Context, lo, hi int, network, address string) (net.PacketConn, string, error) {
	var pc net.PacketConn
	name, err := g.eachOf(ctx, lo, hi, true, func(m *member) error {
		var err error
		pc, err = m.Dialer.(PacketListener).ListenPacket(ctx, network, address)
		return err
	})
	return pc, name, err
}

// CarriesUDP reports whether some member carries UDP.
func (g *Group) CarriesUDP() bool {
	for _, m := range g.members {
		if _, ok := m.Dialer.(PacketListener); ok {
			return true
		}
	}
	return false
}

// eachOf runs dial on the members from lo up to hi in order, skipping
// those that are down (and, for udp, those without UDP), until one
// succeeds or fails for a reason other than its proxy server being
// unreachable. Nothing reached
// the destination through a member whose server could not be reached, so
// moving on to the next member is safe.
func (g *Group) eachOf(ctx context.Context, lo, hi int, udp bool, dial func(*member) error) (string, error) {
	var down []error
	for i := lo; i < hi; i++ {
		m := g.members[i]
		if udp {
			if _, ok := m.Dialer.(PacketListener); !ok {
				continue
			}
		}
		if m.cur.Load() == stateDown {
			down = append(down, fmt.Errorf("%s: down: %w", m.Name, m.reason()))
			continue
		}
		m.dials.Add(1)
		err := dial(m)
		if err == nil {
			return m.Name, nil
		}
		m.dialErrors.Add(1)
		// The caller giving up (Canceled) says nothing of the proxy; a
		// connect to it that outlasted the dial's deadline does.
		if !m.probes || errors.Is(ctx.Err(), context.Canceled) || !errors.As(err, new(*serverError)) {
			return m.Name, fmt.Errorf("upstream %s: %w", m.Name, err)
		}
		g.setState(i, stateDown, err)
		if noTimeLeft(ctx) {
			return m.Name, fmt.Errorf("upstream %s: %w", m.Name, err)
		}
		down = append(down, fmt.Errorf("%s: %w", m.Name, err))
	}
	if len(down) == 0 {
		return "", fmt.Errorf("%w: no member carries udp: %w", ErrNoUpstream, errors.ErrUnsupported)
	}
	return "", &noUpstreamError{down}
}

func (m *member) reason() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.err
}

// noUpstreamError is ErrNoUpstream with each member's reason, which it
// also unwraps to: a caller sorting dial errors (refused, timed out) sees
// why the proxies failed.
type noUpstreamError struct{ errs []error }

func (e *noUpstreamError) Error() string {
	s := make([]string, len(e.errs))
	for i, err := range e.errs {
		s[i] = err.Error()
	}
	return ErrNoUpstream.Error() + " (" + strings.Join(s, "; ") + ")"
}

func (e *noUpstreamError) Unwrap() []error { return append([]error{ErrNoUpstream}, e.errs...) }

// Usable reports whether some member is up, and else why each is not.
// A member not checked yet counts as not usable: nothing has answered.
func (g *Group) Usable() (bool, string) {
	var why []string
	for _, s := range g.States() {
		if s.State == "up" {
			return true, ""
		}
		r := s.Name + " (" + s.URL + "): " + s.State
		if s.Err != "" {
			r += ": " + s.Err
		}
		why = append(why, r)
	}
	return false, "no upstream is usable: " + strings.Join(why, "; ")
}

// States returns every member's state, in order.
func (g *Group) States() []MemberState {
	out := make([]MemberState, len(g.members))
	for i, m := range g.members {
		m.mu.Lock()
		out[i] = MemberState{Name: m.Name, URL: m.URL, State: stateNames[m.state], Since: m.since,
			Dials: m.dials.Load(), DialErrors: m.dialErrors.Load()}
		if m.err != nil {
			out[i].Err = m.err.Error()
		}
		m.mu.Unlock()
	}
	return out
}

var stateNames = map[int32]string{stateUnknown: "unknown", stateUp: "up", stateDown: "down"}

// String lists the members, without passwords.
func (g *Group) String() string {
	s := make([]string, len(g.members))
	for i, m := range g.members {
		s[i] = m.Name + "=" + m.URL
	}
	return strings.Join(s, ",")
}

// serverError is a failure to reach a proxy server itself (refused, reset,
// unreachable, timed out), as opposed to the server's answer about the
// destination: a Group takes it to mean the server is down. Its text and
// Unwrap are the cause's.
type serverError struct{ err error }

func (e *serverError) Error() string { return e.err.Error() }
func (e *serverError) Unwrap() error { return e.err }

var (
	_ Dialer         = (*Group)(nil)
	_ PacketListener = (*Group)(nil)
)

// Only is one member of a Group on its own, as a rule that names an
// upstream (proxy:NAME) wants it: dials go to that member alone, fail at
// once (ErrNoUpstream) while its health check says it is down, and count
// and mark it down as the group's own dials do.
type Only struct {
	g *Group
	i int
}

// Only returns the member named name on its own.
func (g *Group) Only(name string) (Only, bool) {
	for i, m := range g.members {
		if m.Name == name {
			return Only{g, i}, true
		}
	}
	return Only{}, false
}

func (o Only) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, _, err := o.DialUpstream(ctx, network, address)
	return c, err
}

// DialUpstream dials through the member and names it.
func (o Only) DialUpstream(ctx context.Context, network, address string) (net.Conn, string, error) {
	return o.g.dialMembers(ctx, o.i, o.i+1, network, address)
}

// CarriesUDP reports whether the member carries UDP.
func (o Only) CarriesUDP() bool {
	_, ok := o.g.members[o.i].Dialer.(PacketListener)
	return ok
}

func (o Only) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	pc, _, err := o.ListenUpstream(ctx, network, address)
	return pc, err
}

// ListenUpstream opens a UDP association through the member and names it.
func (o Only) ListenUpstream(ctx context.Context, network, address string) (net.PacketConn, string, error) {
	return o.g.listenMembers(ctx, o.i, o.i+1, network, address)
}

func (o Only) String() string { return o.g.members[o.i].Name }

// noTimeLeft reports whether ctx leaves no time to try another member. A
// conn's deadline, taken from ctx's, can pass a moment before ctx's own
// timer marks it done: the deadline itself is looked at, not only Err.
func noTimeLeft(ctx context.Context) bool {
	if ctx.Err() != nil {
		return true
	}
	d, ok := ctx.Deadline()
	return ok && !time.Now().Before(d)
}
