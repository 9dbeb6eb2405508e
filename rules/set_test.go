package rules

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// compile parses and compiles texts, failing the test on error.
func compile(t testing.TB, opts Options, texts ...string) *Set {
	t.Helper()
	rs, err := ParseAll(texts)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Compile(rs, opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func tcp(dst string, name string) *Flow {
	return &Flow{Proto: TCP, Dst: netip.MustParseAddrPort(dst), Src: netip.MustParseAddr("10.0.0.2"), Name: name}
}

func TestMatch(t *testing.T) {
	s := compile(t, Options{},
		"domain:exact.example=direct",               // 1
		"suffix:example.com=proxy:a",                // 2
		"keyword:tracker=reject",                    // 3
		`regex:^cdn[0-9]+\.net$=proxy:b`,            // 4
		"cidr:192.0.2.0/24,port:443=drop",           // 5
		"cidr:192.0.2.0/24=direct",                  // 6
		"cidr:2001:db8::/32=proxy:c",                // 7
		"port:8000-8080,net:udp=reject",             // 8
		"port:8000-8080=proxy:d",                    // 9
		"src:10.9.0.0/16=drop",                      // 10
		"net:icmp=reject",                           // 11
		"cidr:198.51.100.7=direct",                  // 12
		"suffix:sub.example.org,port:22=proxy:e",    // 13
		"cidr:0.0.0.0/0,suffix:example.org=proxy:f", // 14
	)
	for _, tc := range []struct {
		name string
		f    *Flow
		want int // 1-based rule, 0 for none
	}{
		{"exact name", tcp("203.0.113.1:80", "exact.example"), 1},
		{"exact is not suffix", tcp("203.0.113.1:80", "a.exact.example"), 0},
		{"suffix itself", tcp("203.0.113.1:80", "example.com"), 2},
		{"suffix below", tcp("203.0.113.1:80", "a.b.example.com"), 2},
		{"suffix not a part of a label", tcp("203.0.113.1:80", "badexample.com"), 0},
		{"upper case name", tcp("203.0.113.1:80", "WWW.Example.COM"), 2},
		{"trailing dot", tcp("203.0.113.1:80", "www.example.com."), 2},
		{"keyword", tcp("203.0.113.1:80", "x.mytracker.io"), 3},
		{"regex", tcp("203.0.113.1:80", "cdn42.net"), 4},
		{"regex anchored", tcp("203.0.113.1:80", "a.cdn42.net"), 0},
		{"empty name", tcp("203.0.113.1:80", ""), 0},
		{"cidr and port", tcp("192.0.2.9:443", ""), 5},
		{"cidr, other port", tcp("192.0.2.9:80", ""), 6},
		{"v4-mapped destination", tcp("[::ffff:192.0.2.9]:80", ""), 6},
		{"v6", tcp("[2001:db8::5]:80", ""), 7},
		{"v6 outside", tcp("[2001:db9::5]:80", ""), 0},
		{"bare address", tcp("198.51.100.7:1", ""), 12},
		{"bare address neighbour", tcp("198.51.100.8:1", ""), 0},
		{"port range low edge", tcp("203.0.113.1:8000", ""), 9},
		{"port range high edge", tcp("203.0.113.1:8080", ""), 9},
		{"below port range", tcp("203.0.113.1:7999", ""), 0},
		{"above port range", tcp("203.0.113.1:8081", ""), 0},
		{"udp in range", &Flow{Proto: UDP, Dst: netip.MustParseAddrPort("203.0.113.1:8001")}, 8},
		{"src", &Flow{Proto: TCP, Dst: netip.MustParseAddrPort("203.0.113.1:1"), Src: netip.MustParseAddr("10.9.3.4")}, 10},
		{"v4-mapped src", &Flow{Proto: TCP, Dst: netip.MustParseAddrPort("203.0.113.1:1"), Src: netip.MustParseAddr("::ffff:10.9.3.4")}, 10},
		{"icmp", &Flow{Proto: ICMP, Dst: netip.MustParseAddrPort("203.0.113.1:0")}, 11},
		{"first match wins over later name", tcp("192.0.2.9:443", "example.com"), 2},
		{"name with port", tcp("203.0.113.1:22", "x.sub.example.org"), 13},
		{"name with wrong port falls on", tcp("203.0.113.1:23", "x.sub.example.org"), 14},
		{"cidr /0 with name", tcp("203.0.113.1:23", "example.org"), 14},
		{"cidr /0 v6 not v4", tcp("[2001:db9::1]:23", "example.org"), 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			i, r := s.Match(tc.f)
			if tc.want == 0 {
				if i != -1 || r != nil {
					t.Fatalf("Match = %d %v, want no rule", i, r)
				}
				return
			}
			if i != tc.want-1 || r == nil || r.Index != i {
				t.Fatalf("Match = %d, want rule %d", i+1, tc.want)
			}
		})
	}
}

// TestDecideOwnerOnce: Decide answers both the match and whether a name
// could change it with one owner lookup, where Match and NeedsName each
// make their own.
func TestDecideOwnerOnce(t *testing.T) {
	s := compile(t, Options{}, "uid:1000,suffix:example.test=proxy:a", "uid:1000=direct")
	calls := 0
	f := tcp("203.0.113.1:443", "")
	f.Owner = func() (uint32, string, bool) {
		calls++
		return 1000, "", true
	}
	i, _, needs := s.Decide(f)
	if i != 1 || !needs || calls != 1 {
		t.Fatalf("Decide = rule %d, needs a name %v, %d owner lookups; want rule 2, true, 1", i+1, needs, calls)
	}
	calls = 0
	s.Match(f)
	s.NeedsName(f)
	if calls != 2 {
		t.Fatalf("Match and NeedsName made %d owner lookups, want one each", calls)
	}
}

// TestOwnerLazy: the owner is looked up only when a rule that needs it is
// a candidate, and once per Match; unknown owners match no uid: rule.
func TestOwnerLazy(t *testing.T) {
	s := compile(t, Options{},
		"cidr:192.0.2.0/24=direct",
		"uid:1000,port:443=proxy:a",
		"exe:/usr/bin/curl,port:443=proxy:b",
		"port:443=reject",
	)
	if !s.HasOwnerRules() || s.HasNameRules() {
		t.Fatalf("HasOwnerRules %v HasNameRules %v", s.HasOwnerRules(), s.HasNameRules())
	}
	for _, tc := range []struct {
		name  string
		dst   string
		uid   uint32
		exe   string
		ok    bool
		calls int
		want  int
	}{
		{"earlier rule decides", "192.0.2.1:443", 1000, "", true, 0, 1},
		{"no owner rule is a candidate", "203.0.113.1:80", 1000, "", true, 0, 0},
		{"uid", "203.0.113.1:443", 1000, "", true, 1, 2},
		{"exe, looked up once", "203.0.113.1:443", 7, "/usr/bin/curl", true, 1, 3},
		{"unknown owner", "203.0.113.1:443", 1000, "/usr/bin/curl", false, 1, 4},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls := 0
			f := tcp(tc.dst, "")
			f.Owner = func() (uint32, string, bool) {
				calls++
				return tc.uid, tc.exe, tc.ok
			}
			i, _ := s.Match(f)
			if i+1 != tc.want || calls != tc.calls {
				t.Errorf("Match = rule %d with %d owner lookups, want rule %d with %d", i+1, calls, tc.want, tc.calls)
			}
		})
	}
	f := tcp("203.0.113.1:443", "")
	if i, _ := s.Match(f); i != 3 {
		t.Errorf("nil Owner: Match = rule %d, want 4", i+1)
	}
}

