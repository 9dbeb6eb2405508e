package rules

import (
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzParse: no input panics, and what parses prints back to a rule that
// parses to the same canonical form.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"cidr:10.0.0.0/8=direct", "domain:A.example.=proxy:x", "suffix:example.com,port:443=proxy",
		"keyword:ads=reject", `regex:^a{1,3}\.b$=drop`, "port:1-65535,net:udp=drop", "src:::ffff:10.0.0.0/104=direct",
		"uid:1000,exe:/usr/bin/curl=proxy:a.b", "list:l.txt=reject", "cidr:2001:db8::1=direct", "regex:a=b=direct",
		"port:99999=direct", "=direct", "x", "port:80,,net:tcp=direct",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := Parse(s)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "rule ") {
				t.Errorf("Parse(%q) error %q does not name the rule", s, err)
			}
			return
		}
		out := r.String()
		r2, err := Parse(out)
		if err != nil {
			t.Fatalf("Parse(%q) printed %q, which does not parse: %v", s, out, err)
		}
		if out2 := r2.String(); out2 != out {
			t.Fatalf("Parse(%q) printed %q, reparsed to %q", s, out, out2)
		}
		for i := range r2.m {
			if r2.m[i].kind == mList {
				return // a list: names a file, which a fuzzer may find anywhere
			}
		}
		if _, err := Compile([]Rule{r2}, Options{}); err != nil {
			t.Fatalf("Compile(%q): %v", out, err)
		}
	})
}

// Pools the random rules and flows draw from, small so that they meet.
var (
	poolPrefixes = []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3", "0.0.0.0/0", "192.0.2.0/25",
		"192.0.2.128/25", "2001:db8::/32", "2001:db8:1::/48", "::/0", "2001:db8::1", "::ffff:10.1.0.0/112"}
	poolNames    = []string{"a.example", "b.a.example", "example", "c.example", "x.b.a.example", "org"}
	poolKeywords = []string{"a", "ex", "b.a"}
	poolRegexps  = []string{"^a", "example$", `b\.`, "a{1,2}"}
	poolPorts    = []string{"80", "443", "8000-8080", "1-1024"}
	poolSrcs     = []string{"10.0.0.0/8", "172.16.0.0/12", "fd00::/8"}
	poolActions  = []string{"direct", "proxy", "proxy:a", "reject", "drop"}
	// poolLists are the list files rules may name: names only, addresses
	// only, and both.
	poolLists = map[string][]string{
		"names": {"a.example", "keyword:zz", "domain:org"},
		"addrs": {"10.1.2.0/24", "2001:db8::1", "cidr:192.0.2.0/25"},
		"mixed": {"domain:example", "192.0.2.128/25", `regex:^b\.`, "::ffff:10.9.9.9"},
	}

	poolDsts = []string{"10.1.2.3", "10.1.2.4", "10.9.9.9", "192.0.2.5", "192.0.2.200", "::ffff:10.1.2.3",
		"2001:db8::1", "2001:db8:1::5", "2001:db9::1"}
	poolFlowNames = []string{"", "a.example", "A.Example.", "x.b.a.example", "badexample", "example", "org",
		"b.a.example", "c.example.", "zz"}
	poolFlowPorts = []uint16{0, 22, 80, 443, 1024, 1025, 8000, 8080, 8081}
	poolFlowSrcs  = []string{"10.0.0.2", "172.16.5.5", "fd00::2", "192.168.1.1"}
)

func pick[T any](r *rand.Rand, s []T) T { return s[r.IntN(len(s))] }

