package rules

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
)

// maxListSize bounds a list file: 256 MiB is millions of lines.
const maxListSize = 256 << 20

// list is a list file, read: a list: matcher holds when any line does.
// Lines are filed in tries of their own, so a list of 100,000 names costs
// a matcher one lookup, not a scan.
type list struct {
	path     string
	v4, v6   ptrie
	names    names
	keywords []string
	regexps  []*regexp.Regexp
	hasNames bool // some line matches names
	hasAddrs bool // some line matches addresses
}

// loadList reads the list file at path. A line is a bare name (a suffix
// match), a bare address or prefix (cidr), or an explicit domain:, suffix:,
// keyword:, regex: or cidr: entry; blank lines and lines starting with '#'
// are skipped. Errors name the file and the line.
func loadList(path string) (*list, error) {
	fd, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("read list: %w", err)
	}
	defer fd.Close()
	// A bound, so that a path naming a device (/dev/zero) fails rather
	// than holding a reload for ever.
	data, err := io.ReadAll(io.LimitReader(fd, maxListSize+1))
	if err != nil {
		return nil, fmt.Errorf("read list: %w", err)
	}
	if len(data) > maxListSize {
		return nil, fmt.Errorf("list %s is larger than %d MiB", path, maxListSize>>20)
	}
	l := &list{path: path, names: names{}}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(nil, 64<<10)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		if err := l.add(line, int32(n)); err != nil {
			return nil, fmt.Errorf("list %s line %d: %w", path, n, err)
		}
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("list %s: %w", path, err)
	}
	return l, nil
}

func (l *list) add(line string, n int32) error {
	var m matcher
	k, _, _ := strings.Cut(line, ":")
	switch k {
	case "domain", "suffix", "keyword", "regex", "cidr":
		var err error
		if m, err = parseMatcher(line); err != nil {
			return err
		}
	default:
		if p, err := parsePrefix(line); err == nil {
			m = matcher{kind: mCIDR, prefix: p}
		} else if _, aerr := netip.ParseAddr(line); aerr == nil || strings.Contains(line, "/") {
			return err // an address or prefix that is wrong: say so, not "bad name"
		} else {
			name, err := parseDomain(line)
			if err != nil {
				return fmt.Errorf("%w (want a name, an address, a prefix or KIND:VALUE)", err)
			}
			m = matcher{kind: mSuffix, s: name}
		}
	}
	switch m.kind {
	case mCIDR:
		addPrefix(&l.v4, &l.v6, m.prefix, n)
		l.hasAddrs = true
	case mDomain, mSuffix:
		l.names.add(m.s, m.kind == mSuffix, n)
		l.hasNames = true
	case mKeyword:
		l.keywords = append(l.keywords, m.s)
		l.hasNames = true
	case mRegex:
		l.regexps = append(l.regexps, m.re)
		l.hasNames = true
	}
	return nil
}

// matchAddr reports whether a line holds the (unmapped) address a.
func (l *list) matchAddr(a netip.Addr) bool {
	if !a.IsValid() || !l.hasAddrs {
		return false
	}
	if a.Is4() {
		return l.v4.contains(keyOf(a))
	}
	return l.v6.contains(keyOf(a))
}

// matchName reports whether a line holds name (normalized).
func (l *list) matchName(name string) bool {
	if name == "" || !l.hasNames {
		return false
	}
	if l.names.contains(name) {
		return true
	}
	for _, k := range l.keywords {
		if strings.Contains(name, k) {
			return true
		}
	}
	for _, re := range l.regexps {
		if re.MatchString(name) {
			return true
		}
	}
	return false
}

// lists reads each list file once per Compile, however many rules name it.
type lists struct {
	dir  string
	read map[string]*list
}

func (ls *lists) get(path string) (*list, error) {
	if !filepath.IsAbs(path) && ls.dir != "" {
		path = filepath.Join(ls.dir, path)
	}
	if l, ok := ls.read[path]; ok {
		return l, nil
	}
	l, err := loadList(path)
	if err != nil {
		return nil, err
	}
	ls.read[path] = l
	return l, nil
}