func TestNeedsName(t *testing.T) {
	s := compile(t, Options{},
		"cidr:192.0.2.0/24=direct",
		"suffix:example.com,port:443=proxy:a",
		"port:443=reject",
		"keyword:ads,net:udp=drop",
		"port:80=direct",
		"domain:late.example=proxy",
	)
	for _, tc := range []struct {
		name string
		f    *Flow
		want bool
	}{
		{"address rule first", tcp("192.0.2.1:443", ""), false},
		{"name rule before the port rule", tcp("203.0.113.1:443", ""), true},
		{"name rule's port does not hold", tcp("203.0.113.1:80", ""), false},
		{"udp keyword", &Flow{Proto: UDP, Dst: netip.MustParseAddrPort("203.0.113.1:53")}, true},
		{"late name rule, nothing before", tcp("203.0.113.1:25", ""), true},
		{"name given is ignored", tcp("203.0.113.1:80", "late.example"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := s.NeedsName(tc.f); got != tc.want {
				t.Errorf("NeedsName = %v, want %v", got, tc.want)
			}
		})
	}
	if s2 := compile(t, Options{}, "port:443=reject"); s2.NeedsName(tcp("203.0.113.1:443", "")) || s2.HasNameRules() {
		t.Error("a set without name rules needs a name")
	}
}

