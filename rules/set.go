package rules

import (
	"net/netip"
	"strings"
	"sync/atomic"
)

// Flow is what a rule can look at: a new flow as the stack sees it.
type Flow struct {
	Proto Proto
	Dst   netip.AddrPort
	// Src is the client's address behind the TUN.
	Src netip.Addr
	// Name is the destination's name ("" when unknown): from the fake-IP
	// pool, DNS or sniffing. Case and a trailing dot do not matter.
	Name string
	// Owner looks up the local process that owns the flow (host-wide
	// mode). Match and NeedsName call it at most once each, and only
	// when a rule with uid: or exe: is a candidate for the flow; a caller
	// that asks both may cache its answer. nil, or ok false, means
	// unknown, and then no uid: or exe: matcher holds.
	Owner func() (uid uint32, exe string, ok bool)
}

// Options are what Compile needs besides the rules. The zero value is fine.
type Options struct {
	// Dir is where relative list: paths are taken from ("" is the
	// working directory): the config file's directory, typically.
	Dir string
}

// Set is a compiled list of rules, safe for concurrent use. A reload
// compiles a new Set (reading the list files again) and swaps it in. A
// nil *Set has no rules: every flow takes the default upstream.
type Set struct {
	rules  []Rule
	counts []atomic.Uint64
	// main finds the first rule a flow matches. gate finds, among the
	// rules that look at names, the first whose other matchers hold
	// (NeedsName). byName finds the first rule whose name matchers may
	// hold for a name, the others taken as holding (MatchName).
	main, gate, byName index
	hasName, hasOwner  bool
}

// mode says which matchers a lookup evaluates.
type mode uint8

const (
	modeAll      mode = iota
	modeNoName        // name matchers taken as holding
	modeNameOnly      // all but name matchers taken as holding
)

// index files each rule under one selective matcher, so that a lookup
// collects candidates from a few trie paths and checks only those, plus
// the rules that have no such matcher (rest). Every list is in increasing
// rule order; the first rule whose matchers all hold wins.
type index struct {
	mode   mode
	v4, v6 ptrie
	names  names
	ports  map[uint16][]int32
	rest   []int32
}

// Compile checks rules, reads the list files they name, and indexes them
// in the order given: the first rule that matches a flow wins. Each Rule's
// Index becomes its position.
func Compile(rules []Rule, opts Options) (*Set, error) {
	s := &Set{
		rules:  make([]Rule, len(rules)),
		counts: make([]atomic.Uint64, len(rules)),
	}
	ls := &lists{dir: opts.Dir, read: map[string]*list{}}
	for i := range rules {
		r := rules[i]
		r.Index = i
		r.m = append([]matcher(nil), r.m...) // Compile fills in lists: not the caller's copy
		if len(r.m) == 0 {
			return nil, &Error{Index: i, Text: r.Text, Err: errNoMatch}
		}
		r.pureName = true
		for j := range r.m {
			m := &r.m[j]
			if m.kind == mList {
				l, err := ls.get(m.s)
				if err != nil {
					return nil, &Error{Index: i, Text: r.Text, Err: err}
				}
				m.list = l
			}
			name := m.isName()
			r.hasName = r.hasName || name
			r.pureName = r.pureName && name && !(m.kind == mList && m.list.hasAddrs)
			r.hasOwner = r.hasOwner || m.isOwner()
		}
		s.hasName = s.hasName || r.hasName
		s.hasOwner = s.hasOwner || r.hasOwner
		s.rules[i] = r
	}
	s.main = s.build(modeAll, nil)
	s.gate = s.build(modeNoName, func(r *Rule) bool { return r.hasName })
	s.byName = s.build(modeNameOnly, nil)
	return s, nil
}

// build indexes the rules keep admits (all when nil) for lookups in mode.
func (s *Set) build(md mode, keep func(*Rule) bool) index {
	x := index{mode: md, names: names{}, ports: map[uint16][]int32{}}
	for i := range s.rules {
		r := &s.rules[i]
		if keep != nil && !keep(r) {
			continue
		}
		id := int32(i)
		if m := r.pick(md); m == nil {
			x.rest = append(x.rest, id)
		} else {
			switch m.kind {
			case mCIDR:
				addPrefix(&x.v4, &x.v6, m.prefix, id)
			case mDomain, mSuffix:
				x.names.add(m.s, m.kind == mSuffix, id)
			case mPort:
				x.ports[m.lo] = append(x.ports[m.lo], id)
			}
		}
	}
	return x
}

