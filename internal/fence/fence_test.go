package fence

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// module is the module's path, the M of the table.
const module = "github.com/netstackd/netstackd"

// anything, as the only entry of allow, lets a package import any package.
const anything = "*"

// rule is one row of the table: what the packages matching pkg may import
// besides the standard library, which every package may import.
type rule struct {
	// pkg is an import path, or a prefix ending in "/...", which matches
	// the prefix itself and every package below it (as in `go list`).
	pkg string
	// allow are the import path prefixes a package may import. A prefix
	// matches itself and the paths below it: golang.org/x/sys allows
	// golang.org/x/sys/unix, not golang.org/x/sysfoo.
	allow []string
	// deny are prefixes forbidden even when allow admits them.
	deny []string
}

// rules is the import fence. A package matched by more than one row is
// held to the most specific: an exact path, then the longest prefix. A
// row may name a package that does not exist yet.
var rules = []rule{
	// The device interface both sides of the TUN share: nothing else.
	{pkg: module + "/internal/device"},
	// The bottom of the graph: the TUN and the kernel's network
	// configuration. Never gVisor, miekg/dns, stack, proxy or dns.
	{pkg: module + "/tundev", allow: []string{
		"golang.org/x/sys",
		"github.com/vishvananda/netlink",
		"github.com/vishvananda/netns",
		module + "/internal/device",
	}},
	// gVisor stays inside stack. Never tundev, proxy, dns, miekg/dns or
	// netlink: stack declares the device and dialers it consumes.
	{pkg: module + "/stack", allow: []string{
		"gvisor.dev/gvisor",
		"golang.org/x/sys",
		module + "/internal/device",
		module + "/internal/ratelog",
		module + "/stack/internal",
	}},
	// The pieces of stack (link, tcprelay, udpnat, inbound, icmp...) may
	// share packet and gverr but not know one another, nor stack itself.
	{pkg: module + "/stack/internal/...", allow: []string{
		"gvisor.dev/gvisor",
		"golang.org/x/sys",
		module + "/internal/device",
		module + "/internal/ratelog",
		module + "/stack/internal/packet",
		module + "/stack/internal/gverr",
		module + "/stack/internal/frag",
	}},
	// Names from a flow's first bytes (TLS, HTTP, QUIC Initials): pure
	// parsing on the standard library alone, so that the stack can run it
	// on any flow and the fuzzers reach all of it. Its tests may use
	// golang.org/x/net/quic as a real client; the fence sees no test files.
	{pkg: module + "/stack/internal/sniff"},
	// The standard library and its own codecs: not even golang.org/x.
	{pkg: module + "/proxy/...", allow: []string{
		module + "/proxy",
	}},
	// miekg/dns stays inside dns (which also brings golang.org/x/net).
	{pkg: module + "/dns/...", allow: []string{
		"github.com/miekg/dns",
		"golang.org/x",
		module + "/dns",
		module + "/internal/ratelog",
	}},
	// The programs wire everything together, but never link the test
	// harness in.
	{pkg: module + "/cmd/...", allow: []string{anything}, deny: []string{module + "/internal/netnstest"}},
	{pkg: module + "/examples/...", allow: []string{anything}, deny: []string{module + "/internal/netnstest"}},
	// The test harness knows no program. Nor tundev or stack: their own
	// in-package tests import it, which would make a cycle.
	{pkg: module + "/internal/netnstest", allow: []string{anything}, deny: []string{
		module + "/cmd",
		module + "/tundev",
		module + "/stack",
	}},
	// The local process behind a flow (host-wide uid:/exe: rules): sock_diag
	// by hand over x/sys/unix, and /proc.
	{pkg: module + "/internal/sockowner", allow: []string{"golang.org/x/sys"}},
	{pkg: module + "/internal/fence"},
	// Rate-limited logging for stack and cmd: the standard library only.
	{pkg: module + "/internal/ratelog"},
	// --pcap: records a device's packets; knows the device interface only.
	{pkg: module + "/internal/pcap", allow: []string{module + "/internal/device"}},
	// The rule engine is pure: the standard library only, so stack, dns
	// and cmd can all consult it without importing one another.
	{pkg: module + "/rules"},
}

// matches reports whether the import path path matches pattern, an exact
// path or a prefix ending in "/...".
func matches(pattern, path string) bool {
	if root, ok := strings.CutSuffix(pattern, "/..."); ok {
		return under(path, root)
	}
	return path == pattern
}

// under reports whether path is prefix or below it.
func under(path, prefix string) bool {
	return prefix == anything || path == prefix || strings.HasPrefix(path, prefix+"/")
}

