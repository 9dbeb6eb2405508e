package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
)

// Several upstreams (issue 16): --proxy [NAME=]URL, repeatable, and
// --socks HOST:PORT as one more unnamed one. They form a proxy.Group: new
// flows go to the first member whose health check passes, in the order
// given (docs/operations.md, "Upstreams and failover").

// proxySpec is one upstream as the command line or the file gives it.
type proxySpec struct {
	name string // [a-z0-9_-]+; "proxyN" when not given
	url  string
}

// directName is the name of the direct upstream, and reserved: a rule may
// say "direct" where it means no proxy.
const directName = "direct"

var proxyNameRE = regexp.MustCompile(`^[a-z0-9_-]+$`)

// parseProxySpec reads [NAME=]URL. What comes before the first "=" is a
// name only if it could be one: a URL's user or password may hold "=",
// but then ":" or "/" precede it.
func parseProxySpec(v string) (proxySpec, error) {
	v = strings.TrimSpace(v)
	name, url, ok := strings.Cut(v, "=")
	if !ok || strings.ContainsAny(name, ":/@") {
		name, url = "", v
	}
	if name != "" && !proxyNameRE.MatchString(name) {
		return proxySpec{}, fmt.Errorf("upstream name %q: want lowercase letters, digits, '-' and '_'", name)
	}
	if name == directName {
		return proxySpec{}, fmt.Errorf("upstream name %q is reserved (it means no proxy): pick another", name)
	}
	if url == "" {
		return proxySpec{}, errors.New("empty URL")
	}
	return proxySpec{name: name, url: url}, nil
}

// nameProxies names the unnamed upstreams proxy1, proxy2, ... in order of
// appearance, checks names are unique, and makes an empty list the direct
// upstream. direct:// is an upstream only alone: its flows are refused
// and pinged in ways no proxy's are (loopback, ICMP).
func nameProxies(ps []proxySpec) ([]proxySpec, error) {
	if len(ps) == 0 {
		return []proxySpec{{name: directName, url: "direct://"}}, nil
	}
	out := make([]proxySpec, len(ps))
	seen := map[string]bool{}
	unnamed := 0
	for i, p := range ps {
		if isDirectURL(p.url) {
			if len(ps) > 1 {
				return nil, fmt.Errorf("--proxy %s: direct:// cannot be one of several upstreams", p.url)
			}
			p.name = directName
		}
		if p.name == "" {
			unnamed++
			p.name = "proxy" + strconv.Itoa(unnamed)
		}
		if seen[p.name] {
			return nil, fmt.Errorf("--proxy: upstream name %q given twice (unnamed ones are proxy1, proxy2, ... in order)", p.name)
		}
		seen[p.name] = true
		out[i] = p
	}
	return out, nil
}

// isDirectURL reports whether url is direct:// (FromURL's forms of it).
func isDirectURL(url string) bool {
	u := strings.ToLower(url)
	return u == "direct" || u == "direct://" || u == "direct:///"
}

// isDirect reports whether netstackd dials destinations itself.
func (o *options) isDirect() bool { return len(o.proxies) == 1 && isDirectURL(o.proxies[0].url) }

// proxyStrings writes the upstreams as --proxy takes them, named (the
// direct one's name is implied, and reserved).
func proxyStrings(ps []proxySpec) []string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.url
		if p.name != directName {
			s[i] = p.name + "=" + p.url
		}
	}
	return s
}

// liveDialer is the group of upstreams that the stack, its UDP
// associations and the DNS forwarder dial through; a reload replaces it.
// It owns the group's health checks: started with it, stopped when it is
// replaced or closed.
type liveDialer struct {
	cur atomic.Pointer[proxy.Group]
}

// newLiveDialer starts g's health checks and dials through it.
func newLiveDialer(g *proxy.Group) *liveDialer {
	l := &liveDialer{}
	g.Start()
	l.cur.Store(g)
	return l
}

func (l *liveDialer) get() *proxy.Group { return l.cur.Load() }

// swap starts g, makes new flows use it and stops the old group's checks.
// Flows the old group carried keep their conns.
func (l *liveDialer) swap(g *proxy.Group) {
	g.Start()
	l.cur.Swap(g).Close()
}