// pick returns the matcher to file r under for lookups in mode md, or nil:
// a destination prefix, else a name, else a short prefix, else a single
// port. Any one will do, as a candidate is checked in full; this order
// puts each rule where the fewest flows will find it. A prefix shorter
// than /8 (cidr:0.0.0.0/0,suffix:x) is on the path of most flows.
func (r *Rule) pick(md mode) *matcher {
	var name, short, port *matcher
	for i := range r.m {
		m := &r.m[i]
		switch {
		case m.kind == mCIDR && md != modeNameOnly:
			if m.prefix.Bits() >= 8 {
				return m
			}
			if short == nil {
				short = m
			}
		case (m.kind == mDomain || m.kind == mSuffix) && md != modeNoName && name == nil:
			name = m
		case m.kind == mPort && m.lo == m.hi && md != modeNameOnly && port == nil:
			port = m
		}
	}
	switch {
	case name != nil:
		return name
	case short != nil:
		return short
	}
	return port
}

// Len returns the number of rules.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.rules)
}

// Rule returns the rule at index i. The caller must not change it.
func (s *Set) Rule(i int) *Rule { return &s.rules[i] }

// Counts returns how many flows each rule has matched, by index. A new Set
// (a reload) counts from zero.
func (s *Set) Counts() []uint64 {
	if s == nil {
		return nil
	}
	c := make([]uint64, len(s.counts))
	for i := range s.counts {
		c[i] = s.counts[i].Load()
	}
	return c
}

// HasNameRules reports whether some rule looks at names.
func (s *Set) HasNameRules() bool { return s != nil && s.hasName }

// HasOwnerRules reports whether some rule looks at the owner (uid:, exe:).
func (s *Set) HasOwnerRules() bool { return s != nil && s.hasOwner }

// Match returns the first rule that f matches and its index, or -1 and nil
// when none does (the flow takes the default upstream). It counts the
// match. It does not allocate unless f.Name has upper-case letters.
func (s *Set) Match(f *Flow) (int, *Rule) {
	i, r, _ := s.decide(f, false)
	return i, r
}

// NeedsName reports whether the rule f matches could change were its name
// known: f.Name is taken as empty, and the answer is whether a rule that
// looks at names, and whose other matchers hold for f, comes before the
// first rule f matches without one. The stack sniffs a flow's first bytes
// only then. It counts nothing.
func (s *Set) NeedsName(f *Flow) bool {
	if !s.HasNameRules() {
		return false
	}
	var o owner
	return s.needsName(f, s.main.first(s, f, "", len(s.rules), &o), &o)
}

// Decide is Match and, for a flow without a name, NeedsName in one lookup
// of the rules, with f's owner looked up once at most: the rule f matches
// (counted) and whether a name could change it.
func (s *Set) Decide(f *Flow) (int, *Rule, bool) {
	return s.decide(f, true)
}

func (s *Set) decide(f *Flow, withNeeds bool) (i int, r *Rule, needsName bool) {
	if s == nil {
		return -1, nil, false
	}
	var o owner
	name := normName(f.Name)
	i = s.main.first(s, f, name, len(s.rules), &o)
	if withNeeds && name == "" {
		needsName = s.needsName(f, i, &o)
	}
	if i < 0 {
		return -1, nil, needsName
	}
	s.counts[i].Add(1)
	return i, &s.rules[i], needsName
}

// needsName is NeedsName for a flow without a name that matches rule m
// (-1: none).
func (s *Set) needsName(f *Flow, m int, o *owner) bool {
	if !s.HasNameRules() {
		return false
	}
	if m < 0 {
		m = len(s.rules)
	}
	return s.gate.first(s, f, "", m, o) >= 0
}