func TestMatchName(t *testing.T) {
	s := compile(t, Options{},
		"suffix:ads.example=reject",
		"domain:direct.example=direct",
		"cidr:192.0.2.0/24=proxy:a",
		"suffix:after.example=reject",
		"suffix:mixed.example,port:443=direct",
	)
	for _, tc := range []struct {
		name string
		want string // "" for not decided
	}{
		{"x.ads.example", "reject"},
		{"ADS.example.", "reject"},
		{"direct.example", "direct"},
		{"a.direct.example", ""}, // the cidr rule may hold: its address decides
		{"after.example", ""},    // the cidr rule comes first
		{"mixed.example", ""},    // the cidr rule comes first
		{"", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, ok := s.MatchName(tc.name)
			if got := a.String(); ok != (tc.want != "") || ok && got != tc.want {
				t.Errorf("MatchName(%q) = %s %v, want %q", tc.name, got, ok, tc.want)
			}
		})
	}
	// Without the cidr rule, a name rule with a port is not decided by
	// the name either, and no rule at all leaves it to the default.
	s = compile(t, Options{}, "suffix:mixed.example,port:443=direct", "suffix:ok.example=reject")
	for name, ok := range map[string]bool{"mixed.example": false, "ok.example": true, "none.example": false} {
		if _, got := s.MatchName(name); got != ok {
			t.Errorf("MatchName(%q) ok = %v, want %v", name, got, ok)
		}
	}
}

func TestCounts(t *testing.T) {
	s := compile(t, Options{}, "port:80=direct", "port:443=proxy")
	for range 3 {
		s.Match(tcp("203.0.113.1:443", ""))
	}
	s.Match(tcp("203.0.113.1:80", ""))
	s.Match(tcp("203.0.113.1:22", ""))
	s.MatchName("x.example") // counts nothing
	if got := s.Counts(); len(got) != 2 || got[0] != 1 || got[1] != 3 {
		t.Errorf("Counts = %v, want [1 3]", got)
	}
}

func writeList(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestList(t *testing.T) {
	p := writeList(t, "mixed.txt", `# ads and a few ranges
ads.example
  domain:only.example

keyword:track
regex:^x[0-9]+\.io$
192.0.2.0/24
2001:db8::1
cidr:198.51.100.0/24
`)
	s := compile(t, Options{}, "list:"+p+",net:tcp=reject", "port:443=direct")
	if !s.HasNameRules() {
		t.Error("a list with names makes no name rule")
	}
	for _, tc := range []struct {
		name string
		f    *Flow
		want int
	}{
		{"bare name is suffix", tcp("203.0.113.1:443", "a.ads.example"), 1},
		{"explicit domain", tcp("203.0.113.1:443", "only.example"), 1},
		{"explicit domain, not below", tcp("203.0.113.1:443", "a.only.example"), 2},
		{"keyword", tcp("203.0.113.1:443", "mytracker.net"), 1},
		{"regex", tcp("203.0.113.1:443", "x12.io"), 1},
		{"bare prefix", tcp("192.0.2.200:443", ""), 1},
		{"bare v6 address", tcp("[2001:db8::1]:443", ""), 1},
		{"v4-mapped", tcp("[::ffff:198.51.100.1]:443", ""), 1},
		{"no line", tcp("203.0.113.1:443", "example.net"), 2},
		{"other matcher fails", &Flow{Proto: UDP, Dst: netip.MustParseAddrPort("192.0.2.1:443")}, 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if i, _ := s.Match(tc.f); i+1 != tc.want {
				t.Errorf("Match = rule %d, want %d", i+1, tc.want)
			}
		})
	}
	// A list of names only decides by name; one with addresses too does not.
	names := writeList(t, "names.txt", "ads.example\n")
	s = compile(t, Options{Dir: filepath.Dir(names)}, "list:names.txt=reject", "list:"+p+"=drop")
	if a, ok := s.MatchName("x.ads.example"); !ok || a.Kind != Reject {
		t.Errorf("MatchName by a list of names = %v %v, want reject", a, ok)
	}
	if _, ok := s.MatchName("only.example"); ok {
		t.Error("MatchName decided by a list that holds addresses too")
	}
}

