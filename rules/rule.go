// Package rules decides, for each new flow, which way it goes: direct,
// through a proxy, rejected or dropped. It owns the rule syntax of the
// --rule flag (MATCH[,MATCH...]=ACTION, as issue 17 spells it), the list
// files rules may name, and the indexes that keep matching a flow under a
// microsecond with 100,000 rules.
//
// The package is pure: it opens no socket and starts no goroutine. The
// stack asks Match for each new flow, NeedsName whether sniffing the
// client's first bytes could change the answer, and dns asks MatchName for
// names resolved before any flow exists. What a flow's owner is (uid, exe)
// comes from the caller through Flow.Owner, asked only when a rule needs it.
package rules

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Kind is what a rule does with the flows it matches.
type Kind uint8

const (
	// Direct dials the destination from netstackd's own namespace.
	Direct Kind = iota + 1
	// Proxy sends the flow to an upstream (Action.Upstream).
	Proxy
	// Reject refuses the flow at once: a TCP reset, an ICMP port
	// unreachable for UDP, no reply to ICMP.
	Reject
	// Drop discards the flow's packets without a word.
	Drop
)

// Action is a rule's verdict.
type Action struct {
	Kind Kind
	// Upstream names the upstream or group of a Proxy action; "" is the
	// default upstream. Empty for the other kinds.
	Upstream string
}

// String spells the action as a rule does: direct, proxy, proxy:NAME,
// reject or drop.
func (a Action) String() string {
	switch a.Kind {
	case Direct:
		return "direct"
	case Proxy:
		if a.Upstream != "" {
			return "proxy:" + a.Upstream
		}
		return "proxy"
	case Reject:
		return "reject"
	case Drop:
		return "drop"
	}
	return fmt.Sprintf("Kind(%d)", a.Kind)
}

// Proto is a flow's transport protocol, as net: names it.
type Proto uint8

// The protocols a flow can have; the zero Proto is none of them, and no
// net: matcher holds it.
const (
	TCP Proto = iota + 1
	UDP
	ICMP
)

func (p Proto) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case ICMP:
		return "icmp"
	}
	return fmt.Sprintf("Proto(%d)", p)
}

// mkind is the kind of one MATCH.
type mkind uint8

const (
	mCIDR mkind = iota + 1
	mDomain
	mSuffix
	mKeyword
	mRegex
	mPort
	mNet
	mSrc
	mUID
	mExe
	mList
)

// names are the spellings of the kinds, as in the rule text.
var kindNames = [...]string{
	mCIDR: "cidr", mDomain: "domain", mSuffix: "suffix", mKeyword: "keyword",
	mRegex: "regex", mPort: "port", mNet: "net", mSrc: "src", mUID: "uid",
	mExe: "exe", mList: "list",
}

// matcher is one MATCH of a rule. Only the fields of its kind are set.
type matcher struct {
	kind   mkind
	prefix netip.Prefix   // cidr, src: masked, v4 when given v4-mapped
	s      string         // domain, suffix, keyword (lower case), regex source, exe, list path
	re     *regexp.Regexp // regex
	lo, hi uint16         // port range, inclusive
	proto  Proto          // net
	uid    uint32         // uid
	list   *list          // list, once Compile has read the file
}

// kindOf returns the kind spelled s, or 0.
func kindOf(s string) mkind {
	for k, name := range kindNames {
		if name == s && name != "" {
			return mkind(k)
		}
	}
	return 0
}

// isName reports whether the matcher looks at the flow's name.
func (m *matcher) isName() bool {
	switch m.kind {
	case mDomain, mSuffix, mKeyword, mRegex:
		return true
	case mList:
		return m.list != nil && m.list.hasNames
	}
	return false
}

// isOwner reports whether the matcher needs the flow's owner.
func (m *matcher) isOwner() bool { return m.kind == mUID || m.kind == mExe }

func (m *matcher) String() string {
	var v string
	switch m.kind {
	case mCIDR, mSrc:
		v = m.prefix.String()
	case mPort:
		v = strconv.Itoa(int(m.lo))
		if m.hi != m.lo {
			v += "-" + strconv.Itoa(int(m.hi))
		}
	case mNet:
		v = m.proto.String()
	case mUID:
		v = strconv.FormatUint(uint64(m.uid), 10)
	default:
		v = m.s
	}
	return kindNames[m.kind] + ":" + v
}

// Rule is one parsed rule: every matcher must hold for its Action to apply.
type Rule struct {
	// Text is the rule as written, for logs and errors.
	Text string
	// Index is the rule's position in its Set, from 0; logs count from 1
	// ("rule 3" is Index 2), as an operator reading the list does.
	Index  int
	Action Action
	m      []matcher

	// Set by Compile, once lists are read.
	hasName  bool // a matcher looks at the name
	pureName bool // every matcher looks at the name and nothing else
	hasOwner bool // a matcher needs the owner
}