// Close stops the health checks of the group in use; after the reloader.
func (l *liveDialer) Close() { l.get().Close() }

func (l *liveDialer) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	return l.get().DialContext(ctx, network, address)
}

// DialUpstream tells the stack which upstream carried the flow.
func (l *liveDialer) DialUpstream(ctx context.Context, network, address string) (net.Conn, string, error) {
	return l.get().DialUpstream(ctx, network, address)
}

func (l *liveDialer) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	return l.get().ListenPacket(ctx, network, address)
}

// ListenUpstream tells the stack which upstream carried the association.
func (l *liveDialer) ListenUpstream(ctx context.Context, network, address string) (net.PacketConn, string, error) {
	return l.get().ListenUpstream(ctx, network, address)
}

// String lists the upstreams without passwords (proxy.Group).
func (l *liveDialer) String() string { return l.get().String() }

func (l *liveDialer) LogValue() slog.Value { return slog.StringValue(l.String()) }

// flowReset resets the live flows through an upstream that went down, so
// that they end at once instead of hanging on a dead proxy. It learns the
// stack once it runs: the groups are made before.
type flowReset struct {
	st  atomic.Pointer[stack.Stack]
	log *slog.Logger
}

// upstreamDown is a proxy.GroupConfig.OnDown.
func (f *flowReset) upstreamDown(name string) {
	st := f.st.Load()
	if st == nil {
		return
	}
	select {
	case <-st.Done(): // stopped: its flows are gone, and the checks go on until exit
		return
	default:
	}
	if n := st.CloseFlowsVia(name); n > 0 {
		f.log.Warn("flows through a dead upstream reset", "upstream", name, "flows", n)
	}
}

// upstreamNames are the upstreams' names, in order: "direct", or "a,b".
func upstreamNames(ps []proxySpec) string {
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = p.name
	}
	return strings.Join(names, ",")
}

// states are the upstreams' health, in order; direct mode's one upstream
// is always up.
func (l *liveDialer) states() []proxy.MemberState {
	if l == nil {
		return []proxy.MemberState{{Name: directName, URL: "direct://", State: "up"}}
	}
	return l.get().States()
}

// usable reports whether a new flow has an upstream to go to, and else
// why not, naming each upstream and its reason.
func (l *liveDialer) usable() (bool, string) {
	if l == nil {
		return true, ""
	}
	return l.get().Usable()
}

// upstreamJSON is one upstream in GET /upstreams. Its field names are what
// scripts read: add, never rename.
type upstreamJSON struct {
	Name  string `json:"name"`
	URL   string `json:"url"`   // without a password
	State string `json:"state"` // up, down or unknown (not checked yet)
	// Error is why it is down.
	Error string `json:"error,omitempty"`
	// Since is when the state last changed, RFC 3339.
	Since      string `json:"since,omitempty"`
	Dials      uint64 `json:"dials"`
	DialErrors uint64 `json:"dial_errors"`
	// FlowsActive counts the live flows through it (their "via").
	FlowsActive int `json:"flows_active"`
}

// upstreamsHandler serves GET /upstreams: the upstreams in order of
// preference with their health and live flows. flows (the stack's Flows)
// may be nil: no flows are counted.
func upstreamsHandler(live *liveDialer, flows func(max int) []stack.FlowInfo) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		states := live.states()
		active := map[string]int{}
		if flows != nil {
			// Every flow, not a page of them: the counts must be
			// whole. An operator's request pays for it; a scrape
			// does not (upstream_dials_total is counted as it goes).
			for _, f := range flows(0) {
				if !f.Inbound {
					active[f.Via]++
				}
			}
		}
		out := make([]upstreamJSON, len(states))
		for i, s := range states {
			out[i] = upstreamJSON{Name: s.Name, URL: s.URL, State: s.State, Error: s.Err, Dials: s.Dials, DialErrors: s.DialErrors, FlowsActive: active[s.Name]}
			if live == nil {
				out[i].FlowsActive = active[""] // direct flows name no upstream
			}
			if !s.Since.IsZero() {
				out[i].Since = s.Since.UTC().Format(time.RFC3339)
			}
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		_ = json.NewEncoder(w).Encode(out)
	})
}