// randomRule writes a rule of 1 to 3 matchers drawn from the pools.
func randomRule(r *rand.Rand) string {
	var parts []string
	regex := ""
	for range 1 + r.IntN(3) {
		switch r.IntN(12) {
		case 0, 1:
			parts = append(parts, "cidr:"+pick(r, poolPrefixes))
		case 2:
			parts = append(parts, "domain:"+pick(r, poolNames))
		case 3, 4:
			parts = append(parts, "suffix:"+pick(r, poolNames))
		case 5:
			parts = append(parts, "keyword:"+pick(r, poolKeywords))
		case 6:
			regex = "regex:" + pick(r, poolRegexps)
		case 7:
			parts = append(parts, "port:"+pick(r, poolPorts))
		case 8:
			parts = append(parts, "net:"+pick(r, []string{"tcp", "udp", "icmp"}))
		case 9:
			parts = append(parts, "src:"+pick(r, poolSrcs))
		case 10:
			parts = append(parts, pick(r, []string{"uid:0", "uid:1000", "exe:/bin/a"}))
		case 11:
			parts = append(parts, "list:"+pick(r, []string{"names", "addrs", "mixed"}))
		}
	}
	if regex != "" {
		parts = append(parts, regex) // a regex takes the rest: it goes last
	}
	return strings.Join(parts, ",") + "=" + pick(r, poolActions)
}

func randomFlow(r *rand.Rand) *Flow {
	f := &Flow{
		Proto: Proto(1 + r.IntN(3)),
		Dst:   netip.AddrPortFrom(netip.MustParseAddr(pick(r, poolDsts)), pick(r, poolFlowPorts)),
		Src:   netip.MustParseAddr(pick(r, poolFlowSrcs)),
		Name:  pick(r, poolFlowNames),
	}
	switch r.IntN(3) {
	case 0:
		uid := pick(r, []uint32{0, 1000, 7})
		exe := pick(r, []string{"/bin/a", "/bin/b"})
		f.Owner = func() (uint32, string, bool) { return uid, exe, true }
	case 1:
		f.Owner = func() (uint32, string, bool) { return 0, "/bin/a", false }
	}
	return f
}

// naiveHolds is the meaning of a matcher, written out apart from the
// indexes and from matcher.holds. A matcher skip admits is taken as
// holding: the question leaves it out.
func naiveHolds(m *matcher, f *Flow, skip func(*matcher) bool) bool {
	if skip(m) {
		return true
	}
	name := strings.TrimSuffix(strings.ToLower(f.Name), ".")
	switch m.kind {
	case mCIDR:
		return m.prefix.Contains(f.Dst.Addr().Unmap())
	case mSrc:
		return m.prefix.Contains(f.Src.Unmap())
	case mPort:
		return f.Dst.Port() >= m.lo && f.Dst.Port() <= m.hi
	case mNet:
		return f.Proto == m.proto
	case mDomain:
		return name == m.s
	case mSuffix:
		return name == m.s || strings.HasSuffix(name, "."+m.s)
	case mKeyword:
		return name != "" && strings.Contains(name, m.s)
	case mRegex:
		return name != "" && m.re.MatchString(name)
	case mList:
		for _, line := range poolLists[filepath.Base(m.s)] {
			lm := naiveLine(line)
			if naiveHolds(&lm, f, skip) {
				return true
			}
		}
		return false
	case mUID, mExe:
		if f.Owner == nil {
			return false
		}
		uid, exe, ok := f.Owner()
		return ok && (m.kind == mUID && uid == m.uid || m.kind == mExe && exe == m.s)
	}
	panic("naiveHolds: kind not generated")
}

// naiveLine reads a list line as docs/rules.md says: KIND:VALUE, or a
// bare address or prefix, or a bare name meaning a suffix.
func naiveLine(line string) matcher {
	if k, _, _ := strings.Cut(line, ":"); k == "domain" || k == "suffix" || k == "keyword" || k == "regex" || k == "cidr" {
		m, err := parseMatcher(line)
		if err != nil {
			panic(err)
		}
		return m
	}
	if p, err := parsePrefix(line); err == nil {
		return matcher{kind: mCIDR, prefix: p}
	}
	return matcher{kind: mSuffix, s: line}
}

func naiveRuleHolds(r *Rule, f *Flow, skip func(*matcher) bool) bool {
	for i := range r.m {
		if !naiveHolds(&r.m[i], f, skip) {
			return false
		}
	}
	return true
}

func isNameKind(m *matcher) bool { return m.isName() }
func never(*matcher) bool        { return false }

