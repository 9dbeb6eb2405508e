package udpnat

import (
	"net/netip"
	"time"
)

// idleAfter is how long an association must have been silent both ways to
// be shown as idle in the live view.
const idleAfter = 2 * time.Second

// FlowInfo is one association as Flows sees it.
type FlowInfo struct {
	ID     uint64
	Client netip.AddrPort
	// Dst is where the client's first datagram went: an association
	// carries datagrams to any destination (endpoint-independent mapping).
	Dst      netip.AddrPort
	Age      time.Duration
	Up, Down uint64 // payload bytes relayed from the client and to it
	// State is "opening" while the upstream socket is being opened,
	// "failed" when it could not be (datagrams are refused for a while),
	// "idle" after idleAfter of silence, else "open".
	State string
	// Via, Rule, Name and NameFrom say how it was routed (Route), once
	// it is.
	Via, Rule, Name, NameFrom string
}

// Flows appends every association to dst and returns it.
func (t *Table) Flows(dst []FlowInfo) []FlowInfo {
	now := time.Now().UnixNano()
	t.mu.Lock()
	defer t.mu.Unlock()
	for a := t.lru.front; a != nil; a = a.next {
		dst = append(dst, FlowInfo{
			ID: a.id, Client: a.client, Dst: a.firstDst,
			Age: time.Duration(now - a.opened),
			Up:  a.up.Load(), Down: a.down.Load(),
			State: a.state(now),
		})
		if a.routed() {
			f := &dst[len(dst)-1]
			f.Via, f.Rule, f.Name, f.NameFrom = a.route.Via, a.route.Rule, a.route.Name, a.route.NameFrom
		}
	}
	return dst
}

func (a *udpAssoc) state(now int64) string {
	select {
	case <-a.ready:
	default:
		return "opening"
	}
	// failed and the route are written before ready is closed.
	switch {
	case a.dropping:
		return "dropped"
	case a.failed && a.route.Reject:
		return "rejected"
	case a.failed:
		return "failed"
	}
	if now-a.last.Load() >= int64(idleAfter) {
		return "idle"
	}
	return "open"
}

// Abort ends the association with id, and reports whether there was one.
// Its client's next datagram opens a new one.
func (t *Table) Abort(id uint64) bool {
	return t.abortWhere(func(a *udpAssoc) bool { return a.id == id }, true) > 0
}

// abortWhere ends the associations match picks, the first one only if
// one is set, and returns how many it ended.
func (t *Table) abortWhere(match func(*udpAssoc) bool, one bool) int {
	t.mu.Lock()
	defer t.mu.Unlock()
	n := 0
	for a := t.lru.front; a != nil; {
		next := a.next
		if match(a) {
			t.removeLocked(a)
			a.abort()
			n++
			if one {
				break
			}
		}
		a = next
	}
	return n
}
