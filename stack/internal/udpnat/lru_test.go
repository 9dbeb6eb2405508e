package udpnat

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"testing"
	"time"
)

// lruTable is a table without goroutines whose associations are made by
// hand, for the eviction order alone.
type lruTable struct {
	t      *Table
	assocs []*udpAssoc
	base   int64 // unix nanoseconds of the first datagram
}

func newLRUTable(t *testing.T, n int) *lruTable {
	t.Helper()
	l := &lruTable{
		t:    &Table{cfg: Config{Max: n}, log: slog.New(slog.DiscardHandler), assocs: make(map[netip.AddrPort]*udpAssoc)},
		base: time.Now().UnixNano(),
	}
	for i := range n {
		a := &udpAssoc{
			t:      l.t,
			client: netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), uint16(1000+i)),
			log:    l.t.log,
			ready:  make(chan struct{}),
		}
		a.ctx, a.cancel = context.WithCancel(context.Background())
		t.Cleanup(a.cancel)
		// Listed in order, a millisecond apart: the first is the
		// least recently used.
		a.last.Store(l.base + int64(i)*int64(time.Millisecond))
		l.t.assocs[a.client] = a
		l.t.lru.pushFront(a)
		l.assocs = append(l.assocs, a)
	}
	return l
}

// used is a datagram from a's client: the lookup moves it to the front.
func (l *lruTable) used(a *udpAssoc, at time.Duration) {
	a.last.Store(l.base + int64(at))
	l.t.lru.moveToFront(a)
}

// replied is a datagram to a's client: it only stamps last.
func (l *lruTable) replied(a *udpAssoc, at time.Duration) {
	a.last.Store(l.base + int64(at))
}

// evict evicts one association and returns which, checking that it left
// the map and the list and was aborted.
func (l *lruTable) evict(t *testing.T) int {
	t.Helper()
	before := len(l.t.assocs)
	l.t.evictOldestLocked(time.Now().UnixNano())
	if len(l.t.assocs) != before-1 {
		t.Fatalf("%d associations after an eviction, want %d", len(l.t.assocs), before-1)
	}
	for i, a := range l.assocs {
		if _, ok := l.t.assocs[a.client]; ok {
			continue
		}
		if a.ctx.Err() == nil {
			t.Errorf("association %d evicted but not aborted", i)
		}
		for e := l.t.lru.front; e != nil; e = e.next {
			if e == a {
				t.Fatalf("association %d evicted but still listed", i)
			}
		}
		l.assocs = append(l.assocs[:i:i], l.assocs[i+1:]...)
		return int(a.client.Port() - 1000)
	}
	t.Fatal("no association evicted")
	return -1
}

// order lists the associations front to back, as indices, checking the
// back links on the way.
func (l *lruTable) order(t *testing.T) string {
	t.Helper()
	var s []int
	var prev *udpAssoc
	for e := l.t.lru.front; e != nil; e = e.next {
		if e.prev != prev {
			t.Fatalf("association %d: prev link broken", e.client.Port()-1000)
		}
		s = append(s, int(e.client.Port()-1000))
		prev = e
	}
	if l.t.lru.back() != prev {
		t.Fatalf("back is not the last association")
	}
	return fmt.Sprint(s)
}

// TestEvictionOrder checks the O(1) LRU of the UDP table: the association
// least recently used by its client is evicted; one whose last activity
// (a reply) is newer than its place in the list by more than relistAfter
// gets a second chance, a bounded number of times.
func TestEvictionOrder(t *testing.T) {
	ms := time.Millisecond
	t.Run("least-recently-used", func(t *testing.T) {
		l := newLRUTable(t, 3)
		if got := l.order(t); got != "[2 1 0]" {
			t.Fatalf("order %s, want [2 1 0]", got)
		}
		l.used(l.assocs[0], 10*ms)
		if got := l.order(t); got != "[0 2 1]" {
			t.Fatalf("order after use %s, want [0 2 1]", got)
		}
		if got := l.evict(t); got != 1 {
			t.Errorf("evicted %d, want 1", got)
		}
		if got := l.evict(t); got != 2 {
			t.Errorf("evicted %d, want 2", got)
		}
		if got := l.order(t); got != "[0]" {
			t.Fatalf("order %s, want [0]", got)
		}
	})
	t.Run("reply-second-chance", func(t *testing.T) {
		l := newLRUTable(t, 3)
		// 0, the oldest by its client, has had replies since.
		l.replied(l.assocs[0], relistAfter+10*ms)
		if got := l.evict(t); got != 1 {
			t.Errorf("evicted %d, want 1: 0 had replies", got)
		}
		if got := l.order(t); got != "[0 2]" {
			t.Errorf("order %s, want [0 2]: 0 moved to the front", got)
		}
		// Its chance is used up: with no newer reply it goes next
		// after 2.
		if got := l.evict(t); got != 2 {
			t.Errorf("evicted %d, want 2", got)
		}
	})
	t.Run("reply-too-soon", func(t *testing.T) {
		l := newLRUTable(t, 3)
		// Within relistAfter of its listing: the send that listed it.
		l.replied(l.assocs[0], relistAfter/2)
		if got := l.evict(t); got != 0 {
			t.Errorf("evicted %d, want 0: its reply came too soon to count", got)
		}
	})
	t.Run("second-chances-bounded", func(t *testing.T) {
		n := maxSecondChances + 2
		l := newLRUTable(t, n)
		for _, a := range l.assocs {
			l.replied(a, 2*relistAfter)
		}
		// The first maxSecondChances from the back go to the front;
		// the next is evicted although it had replies too.
		if got := l.evict(t); got != maxSecondChances {
			t.Errorf("evicted %d, want %d", got, maxSecondChances)
		}
		if got := len(l.t.assocs); got != n-1 {
			t.Errorf("%d associations, want %d", got, n-1)
		}
	})
}

// TestEvictIdle checks the full table's choice under a flood of new
// sources (issue 19): an association active within EvictIdle is kept and
// the newcomer refused; once the oldest has been silent that long it is
// evicted as before.
func TestEvictIdle(t *testing.T) {
	const idle = 10 * time.Second
	cases := []struct {
		name      string
		oldestAge time.Duration // how long ago the least recently active one was
		wantEvict bool
	}{
		{name: "active-kept", oldestAge: time.Second, wantEvict: false},
		{name: "just-under", oldestAge: idle - time.Millisecond, wantEvict: false},
		{name: "idle-evicted", oldestAge: idle, wantEvict: true},
		{name: "long-idle-evicted", oldestAge: time.Minute, wantEvict: true},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l := newLRUTable(t, 3)
			l.t.cfg.EvictIdle = idle
			// newLRUTable lists them a millisecond apart from base: 0
			// is the oldest.
			now := l.base + int64(c.oldestAge)
			got := l.t.evictOldestLocked(now)
			if got != c.wantEvict {
				t.Fatalf("evicted %v, want %v", got, c.wantEvict)
			}
			want := 3
			if c.wantEvict {
				want = 2
				if _, ok := l.t.assocs[l.assocs[0].client]; ok {
					t.Errorf("evicted, but not the oldest")
				}
			}
			if n := len(l.t.assocs); n != want {
				t.Errorf("%d associations, want %d", n, want)
			}
		})
	}
}