// FuzzMatch compares the indexed Set with a linear first-match scan, for
// Match, NeedsName and MatchName, on random rule sets and flows.
func FuzzMatch(f *testing.F) {
	for i := range 20 {
		f.Add(uint64(i), uint8(10+i*7))
	}
	dir := f.TempDir()
	for name, lines := range poolLists {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
			f.Fatal(err)
		}
	}
	f.Fuzz(func(t *testing.T, seed uint64, n uint8) {
		r := rand.New(rand.NewPCG(seed, 17))
		texts := make([]string, 1+int(n)%80)
		for i := range texts {
			texts[i] = randomRule(r)
		}
		rs, err := ParseAll(texts)
		if err != nil {
			t.Fatalf("random rule: %v", err)
		}
		s, err := Compile(rs, Options{Dir: dir})
		if err != nil {
			t.Fatal(err)
		}
		for range 200 {
			fl := randomFlow(r)
			want := -1
			for i := range s.rules {
				if naiveRuleHolds(&s.rules[i], fl, never) {
					want = i
					break
				}
			}
			if got, _ := s.Match(fl); got != want {
				t.Fatalf("Match(%+v) = rule %d, linear scan says %d; rules:\n%s", fl, got+1, want+1, strings.Join(texts, "\n"))
			}

			noName := *fl
			noName.Name = ""
			wantNeeds := false
			for i := range s.rules {
				rule := &s.rules[i]
				if naiveRuleHolds(rule, &noName, never) {
					break
				}
				if rule.hasName && naiveRuleHolds(rule, &noName, isNameKind) {
					wantNeeds = true
					break
				}
			}
			if got := s.NeedsName(fl); got != wantNeeds {
				t.Fatalf("NeedsName(%+v) = %v, linear scan says %v; rules:\n%s", fl, got, wantNeeds, strings.Join(texts, "\n"))
			}
			// Decide is the two in one: a flow with a name needs none.
			if got, _, needs := s.Decide(fl); got != want || needs != (wantNeeds && fl.Name == "") {
				t.Fatalf("Decide(%+v) = rule %d, needs a name %v; linear scan says %d, %v; rules:\n%s", fl, got+1, needs, want+1, wantNeeds && fl.Name == "", strings.Join(texts, "\n"))
			}

			var wantAct Action
			wantOK := false
			byName := &Flow{Name: fl.Name}
			for i := range s.rules {
				rule := &s.rules[i]
				if naiveRuleHolds(rule, byName, func(m *matcher) bool { return !m.isName() }) {
					wantAct, wantOK = rule.Action, rule.pureName
					break
				}
			}
			if fl.Name == "" {
				wantAct, wantOK = Action{}, false
			}
			if !wantOK {
				wantAct = Action{}
			}
			if a, ok := s.MatchName(fl.Name); a != wantAct || ok != wantOK {
				t.Fatalf("MatchName(%q) = %v %v, linear scan says %v %v; rules:\n%s", fl.Name, a, ok, wantAct, wantOK, strings.Join(texts, "\n"))
			}
		}
	})
}

// TestTrieDense holds the prefix tries to a linear scan where prefixes
// crowd: thousands of v4 and v6 prefixes over a few bits of space, nested
// and overlapping, so that branch nodes, nodes placed above others and the
// lowest-id cut are all exercised.
func TestTrieDense(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	randAddr := func() netip.Addr {
		if r.IntN(2) == 0 {
			return netip.AddrFrom4([4]byte{10, 0, byte(r.IntN(16)), byte(r.IntN(256))})
		}
		var b [16]byte
		b[0], b[1], b[14], b[15] = 0x20, 0x01, byte(r.IntN(16)), byte(r.IntN(256))
		return netip.AddrFrom16(b)
	}
	var texts []string
	for range 3000 {
		a := randAddr()
		p := netip.PrefixFrom(a, a.BitLen()-r.IntN(14)).Masked()
		texts = append(texts, "cidr:"+p.String()+"="+pick(r, poolActions))
	}
	s := compile(t, Options{}, texts...)
	for range 20000 {
		f := &Flow{Proto: TCP, Dst: netip.AddrPortFrom(randAddr(), 1)}
		want := -1
		for i := range s.rules {
			if s.rules[i].m[0].prefix.Contains(f.Dst.Addr()) {
				want = i
				break
			}
		}
		if got, _ := s.Match(f); got != want {
			t.Fatalf("Match(%s) = rule %d, linear scan says %d", f.Dst, got+1, want+1)
		}
	}
}