// ruleFor returns the most specific row matching pkg: an exact path, or
// else the longest prefix.
func ruleFor(table []rule, pkg string) (rule, bool) {
	var best rule
	found, exact := false, false
	for _, r := range table {
		if !matches(r.pkg, pkg) {
			continue
		}
		isExact := !strings.HasSuffix(r.pkg, "/...")
		if !found || isExact && !exact || isExact == exact && len(r.pkg) > len(best.pkg) {
			best, found, exact = r, true, isExact
		}
	}
	return best, found
}

// check says why r forbids importing imp, or "" if it allows it. imp is
// not from the standard library.
func (r rule) check(imp string) string {
	for _, d := range r.deny {
		if under(imp, d) {
			return fmt.Sprintf("forbidden (row %s denies %s)", r.pkg, d)
		}
	}
	for _, a := range r.allow {
		if under(imp, a) {
			return ""
		}
	}
	if len(r.allow) == 0 {
		return fmt.Sprintf("not allowed (row %s: standard library only)", r.pkg)
	}
	return fmt.Sprintf("not allowed (row %s allows the standard library and %s)", r.pkg, strings.Join(r.allow, ", "))
}

// pkg is one package of the module and its direct imports outside the
// standard library.
type pkg struct {
	path    string
	imports []string
}

// violations checks every package against table and returns one line per
// package without a row and per import its row forbids.
func violations(table []rule, pkgs []pkg) []string {
	var bad []string
	for _, p := range pkgs {
		r, ok := ruleFor(table, p.path)
		if !ok {
			bad = append(bad, fmt.Sprintf("%s matches no row of the import fence: add a row to internal/fence", p.path))
			continue
		}
		for _, imp := range p.imports {
			if why := r.check(imp); why != "" {
				bad = append(bad, fmt.Sprintf("%s imports %s: %s", p.path, imp, why))
			}
		}
	}
	return bad
}

// listPackages runs `go list` at the module's root and returns every
// package of the module (./..., test files left out) with its direct
// imports that are not in the standard library.
func listPackages(t *testing.T) []pkg {
	t.Helper()
	gotool, err := exec.LookPath("go") // go test puts its own go first in PATH
	if err != nil {
		t.Fatalf("find the go command: %v", err)
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root: %v", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	// -deps lists the dependencies too, so that Standard tells which
	// imports are the standard library; DepOnly marks those not in ./... .
	cmd := exec.CommandContext(ctx, gotool, "list", "-deps", "-test=false",
		"-f", "{{.ImportPath}}\t{{.Standard}}\t{{.DepOnly}}\t{{join .Imports \" \"}}", "./...")
	cmd.Dir = root
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list in %s: %v\n%s", root, err, stderr.String())
	}
	std := map[string]bool{"C": true} // cgo's pseudo-package
	var own []pkg
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		f := strings.Split(sc.Text(), "\t")
		if len(f) != 4 {
			t.Fatalf("go list printed %q: want four tab-separated fields", sc.Text())
		}
		if f[1] == "true" {
			std[f[0]] = true
		}
		if f[2] == "false" {
			own = append(own, pkg{path: f[0], imports: strings.Fields(f[3])})
		}
	}
	for i := range own {
		own[i].imports = slices.DeleteFunc(own[i].imports, func(imp string) bool { return std[imp] })
	}
	return own
}

// TestImports holds every package of the module to its row of rules.
func TestImports(t *testing.T) {
	pkgs := listPackages(t)
	if len(pkgs) == 0 {
		t.Fatal("go list found no package in ./...")
	}
	for _, p := range pkgs {
		if !under(p.path, module) {
			t.Errorf("go list ./... returned %s, outside module %s", p.path, module)
		}
	}
	for _, v := range violations(rules, pkgs) {
		t.Error(v)
	}
	t.Logf("checked the imports of %d packages", len(pkgs))
}

