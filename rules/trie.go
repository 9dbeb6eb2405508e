package rules

import (
	"encoding/binary"
	"math/bits"
	"net/netip"
	"strings"
)

// key is an address as 128 bits, most significant first; a v4 address
// fills the top 32. v4 and v6 prefixes live in tries of their own, so that
// ::/0 never holds a v4 destination.
type key struct{ hi, lo uint64 }

func keyOf(a netip.Addr) key {
	if a.Is4() {
		b := a.As4()
		return key{hi: uint64(binary.BigEndian.Uint32(b[:])) << 32}
	}
	b := a.As16()
	return key{binary.BigEndian.Uint64(b[:8]), binary.BigEndian.Uint64(b[8:])}
}

// bit returns bit i (0 is the most significant), i < 128.
func (k key) bit(i int) int {
	if i < 64 {
		return int(k.hi >> (63 - i) & 1)
	}
	return int(k.lo >> (127 - i) & 1)
}

// common returns how many leading bits a and b share, 128 when equal.
func common(a, b key) int {
	if x := a.hi ^ b.hi; x != 0 {
		return bits.LeadingZeros64(x)
	}
	return 64 + bits.LeadingZeros64(a.lo^b.lo)
}

// mask keeps the first n bits of k.
func (k key) mask(n int) key {
	switch {
	case n == 0:
		return key{}
	case n < 64:
		return key{hi: k.hi &^ (1<<(64-n) - 1)}
	case n == 64:
		return key{hi: k.hi}
	case n < 128:
		return key{k.hi, k.lo &^ (1<<(128-n) - 1)}
	}
	return k
}

// pnode is a node of a path-compressed binary trie: a node stands for the
// prefix key/bits, and a chain of single-child nodes collapses into its
// last. The lookup of an address visits at most one node per distinct
// prefix length on its path, and with n prefixes about log2(n) nodes.
type pnode struct {
	key  key
	bits int32
	// low is the lowest id filed at this node or below it: a lookup
	// that has a match below low stops walking, as nothing further down
	// the path could come first. Ids arrive in increasing order, so only
	// a new node has to work it out.
	low   int32
	child [2]*pnode
	// ids are what is filed under exactly this prefix (rule indices or
	// list lines), in increasing order; nil on a node that only branches.
	ids []int32
}

// ptrie maps prefixes of one address family to ids.
type ptrie struct{ root *pnode }

// add files id under the prefix k/n (k masked to n bits). ids arrive in
// increasing order, so each node's list stays sorted and a repeat of the
// last id is dropped.
func (t *ptrie) add(k key, n int, id int32) {
	p := &t.root
	for {
		nd := *p
		if nd == nil {
			*p = &pnode{key: k, bits: int32(n), low: id, ids: []int32{id}}
			return
		}
		c := min(common(nd.key, k), int(nd.bits), n)
		switch {
		case c == int(nd.bits) && c == n:
			if l := len(nd.ids); l == 0 || nd.ids[l-1] != id {
				nd.ids = append(nd.ids, id)
			}
			return
		case c == int(nd.bits): // nd holds k/n: go down
			p = &nd.child[k.bit(c)]
		case c == n: // k/n holds nd: the new node goes above it
			nn := &pnode{key: k, bits: int32(n), low: min(id, nd.low), ids: []int32{id}}
			nn.child[nd.key.bit(c)] = nd
			*p = nn
			return
		default: // they part at bit c: a branch node at c joins them
			br := &pnode{key: k.mask(c), bits: int32(c), low: min(id, nd.low)}
			br.child[k.bit(c)] = &pnode{key: k, bits: int32(n), low: id, ids: []int32{id}}
			br.child[nd.key.bit(c)] = nd
			*p = br
			return
		}
	}
}

// next returns the node below nd on the way to a, or nil at the end. nd
// holds a.
func (nd *pnode) next(a key) *pnode {
	if nd.bits >= 128 {
		return nil
	}
	return nd.child[a.bit(int(nd.bits))]
}

// holds reports whether nd's prefix holds a.
func (nd *pnode) holds(a key) bool { return common(nd.key, a) >= int(nd.bits) }

// contains reports whether some prefix in t holds a.
func (t *ptrie) contains(a key) bool {
	for nd := t.root; nd != nil && nd.holds(a); nd = nd.next(a) {
		if len(nd.ids) > 0 {
			return true
		}
	}
	return false
}

// addPrefix files id under p in the trie of p's family.
func addPrefix(v4, v6 *ptrie, p netip.Prefix, id int32) {
	t := v6
	if p.Addr().Is4() {
		t = v4
	}
	t.add(keyOf(p.Addr()), p.Bits(), id)
}

// names maps a name, exact or as a suffix, to ids. Keys are whole names;
// a lookup tries the name and then each parent (a.b.c, b.c, c), cutting
// only at dots, so suffix:example.com never holds badexample.com. It is a
// trie by labels whose nodes are found by hashing their path. The ids are
// held in the map's slots, not behind a pointer: one memory access less a
// label.
type names map[string]nameIDs

type nameIDs struct {
	exact  []int32 // domain: the name itself
	suffix []int32 // suffix: the name and every name below it
}

func (m names) add(name string, suffix bool, id int32) {
	e := m[name]
	l := &e.exact
	if suffix {
		l = &e.suffix
	}
	if n := len(*l); n == 0 || (*l)[n-1] != id {
		*l = append(*l, id)
	}
	m[name] = e
}

// contains reports whether name (normalized, not empty) is filed or is
// below a filed suffix.
func (m names) contains(name string) bool {
	s := name
	for {
		if e := m[s]; len(e.suffix) > 0 || s == name && len(e.exact) > 0 {
			return true
		}
		i := strings.IndexByte(s, '.')
		if i < 0 {
			return false
		}
		s = s[i+1:]
	}
}

// normName lower-cases name and drops one trailing dot. It allocates only
// when name has an upper-case letter.
func normName(name string) string {
	if n := len(name); n > 0 && name[n-1] == '.' {
		name = name[:n-1]
	}
	for i := 0; i < len(name); i++ {
		if c := name[i]; 'A' <= c && c <= 'Z' {
			b := []byte(name)
			for j := i; j < len(b); j++ {
				if c := b[j]; 'A' <= c && c <= 'Z' {
					b[j] = c + 'a' - 'A'
				}
			}
			return string(b)
		}
	}
	return name
}
