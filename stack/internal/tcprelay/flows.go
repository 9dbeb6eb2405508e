package tcprelay

import (
	"net"
	"net/netip"
	"slices"
	"time"
)

// The live view of flows walks the list AbortAll already keeps: a flow
// costs it no map entry and nothing per copy beyond the atomic add to its
// direction's total. Finding one flow by id walks the list too: that is
// paid by an operator's request, now and then, where an index would cost
// every flow a map entry and every open and close an update.

// State is what a flow is doing, as far as the relay knows.
type State uint8

const (
	StateOpen       State = iota // a direction is running
	StateIdle                    // both directions are parked
	StateHalfClosed              // one direction has ended with a FIN
	StateClosing                 // reset, or given up: ending
)

func (s State) String() string {
	switch s {
	case StateIdle:
		return "idle"
	case StateHalfClosed:
		return "half-closed"
	case StateClosing:
		return "closing"
	}
	return "open"
}

// FlowInfo is one live flow as Flows sees it.
type FlowInfo struct {
	Tag
	// Client is who opened the flow and Dst what it connected to: for an
	// outbound flow the address behind the TUN and the one it dialed, for
	// a published flow the outside client and the port behind the TUN.
	Client, Dst netip.AddrPort
	// Upstream is the far socket's peer: the destination or the proxy for
	// an outbound flow, the outside client for a published one.
	Upstream net.Addr
	Age      time.Duration
	// Up and Down are the bytes relayed from the client and to it so far.
	Up, Down int64
	State    State
}

// Flows appends every live flow to dst and returns it. Under the lock that
// opening and ending flows take it only collects pointers; the flows are
// read after, which their atomics and fixed fields allow.
func (r *Relayer) Flows(dst []FlowInfo) []FlowInfo {
	// Only the pointers are collected under the lock; an operator asks
	// this, rarely, so growing the slice there costs little.
	var flows []*relayFlow
	r.mu.Lock()
	for fl := r.live; fl != nil; fl = fl.next {
		flows = append(flows, fl)
	}
	r.mu.Unlock()
	now := time.Since(r.epoch)
	dst = slices.Grow(dst, len(flows))
	for _, fl := range flows {
		dst = append(dst, fl.info(now))
	}
	return dst
}

// info reads a flow's description; its fields but the atomics never change
// once it is tracked.
func (fl *relayFlow) info(now time.Duration) FlowInfo {
	in := FlowInfo{
		Tag:      fl.tag,
		Client:   fl.client.remote,
		Dst:      fl.client.local,
		Upstream: fl.upstream.RemoteAddr(),
		Age:      now - fl.opened,
		Up:       fl.upPipe.total.Load(),
		Down:     fl.downPipe.total.Load(),
	}
	if fl.tag.Inbound {
		// The Conn is the connection into the TUN, from the gateway to
		// the published port: the client is the outside one.
		in.Dst = fl.client.remote
		if a, ok := fl.upstream.RemoteAddr().(*net.TCPAddr); ok {
			in.Client = a.AddrPort()
		}
		in.Up, in.Down = in.Down, in.Up
	}
	switch {
	case fl.reset.Load():
		in.State = StateClosing
	case fl.halfDone.Load():
		in.State = StateHalfClosed
	case fl.upPipe.parked.Load() && fl.downPipe.parked.Load():
		in.State = StateIdle
	}
	return in
}

// Abort resets both sides of the live flow with id, as AbortAll does every
// flow, and reports whether there was one.
func (r *Relayer) Abort(id uint64) bool {
	r.mu.Lock()
	var found *relayFlow
	for fl := r.live; fl != nil; fl = fl.next {
		if fl.tag.ID == id {
			found = fl
			break
		}
	}
	r.mu.Unlock()
	if found == nil {
		return false
	}
	// Outside the lock: the abort may end the flow, which untracks itself.
	found.abort()
	return true
}