// TestRules checks the matcher on the real table, forbidden imports among
// them, so that a fence that lets everything through cannot pass.
func TestRules(t *testing.T) {
	const m = module
	for _, tc := range []struct {
		name, pkg, imp string
		ok             bool
	}{
		{"tundev netlink", m + "/tundev", "github.com/vishvananda/netlink/nl", true},
		{"tundev x/sys", m + "/tundev", "golang.org/x/sys/unix", true},
		{"tundev device", m + "/tundev", m + "/internal/device", true},
		{"tundev gvisor", m + "/tundev", "gvisor.dev/gvisor/pkg/tcpip", false},
		{"tundev stack", m + "/tundev", m + "/stack", false},
		{"tundev miekg", m + "/tundev", "github.com/miekg/dns", false},
		{"prefix ends at a slash", m + "/tundev", "golang.org/x/sysfoo", false},
		{"device stdlib only", m + "/internal/device", "golang.org/x/sys/unix", false},
		{"stack gvisor", m + "/stack", "gvisor.dev/gvisor/pkg/tcpip/stack", true},
		{"stack its internals", m + "/stack", m + "/stack/internal/link", true},
		{"stack tundev", m + "/stack", m + "/tundev", false},
		{"stack proxy", m + "/stack", m + "/proxy", false},
		{"stack netlink", m + "/stack", "github.com/vishvananda/netlink", false},
		{"internal packet", m + "/stack/internal/link", m + "/stack/internal/packet", true},
		{"internal gverr", m + "/stack/internal/udpnat", m + "/stack/internal/gverr", true},
		{"internal sibling", m + "/stack/internal/link", m + "/stack/internal/udpnat", false},
		{"internal parent", m + "/stack/internal/tcprelay", m + "/stack", false},
		{"sniff stdlib only", m + "/stack/internal/sniff", m + "/stack/internal/packet", false},
		{"sniff x/net", m + "/stack/internal/sniff", "golang.org/x/net/quic", false},
		{"proxy codec", m + "/proxy", m + "/proxy/socks5", true},
		{"proxy subpackage", m + "/proxy/socks5", m + "/proxy/socks4", true},
		{"proxy x/sys", m + "/proxy", "golang.org/x/sys/unix", false},
		{"proxy dns", m + "/proxy", m + "/dns", false},
		{"dns miekg", m + "/dns", "github.com/miekg/dns", true},
		{"dns x/net", m + "/dns", "golang.org/x/net/ipv4", true},
		{"dns gvisor", m + "/dns", "gvisor.dev/gvisor/pkg/tcpip", false},
		{"dns stack", m + "/dns", m + "/stack", false},
		{"cmd stack", m + "/cmd/netstackd", m + "/stack", true},
		{"cmd x/sys", m + "/cmd/netstackd", "golang.org/x/sys/unix", true},
		{"cmd harness", m + "/cmd/netstackd", m + "/internal/netnstest", false},
		{"sockowner x/sys", m + "/internal/sockowner", "golang.org/x/sys/unix", true},
		{"sockowner stack", m + "/internal/sockowner", m + "/stack", false},
		{"example harness", m + "/examples/proxychain", m + "/internal/netnstest", false},
		{"harness miekg", m + "/internal/netnstest", "github.com/miekg/dns", true},
		{"harness cmd", m + "/internal/netnstest", m + "/cmd/netstackd", false},
		{"harness tundev", m + "/internal/netnstest", m + "/tundev", false},
		{"fence", m + "/internal/fence", m + "/tundev", false},
		{"rules stdlib only", m + "/rules", "golang.org/x/net/idna", false},
		{"rules stack", m + "/rules", m + "/stack", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, found := ruleFor(rules, tc.pkg)
			if !found {
				t.Fatalf("no row for %s", tc.pkg)
			}
			why := r.check(tc.imp)
			if ok := why == ""; ok != tc.ok {
				t.Errorf("%s importing %s: allowed %v (%s), want %v", tc.pkg, tc.imp, ok, why, tc.ok)
			}
		})
	}
}

// TestViolations shows the whole check failing: a forbidden import and a
// package with no row each give a line.
func TestViolations(t *testing.T) {
	got := violations(rules, []pkg{
		{path: module + "/tundev", imports: []string{"golang.org/x/sys/unix", "gvisor.dev/gvisor/pkg/tcpip"}},
		{path: module + "/newpkg", imports: nil},
		{path: module + "/dns", imports: []string{"github.com/miekg/dns"}},
	})
	want := []string{
		module + "/tundev imports gvisor.dev/gvisor/pkg/tcpip: not allowed",
		module + "/newpkg matches no row",
	}
	if len(got) != len(want) {
		t.Fatalf("violations = %q, want %d lines", got, len(want))
	}
	for i := range want {
		if !strings.HasPrefix(got[i], want[i]) {
			t.Errorf("violation %d = %q, want it to start %q", i, got[i], want[i])
		}
	}
}

// TestMostSpecificRow: an exact row beats a prefix, a longer prefix a
// shorter one.
func TestMostSpecificRow(t *testing.T) {
	table := []rule{
		{pkg: "x/..."},
		{pkg: "x/a/..."},
		{pkg: "x/a/b"},
	}
	for _, tc := range []struct{ pkg, want string }{
		{"x", "x/..."},
		{"x/c", "x/..."},
		{"x/a", "x/a/..."},
		{"x/a/c", "x/a/..."},
		{"x/a/b", "x/a/b"},
		{"x/a/b/c", "x/a/..."},
	} {
		if r, ok := ruleFor(table, tc.pkg); !ok || r.pkg != tc.want {
			t.Errorf("ruleFor(%s) = %q, %v; want %q", tc.pkg, r.pkg, ok, tc.want)
		}
	}
	if _, ok := ruleFor(table, "xy"); ok {
		t.Error("x/... matched xy")
	}
}