// TestListReload: Compile reads the file again, so a reload sees edits.
func TestListReload(t *testing.T) {
	p := writeList(t, "l.txt", "a.example\n")
	rs, err := ParseAll([]string{"list:" + p + "=reject"})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Compile(rs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, []byte("b.example\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s2, err := Compile(rs, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if i, _ := s.Match(tcp("203.0.113.1:1", "a.example")); i != 0 {
		t.Error("old set lost a.example")
	}
	if i, _ := s2.Match(tcp("203.0.113.1:1", "a.example")); i != -1 {
		t.Error("new set still has a.example")
	}
	if i, _ := s2.Match(tcp("203.0.113.1:1", "b.example")); i != 0 {
		t.Error("new set lacks b.example")
	}
}

func TestListErrors(t *testing.T) {
	for _, tc := range []struct{ name, content, want string }{
		{"bad prefix", "a.example\n10.0.0.1/33\n", "line 2: "},
		{"bad name", "# c\n\nbad name.example\n", "line 3: name \"bad name.example\""},
		{"bad kind value", "port:80\n", "line 1: "},
		{"bad regex", "regex:(\n", "line 1: regex"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := writeList(t, "l.txt", tc.content)
			rs, err := ParseAll([]string{"port:1=direct", "list:" + p + "=reject"})
			if err != nil {
				t.Fatal(err)
			}
			_, err = Compile(rs, Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.HasPrefix(err.Error(), `rule 2 "list:`) ||
				!strings.Contains(err.Error(), p) {
				t.Errorf("Compile = %v, want rule 2, the file and %q", err, tc.want)
			}
		})
	}
	rs, _ := ParseAll([]string{"list:/nonexistent/rules-list=reject"})
	if _, err := Compile(rs, Options{}); err == nil || !strings.Contains(err.Error(), "/nonexistent/rules-list") {
		t.Errorf("Compile of a missing list = %v", err)
	}
}

// TestMatchAllocs: matching a flow allocates nothing, name or no name.
func TestMatchAllocs(t *testing.T) {
	s := compile(t, Options{}, "suffix:example.com,port:443=proxy", "cidr:192.0.2.0/24=direct",
		"keyword:ads=reject", "uid:1000=direct", "port:80=direct")
	f := tcp("203.0.113.1:443", "www.example.net.")
	f.Owner = func() (uint32, string, bool) { return 5, "/bin/x", true }
	if n := testing.AllocsPerRun(100, func() { s.Match(f); s.NeedsName(f) }); n != 0 {
		t.Errorf("Match and NeedsName allocate %v times a flow", n)
	}
}

// TestConcurrentMatch: a Set serves many goroutines at once (run with
// -race), and the counts add up.
func TestConcurrentMatch(t *testing.T) {
	s := compile(t, Options{}, "port:443=proxy", "suffix:example.com=direct")
	const workers, each = 4, 1000
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			f := tcp("203.0.113.1:443", "a.example.com")
			for range each {
				s.Match(f)
				s.NeedsName(f)
				s.MatchName(f.Name)
			}
		})
	}
	wg.Wait()
	if got := s.Counts(); got[0] != workers*each || got[1] != 0 {
		t.Errorf("Counts = %v, want [%d 0]", got, workers*each)
	}
}

// TestNilSet: a nil *Set has no rules, so the stack needs no special case
// when none are configured.
func TestNilSet(t *testing.T) {
	var s *Set
	f := tcp("203.0.113.1:443", "a.example")
	if i, r := s.Match(f); i != -1 || r != nil {
		t.Errorf("Match = %d %v", i, r)
	}
	if s.NeedsName(f) || s.HasNameRules() || s.HasOwnerRules() || s.Len() != 0 || s.Counts() != nil {
		t.Error("a nil Set claims rules")
	}
	if _, ok := s.MatchName("a.example"); ok {
		t.Error("a nil Set decides a name")
	}
}
