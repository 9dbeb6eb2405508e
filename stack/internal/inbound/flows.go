package inbound

import (
	"net/netip"
	"time"
)

// idleAfter is how long an association must have been silent both ways to
// be shown as idle in the live view.
const idleAfter = 2 * time.Second

// FlowInfo is one inbound association as Flows sees it.
type FlowInfo struct {
	ID       uint64
	Client   netip.AddrPort // the outside source
	Dst      netip.AddrPort // the published port behind the TUN
	Age      time.Duration
	Up, Down uint64 // payload bytes from the outside source and to it
	State    string // "idle" after idleAfter of silence, else "open"
}

// Flows appends every inbound association to dst and returns it.
func (in *UDP) Flows(dst []FlowInfo) []FlowInfo {
	now := time.Now().UnixNano()
	in.mu.Lock()
	defer in.mu.Unlock()
	for e := in.lru.Front(); e != nil; e = e.Next() {
		a := e.Value.(*inboundAssoc)
		state := "open"
		if now-a.last.Load() >= int64(idleAfter) {
			state = "idle"
		}
		dst = append(dst, FlowInfo{
			ID: a.id, Client: a.outside, Dst: a.srv.dst, Age: time.Duration(now - a.opened),
			Up: a.up.Load(), Down: a.down.Load(), State: state,
		})
	}
	return dst
}

// Abort ends the association with id, and reports whether there was one.
// Its source's next datagram opens a new one, on another gateway port.
func (in *UDP) Abort(id uint64) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for e := in.lru.Front(); e != nil; e = e.Next() {
		if a := e.Value.(*inboundAssoc); a.id == id {
			in.removeLocked(a)
			a.log.Debug("inbound udp association closed", "cause", "closed by request")
			return true
		}
	}
	return false
}
