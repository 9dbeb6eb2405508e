package tundev_test

import (
	"bytes"
	"errors"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

const (
	testMark  = 0x6e73
	testTable = 28275
)

// policyNetns makes a namespace with two veth links standing for the TUN
// (tun0) and the uplink (up0), their peers up so that both have a carrier,, with main default routes out of up0 in both
// families. It returns the namespace's name and path.
func policyNetns(t *testing.T) (name, path string) {
	t.Helper()
	name, path = netnstest.NewBareNetns(t, "policy")
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "tun0", "type", "veth", "peer", "name", "tun0p"},
		{"link", "add", "up0", "type", "veth", "peer", "name", "up0p"},
		{"link", "set", "tun0p", "up"},
		{"link", "set", "up0p", "up"},
		{"link", "set", "tun0", "up"},
		{"link", "set", "up0", "up"},
		{"addr", "add", "10.9.0.1/24", "dev", "up0"},
		{"addr", "add", "fd09::1/64", "dev", "up0", "nodad"},
		{"addr", "add", "198.18.0.1/15", "dev", "tun0"},
		{"addr", "add", "fd00:1898::1/64", "dev", "tun0", "nodad"},
		{"route", "add", "default", "via", "10.9.0.2", "dev", "up0"},
		{"-6", "route", "add", "default", "via", "fd09::2", "dev", "up0"},
	} {
		netnstest.IP(t, append([]string{"-n", name}, args...)...)
	}
	return name, path
}

