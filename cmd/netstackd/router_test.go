package main

import (
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/stack"
)

// routerFor builds the upstreams and router of a command line.
func routerFor(t *testing.T, args ...string) (*upstream, error) {
	t.Helper()
	opts, err := parseFlags(args, false, &strings.Builder{})
	if err != nil {
		t.Fatalf("parse %v: %v", args, err)
	}
	discard := slog.New(slog.DiscardHandler)
	refused := &refusals{log: discard}
	up, err := newUpstream(t.Context(), opts, refused, nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	if up.live != nil {
		t.Cleanup(up.live.Close)
	}
	up.routes, err = newRouter(opts, up, refused, discard)
	if err == nil {
		t.Cleanup(up.routes.Close)
	}
	return up, err
}

func flowTo(proto, dst, name string) stack.Flow {
	return stack.Flow{Proto: proto, Client: netip.MustParseAddrPort("198.18.0.1:40000"), Dst: netip.MustParseAddrPort(dst), Name: name}
}

// Issue 17: the rules decide each flow, first match wins; a rule that
// names an upstream reaches that upstream alone; a flow whose route
// depends on a name it lacks is sniffed; DNS answers by the name alone.
func TestRouterDecides(t *testing.T) {
	up, err := routerFor(t,
		"--proxy", "a=socks5://127.0.0.1:1", "--proxy", "b=socks4://127.0.0.1:2",
		"--rule", "port:9999=reject",
		"--rule", "suffix:ads.test=drop",
		"--rule", "domain:direct.test=direct",
		"--rule", "domain:b.test=proxy:b",
		"--rule", "cidr:192.0.2.0/24=proxy:a",
	)
	if err != nil {
		t.Fatal(err)
	}
	r := up.routes
	for _, tt := range []struct {
		flow   stack.Flow
		action stack.Action
		via    string
		rule   string
		sniff  bool
	}{
		{flowTo("tcp", "203.0.113.9:9999", ""), stack.Reject, "", "rule 1", false},
		{flowTo("tcp", "198.19.0.5:443", "x.ads.test"), stack.Drop, "", "rule 2", false},
		{flowTo("tcp", "198.19.0.6:80", "direct.test"), stack.Relay, "direct", "rule 3", false},
		{flowTo("tcp", "198.19.0.7:80", "b.test"), stack.Relay, "b", "rule 4", false},
		// SOCKS4 carries no UDP: refused, not sent elsewhere.
		{flowTo("udp", "198.19.0.7:443", "b.test"), stack.Reject, "b", "rule 4", false},
		// By address, no name: rules 2-4 might match with one.
		{flowTo("tcp", "192.0.2.2:443", ""), stack.Relay, "a", "rule 5", true},
		{flowTo("tcp", "203.0.113.1:443", ""), stack.Relay, "", "", true},
		// Rule 1 decides before any name could.
		{flowTo("udp", "203.0.113.1:9999", ""), stack.Reject, "", "rule 1", false},
		{flowTo("icmp", "203.0.113.1:0", ""), stack.Relay, "", "", false},
	} {
		d := r.route(tt.flow)
		if d.Action != tt.action || d.Via != tt.via || !strings.HasPrefix(d.Rule, tt.rule) || d.Sniff != tt.sniff {
			t.Errorf("%+v: got %s via %q by %q sniff %v; want %s via %q by %q sniff %v",
				tt.flow, d.Action, d.Via, d.Rule, d.Sniff, tt.action, tt.via, tt.rule, tt.sniff)
		}
	}
	if d := r.route(flowTo("tcp", "198.19.0.7:80", "b.test")); d.Dialer == nil || d.Dialer == up.dialer {
		t.Errorf("proxy:b dials through %v, want b alone", d.Dialer)
	}
	labels, counts := r.ruleCounts()
	if len(labels) != 5 || counts[0] != 2 || labels[0] != "port:9999=reject" {
		t.Errorf("rule counts %v %v, want rule 1 counted twice", labels, counts)
	}
}

// DNS answers by the name alone only when the name alone decides: a rule
// before that looks at anything else (here a port) keeps the default.
func TestRouterNamePolicy(t *testing.T) {
	up, err := routerFor(t, "--rule", "suffix:ads.test=drop", "--rule", "domain:direct.test=direct",
		"--rule", "port:9999=reject", "--rule", "domain:late.test=reject")
	if err != nil {
		t.Fatal(err)
	}
	for name, want := range map[string]dns.NameAction{
		"ads.test": dns.NameReject, "x.ads.test": dns.NameReject, "direct.test": dns.NameDirect,
		"late.test": dns.NameDefault, "other.test": dns.NameDefault,
	} {
		if got := up.routes.namePolicy(name); got != want {
			t.Errorf("namePolicy(%s) = %d, want %d", name, got, want)
		}
	}
}

// A rule naming an upstream that does not exist, or naming one in direct
// mode, is refused at start with the rule and the upstreams in the error.
func TestRouterRefusesUnknownUpstream(t *testing.T) {
	if _, err := routerFor(t, "--proxy", "a=socks5://127.0.0.1:1", "--rule", "domain:x.test=proxy:c"); err == nil ||
		!strings.Contains(err.Error(), `rule 1 "domain:x.test=proxy:c"`) || !strings.Contains(err.Error(), "upstreams are a") {
		t.Errorf("unknown upstream: %v", err)
	}
	if _, err := routerFor(t, "--rule", "domain:x.test=proxy:a"); err == nil || !strings.Contains(err.Error(), "no proxy") {
		t.Errorf("named upstream in direct mode: %v", err)
	}
}

// The config file's rules come after the command line's, whose --rule
// does not replace them; list files are read relative to the file.
func TestRulesConfigAppends(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "ads.txt"), []byte("# ads\nads.test\n203.0.113.0/24\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	config := filepath.Join(dir, "netstackd.toml")
	if err := os.WriteFile(config, []byte(`rule = ["list:ads.txt=reject", "port:22=drop"]`+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	up, err := routerFor(t, "--config", config, "--rule", "port:22=direct")
	if err != nil {
		t.Fatal(err)
	}
	labels, _ := up.routes.ruleCounts()
	if strings.Join(labels, " ") != "port:22=direct list:ads.txt=reject port:22=drop" {
		t.Fatalf("rules in effect %q: want --rule first, then the file's", labels)
	}
	if d := up.routes.route(flowTo("tcp", "203.0.113.5:80", "")); d.Action != stack.Reject {
		t.Errorf("an address in the list file: %s, want reject", d.Action)
	}
}