// String spells the rule in its canonical form, which Parse reads back to
// the same rule: names in lower case, prefixes masked with their length.
func (r Rule) String() string {
	var b strings.Builder
	for i := range r.m {
		if i > 0 {
			b.WriteByte(',')
		}
		b.WriteString(r.m[i].String())
	}
	b.WriteByte('=')
	b.WriteString(r.Action.String())
	return b.String()
}

// Label names the rule in logs and errors: rule 3 "suffix:example.com=proxy:a".
func (r *Rule) Label() string { return fmt.Sprintf("rule %d %q", r.Index+1, r.Text) }

var errNoMatch = errors.New("no MATCH before '='")

// Error is a rule that does not parse, or whose list does not load.
type Error struct {
	// Index is the rule's position from 0, or -1 when Parse had no list.
	Index int
	Text  string
	Err   error
}

func (e *Error) Error() string {
	if e.Index < 0 {
		return fmt.Sprintf("rule %q: %v", e.Text, e.Err)
	}
	return fmt.Sprintf("rule %d %q: %v", e.Index+1, e.Text, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// ParseAll parses rules in order; the error names the rule by its
// position, counted from 1.
func ParseAll(texts []string) ([]Rule, error) {
	rs := make([]Rule, 0, len(texts))
	for i, s := range texts {
		r, err := Parse(s)
		if err != nil {
			var e *Error
			if errors.As(err, &e) {
				e.Index = i
			}
			return nil, err
		}
		r.Index = i
		rs = append(rs, r)
	}
	return rs, nil
}

// Parse reads one rule, MATCH[,MATCH...]=ACTION. The action follows the
// last '='. A regex: MATCH takes the rest of the MATCH list, commas and
// all, so it must come last.
func Parse(s string) (Rule, error) {
	text := strings.TrimSpace(s)
	r, err := parse(text)
	if err != nil {
		return Rule{}, &Error{Index: -1, Text: text, Err: err}
	}
	r.Text = text
	return r, nil
}

func parse(s string) (Rule, error) {
	eq := strings.LastIndexByte(s, '=')
	if eq < 0 {
		return Rule{}, errors.New(`no "=ACTION": a rule is MATCH[,MATCH...]=ACTION`)
	}
	act, err := parseAction(strings.TrimSpace(s[eq+1:]))
	if err != nil {
		return Rule{}, err
	}
	r := Rule{Action: act}
	rest := strings.TrimSpace(s[:eq])
	if rest == "" {
		return Rule{}, errNoMatch
	}
	for rest != "" {
		var part string
		if strings.HasPrefix(rest, "regex:") {
			// A regular expression may hold commas (a{1,3}): it takes
			// the rest, which no escape syntax would make clearer.
			part, rest = rest, ""
		} else {
			var found bool
			part, rest, found = strings.Cut(rest, ",")
			part, rest = strings.TrimSpace(part), strings.TrimSpace(rest)
			if found && rest == "" {
				return Rule{}, errors.New("empty MATCH after the last ','")
			}
		}
		m, err := parseMatcher(part)
		if err != nil {
			return Rule{}, err
		}
		r.m = append(r.m, m)
	}
	return r, nil
}

func parseAction(s string) (Action, error) {
	switch s {
	case "direct":
		return Action{Kind: Direct}, nil
	case "proxy":
		return Action{Kind: Proxy}, nil
	case "reject":
		return Action{Kind: Reject}, nil
	case "drop":
		return Action{Kind: Drop}, nil
	}
	if name, ok := strings.CutPrefix(s, "proxy:"); ok {
		if err := checkUpstream(name); err != nil {
			return Action{}, err
		}
		return Action{Kind: Proxy, Upstream: name}, nil
	}
	return Action{}, fmt.Errorf("unknown action %q (want direct, proxy, proxy:NAME, reject or drop)", s)
}

// checkUpstream keeps upstream names to what a config key and a metric
// label can both hold.
func checkUpstream(name string) error {
	if name == "" {
		return errors.New(`empty upstream name in "proxy:"`)
	}
	for _, c := range []byte(name) {
		if !isAlnum(c) && c != '-' && c != '_' && c != '.' {
			return fmt.Errorf("upstream name %q: character %q not allowed (letters, digits, '-', '_', '.')", name, c)
		}
	}
	return nil
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

func parseMatcher(part string) (matcher, error) {
	if part == "" {
		return matcher{}, errors.New("empty MATCH")
	}
	k, v, ok := strings.Cut(part, ":")
	if !ok {
		return matcher{}, fmt.Errorf("MATCH %q has no ':' (want KIND:VALUE, as cidr:10.0.0.0/8)", part)
	}
	kind := kindOf(k)
	switch kind {
	case mCIDR, mSrc:
		p, err := parsePrefix(v)
		if err != nil {
			return matcher{}, fmt.Errorf("%s: %w", k, err)
		}
		return matcher{kind: kind, prefix: p}, nil
	case mDomain, mSuffix:
		n, err := parseDomain(v)
		if err != nil {
			return matcher{}, fmt.Errorf("%s: %w", k, err)
		}
		return matcher{kind: kind, s: n}, nil
	case mKeyword:
		if v == "" || strings.IndexFunc(v, func(c rune) bool {
			return c > 0x7f || !isAlnum(byte(c)) && c != '-' && c != '_' && c != '.'
		}) >= 0 {
			return matcher{}, fmt.Errorf("keyword %q: want a non-empty word of letters, digits, '-', '_', '.'", v)
		}
		return matcher{kind: mKeyword, s: strings.ToLower(v)}, nil
	case mRegex:
		if v == "" {
			return matcher{}, errors.New("regex: empty expression")
		}
		re, err := regexp.Compile(v)
		if err != nil {
			return matcher{}, fmt.Errorf("regex %q: %w", v, err)
		}
		return matcher{kind: mRegex, s: v, re: re}, nil
	case mPort:
		lo, hi, err := parsePorts(v)
		if err != nil {
			return matcher{}, err
		}
		return matcher{kind: mPort, lo: lo, hi: hi}, nil
	case mNet:
		var p Proto
		switch v {
		case "tcp":
			p = TCP
		case "udp":
			p = UDP
		case "icmp":
			p = ICMP
		default:
			return matcher{}, fmt.Errorf("net %q: want tcp, udp or icmp", v)
		}
		return matcher{kind: mNet, proto: p}, nil
	case mUID:
		n, err := strconv.ParseUint(v, 10, 32)
		if err != nil || n == 1<<32-1 { // (uid_t)-1 is "no user" to the kernel
			return matcher{}, fmt.Errorf("uid %q: want a number 0-4294967294", v)
		}
		return matcher{kind: mUID, uid: uint32(n)}, nil
	case mExe:
		if !strings.HasPrefix(v, "/") {
			return matcher{}, fmt.Errorf("exe %q: want an absolute path", v)
		}
		return matcher{kind: mExe, s: v}, nil
	case mList:
		if v == "" {
			return matcher{}, errors.New("list: empty path")
		}
		return matcher{kind: mList, s: v}, nil
	}
	return matcher{}, fmt.Errorf("unknown MATCH kind %q in %q (want cidr, domain, suffix, keyword, regex, port, net, src, uid, exe or list)", k, part)
}

// parsePrefix reads a prefix, or an address standing for itself alone. A
// v4-mapped prefix becomes the v4 prefix it maps, as destinations are
// unmapped before matching.
func parsePrefix(v string) (netip.Prefix, error) {
	var p netip.Prefix
	if strings.Contains(v, "/") {
		var err error
		if p, err = netip.ParsePrefix(v); err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a prefix (as 10.0.0.0/8 or 2001:db8::/32)", v)
		}
	} else {
		a, err := netip.ParseAddr(v)
		if err != nil || a.Zone() != "" {
			return netip.Prefix{}, fmt.Errorf("%q is not an address or prefix (as 10.0.0.0/8 or 2001:db8::1)", v)
		}
		p = netip.PrefixFrom(a, a.BitLen())
	}
	if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
		p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
	}
	if m := p.Masked(); m != p {
		return netip.Prefix{}, fmt.Errorf("%s has bits set past its length (did you mean %s?)", v, m)
	}
	return p, nil
}

// parseDomain lower-cases a name and drops its trailing dot. Names are
// ASCII (punycode for the others): no IDNA here.
func parseDomain(v string) (string, error) {
	n := strings.ToLower(strings.TrimSuffix(v, "."))
	if n == "" {
		return "", fmt.Errorf("empty name %q", v)
	}
	if len(n) > 253 {
		return "", fmt.Errorf("name %.40q... is %d bytes, longer than 253", v, len(n))
	}
	for _, label := range strings.Split(n, ".") {
		if label == "" {
			return "", fmt.Errorf("name %q has an empty label", v)
		}
		for _, c := range []byte(label) {
			if !isAlnum(c) && c != '-' && c != '_' {
				return "", fmt.Errorf("name %q: character %q not allowed (letters, digits, '-', '_')", v, c)
			}
		}
	}
	return n, nil
}

// parsePorts reads N or N-M.
func parsePorts(v string) (lo, hi uint16, err error) {
	a, b, isRange := strings.Cut(v, "-")
	l, err := parsePort(a)
	if err != nil {
		return 0, 0, err
	}
	if !isRange {
		return l, l, nil
	}
	h, err := parsePort(b)
	if err != nil {
		return 0, 0, err
	}
	if h < l {
		return 0, 0, fmt.Errorf("port range %d-%d ends before it starts", l, h)
	}
	return l, h, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.Atoi(s)
	if err != nil {
		return 0, fmt.Errorf("port %q is not a number", s)
	}
	if n < 1 || n > 65535 {
		return 0, fmt.Errorf("port %d out of range 1-65535", n)
	}
	return uint16(n), nil
}