// MatchName returns the action for flows to name when the name alone
// decides it: the first rule that may match a flow to name looks at
// nothing but the name. ok is false when an earlier rule looks at
// something else (its address, port...), and when no rule can match (the
// default upstream applies). dns uses it before any flow exists, to give
// a rejected name an empty answer and a direct name its real address.
// It counts nothing.
func (s *Set) MatchName(name string) (Action, bool) {
	name = normName(name)
	if s == nil || name == "" {
		return Action{}, false
	}
	var o owner
	i := s.byName.first(s, &Flow{}, name, len(s.rules), &o)
	if i < 0 || !s.rules[i].pureName {
		return Action{}, false
	}
	return s.rules[i].Action, true
}

// first returns the lowest index below limit of the rules in x that hold
// for f (name is f's normalized name), or -1.
func (x *index) first(s *Set, f *Flow, name string, limit int, o *owner) int {
	best := int32(limit)
	if dst := f.Dst.Addr().Unmap(); dst.IsValid() && x.mode != modeNameOnly {
		t := &x.v6
		if dst.Is4() {
			t = &x.v4
		}
		a := keyOf(dst)
		for nd := t.root; nd != nil && nd.low < best && nd.holds(a); nd = nd.next(a) {
			best = s.scan(nd.ids, best, f, name, x.mode, o)
		}
	}
	if name != "" && x.mode != modeNoName {
		for n := name; ; {
			if e, ok := x.names[n]; ok {
				if n == name {
					best = s.scan(e.exact, best, f, name, x.mode, o)
				}
				best = s.scan(e.suffix, best, f, name, x.mode, o)
			}
			i := strings.IndexByte(n, '.')
			if i < 0 {
				break
			}
			n = n[i+1:]
		}
	}
	if p := f.Dst.Port(); p != 0 && len(x.ports) > 0 {
		best = s.scan(x.ports[p], best, f, name, x.mode, o)
	}
	best = s.scan(x.rest, best, f, name, x.mode, o)
	if int(best) == limit {
		return -1
	}
	return int(best)
}

// scan returns the first rule of ids below best that holds, or best.
func (s *Set) scan(ids []int32, best int32, f *Flow, name string, md mode, o *owner) int32 {
	for _, id := range ids {
		if id >= best {
			break
		}
		if s.rules[id].holds(f, name, md, o) {
			return id
		}
	}
	return best
}

// owner is a flow's owner, looked up once.
type owner struct {
	done, ok bool
	uid      uint32
	exe      string
}

func (o *owner) get(f *Flow) bool {
	if !o.done {
		o.done = true
		if f.Owner != nil {
			o.uid, o.exe, o.ok = f.Owner()
		}
	}
	return o.ok
}

// holds reports whether every matcher of r holds for f in mode md. The
// owner matchers go last: their lookup is the only costly step.
func (r *Rule) holds(f *Flow, name string, md mode, o *owner) bool {
	for i := range r.m {
		m := &r.m[i]
		if m.isOwner() {
			continue
		}
		isName := m.isName()
		if md == modeNoName && isName || md == modeNameOnly && !isName {
			continue
		}
		if !m.holds(f, name, md) {
			return false
		}
	}
	if !r.hasOwner || md == modeNameOnly {
		return true
	}
	if !o.get(f) {
		return false
	}
	for i := range r.m {
		switch m := &r.m[i]; m.kind {
		case mUID:
			if o.uid != m.uid {
				return false
			}
		case mExe:
			if o.exe != m.s {
				return false
			}
		}
	}
	return true
}

// holds reports whether m, not an owner matcher, holds for f.
func (m *matcher) holds(f *Flow, name string, md mode) bool {
	switch m.kind {
	case mCIDR:
		return m.prefix.Contains(f.Dst.Addr().Unmap())
	case mSrc:
		return m.prefix.Contains(f.Src.Unmap())
	case mPort:
		p := f.Dst.Port()
		return m.lo <= p && p <= m.hi
	case mNet:
		return f.Proto == m.proto
	case mDomain:
		return name == m.s
	case mSuffix:
		return name == m.s || len(name) > len(m.s) && strings.HasSuffix(name, m.s) && name[len(name)-len(m.s)-1] == '.'
	case mKeyword:
		return strings.Contains(name, m.s)
	case mRegex:
		return name != "" && m.re.MatchString(name)
	case mList:
		if md == modeNameOnly && m.list.hasAddrs {
			return true // an address line may hold: only the flow can tell
		}
		return m.list.matchName(name) || md != modeNameOnly && m.list.matchAddr(f.Dst.Addr().Unmap())
	}
	return false
}