// routingState is everything policy routing can change in the namespace:
// the rules and every table, both families, one sorted line each (a link
// made again lists its routes in another order).
func routingState(t *testing.T, ns string) string {
	t.Helper()
	var lines []string
	for _, fam := range []string{"-4", "-6"} {
		for _, what := range [][]string{{"rule", "show"}, {"route", "show", "table", "all"}} {
			out := netnstest.IP(t, append([]string{"-n", ns, fam}, what...)...)
			for l := range strings.Lines(out) {
				lines = append(lines, fam+" "+strings.TrimSpace(l))
			}
		}
	}
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

func testPolicyConfig(path string, log *slog.Logger) tundev.PolicyConfig {
	return tundev.PolicyConfig{
		NetnsPath: path,
		Link:      "tun0",
		Routes:    []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
		Exclude:   []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24"), netip.MustParsePrefix("2001:db8:5::/48")},
		Mark:      testMark,
		Table:     testTable,
		Logger:    log,
	}
}

// TestHostWidePolicy installs the policy in a throwaway namespace, checks
// where the kernel routes unmarked, marked, excluded and on-link traffic,
// and that Close puts every rule and table back as they were.
func TestHostWidePolicy(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, path := policyNetns(t)
	before := routingState(t, ns)

	p, err := tundev.InstallPolicy(testPolicyConfig(path, testLogger(t)))
	if err != nil {
		t.Fatalf("InstallPolicy: %v", err)
	}
	rules := netnstest.IP(t, "-n", ns, "rule", "show")
	for _, want := range []string{
		"28270:\tfrom all lookup main suppress_prefixlength 0",
		"28271:\tnot from all fwmark 0x6e73 lookup 28275",
	} {
		if !strings.Contains(rules, want) {
			t.Errorf("ip rule lacks %q:\n%s", want, rules)
		}
	}
	for _, c := range []struct {
		dst  string
		mark uint32
		want string
	}{
		{"203.0.113.7", 0, "tun0"},            // default: the TUN
		{"203.0.113.7", testMark, "up0"},      // netstackd's own sockets
		{"192.0.2.9", 0, "up0"},               // excluded
		{"10.9.0.7", 0, "up0"},                // on-link in main: more specific
		{"2001:db8:1::7", 0, "tun0"},          // IPv6 default
		{"2001:db8:1::7", testMark, "up0"},    // IPv6 marked
		{"2001:db8:5::9", 0, "up0"},           // IPv6 excluded
		{"198.18.0.9", testMark, "tun0"},      // the TUN's own prefix stays in main
		{"fd09::7", 0, "up0"},                 // IPv6 on-link
		{"203.0.113.7", testMark + 1, "tun0"}, // another mark is not ours
	} {
		args := []string{"-n", ns, "route", "get", c.dst}
		if c.mark != 0 {
			args = append(args, "mark", "0x"+strconv.FormatUint(uint64(c.mark), 16))
		}
		got := devOf(t, netnstest.IP(t, args...))
		if got != c.want {
			t.Errorf("ip %s: dev %s, want %s", strings.Join(args[2:], " "), got, c.want)
		}
	}

	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := p.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if after := routingState(t, ns); after != before {
		t.Errorf("routing state after Close differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestHostWidePolicyStale: an instance that never ran Close (SIGKILL) leaves
// its rules and throw routes; the next InstallPolicy removes them, says so at
// Info, and after its own Close the state is as before the first.
func TestHostWidePolicyStale(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, path := policyNetns(t)
	before := routingState(t, ns)

	if _, err := tundev.InstallPolicy(testPolicyConfig(path, testLogger(t))); err != nil {
		t.Fatalf("first InstallPolicy: %v", err)
	}
	// What SIGKILL leaves when the TUN goes with the process: the rules
	// and the throw routes, but no route through the interface.
	netnstest.IP(t, "-n", ns, "link", "del", "tun0")
	netnstest.IP(t, "-n", ns, "link", "add", "tun0", "type", "veth", "peer", "name", "tun0p")
	netnstest.IP(t, "-n", ns, "link", "set", "tun0p", "up")
	netnstest.IP(t, "-n", ns, "link", "set", "tun0", "up")
	netnstest.IP(t, "-n", ns, "addr", "add", "198.18.0.1/15", "dev", "tun0")
	netnstest.IP(t, "-n", ns, "addr", "add", "fd00:1898::1/64", "dev", "tun0", "nodad")
	if s := netnstest.IP(t, "-n", ns, "rule", "show"); !strings.Contains(s, "lookup 28275") {
		t.Fatalf("the first instance's rules are gone already:\n%s", s)
	}

	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))
	p, err := tundev.InstallPolicy(testPolicyConfig(path, log))
	if err != nil {
		t.Fatalf("second InstallPolicy: %v", err)
	}
	if !strings.Contains(logs.String(), "level=INFO msg=\"removed stale host-wide routing") {
		t.Errorf("no Info line about the stale state; logs:\n%s", logs.String())
	}
	if n := strings.Count(netnstest.IP(t, "-n", ns, "-4", "rule", "show"), "lookup 28275"); n != 1 {
		t.Errorf("%d IPv4 rules for table 28275 after the restart, want 1", n)
	}
	if err := p.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if after := routingState(t, ns); after != before {
		t.Errorf("routing state after restart and Close differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestHostWidePolicyInUse: a table that routes through another interface
// that is up belongs to a live instance, and is left alone.
func TestHostWidePolicyInUse(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, path := policyNetns(t)
	netnstest.IP(t, "-n", ns, "link", "add", "tun1", "type", "veth", "peer", "name", "tun1p")
	netnstest.IP(t, "-n", ns, "link", "set", "tun1p", "up")
	netnstest.IP(t, "-n", ns, "link", "set", "tun1", "up")
	p, err := tundev.InstallPolicy(testPolicyConfig(path, testLogger(t)))
	if err != nil {
		t.Fatalf("InstallPolicy: %v", err)
	}
	t.Cleanup(func() { p.Close() })
	state := routingState(t, ns)

	cfg := testPolicyConfig(path, testLogger(t))
	cfg.Link = "tun1"
	_, err = tundev.InstallPolicy(cfg)
	if !errors.Is(err, tundev.ErrPolicyInUse) {
		t.Fatalf("InstallPolicy on a second link = %v, want ErrPolicyInUse", err)
	}
	if got := routingState(t, ns); got != state {
		t.Errorf("the refused InstallPolicy changed the routing state:\nbefore:\n%s\nafter:\n%s", state, got)
	}
}

func TestHostWidePolicyConfigErrors(t *testing.T) {
	base := testPolicyConfig("", nil)
	for _, c := range []struct {
		name string
		mod  func(*tundev.PolicyConfig)
		want string
	}{
		{"no-link", func(c *tundev.PolicyConfig) { c.Link = "" }, "no interface"},
		{"no-mark", func(c *tundev.PolicyConfig) { c.Mark = 0 }, "fwmark 0"},
		{"table-main", func(c *tundev.PolicyConfig) { c.Table = 254 }, "table 254 is reserved"},
		{"table-zero", func(c *tundev.PolicyConfig) { c.Table = 0 }, "table 0 is reserved"},
		{"priority", func(c *tundev.PolicyConfig) { c.Priority = 32765 }, "rule priority 32765"},
		{"no-routes", func(c *tundev.PolicyConfig) { c.Routes = nil }, "no routes"},
		{"host-bits", func(c *tundev.PolicyConfig) {
			c.Exclude = []netip.Prefix{netip.MustParsePrefix("192.0.2.1/24")}
		}, "did you mean 192.0.2.0/24"},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := base
			c.mod(&cfg)
			_, err := tundev.InstallPolicy(cfg)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("InstallPolicy = %v, want an error containing %q", err, c.want)
			}
		})
	}
}

func devOf(t *testing.T, routeGetOutput string) string {
	t.Helper()
	f := strings.Fields(routeGetOutput)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "dev" {
			return f[i+1]
		}
	}
	t.Fatalf("no device in %q", routeGetOutput)
	return ""
}
