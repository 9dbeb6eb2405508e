package stack

import (
	"net/netip"
	"slices"
	"time"

	"github.com/netstackd/netstackd/stack/internal/tcprelay"
	"github.com/netstackd/netstackd/stack/internal/udpnat"
)

// FlowInfo describes one live flow for an operator: a TCP flow being
// relayed or a UDP association, outbound or to a published port.
type FlowInfo struct {
	// ID is the flow's number, as in the stack's logs; CloseFlow takes it.
	ID uint64
	// Proto is "tcp" or "udp".
	Proto string
	// Inbound marks a flow to a published port (ServeInbound).
	Inbound bool
	// Client is who opened the flow: an address behind the TUN, or for an
	// inbound flow the outside client.
	Client netip.AddrPort
	// Destination is the address the client connected to (for UDP, where
	// its first datagram went), and Name the name it stands for when it
	// is a fake address (Config.Names).
	Destination netip.AddrPort
	Name        string
	// Upstream is the far socket's peer: the destination itself, or the
	// proxy the flow goes through. Empty for UDP and inbound flows.
	Upstream string
	// Up and Down are the bytes relayed from the client and to it so far
	// (for UDP, datagram payloads).
	Up, Down uint64
	// Age is how long the flow has been open.
	Age time.Duration
	// Via names the upstream the flow went through (Decision.Via, or a
	// failover group's member), Rule the rule that routed it; empty
	// when it took the default upstream unnamed.
	Via, Rule string
	// NameFrom says where Name came from: NameFromFakeIP, NameFromDNS or
	// NameFromSniffed; empty with no name.
	NameFrom string
	// State is "open", "idle" (nothing moving; TCP: both directions
	// parked), "half-closed" (TCP: one side sent FIN), "closing" (TCP:
	// reset or given up), "opening" or "failed" (UDP: its upstream socket
	// is being opened, or could not be).
	State string
}

// Flows returns the live flows sorted by ID, at most max of them (the
// oldest ids first); max <= 0 means no bound. It costs nothing while
// nobody asks: the flows are read where the relays already keep them.
func (st *Stack) Flows(max int) []FlowInfo {
	tcp := st.relay.Flows(nil)
	var udp []udpnat.FlowInfo
	if st.udp != nil {
		udp = st.udp.Flows(nil)
	}
	inUDP := st.inUDP.Flows(nil)
	out := make([]FlowInfo, 0, len(tcp)+len(udp)+len(inUDP))
	for _, f := range tcp {
		out = append(out, st.tcpFlowInfo(f))
	}
	for _, f := range udp {
		in := FlowInfo{
			ID: f.ID, Proto: "udp", Client: f.Client, Destination: f.Dst, Name: f.Name, NameFrom: f.NameFrom,
			Via: f.Via, Rule: f.Rule, Up: f.Up, Down: f.Down, Age: f.Age, State: f.State,
		}
		if in.Name == "" {
			in.Name = st.fakeName(f.Dst.Addr())
			in.NameFrom = nameFrom(in.Name, NameFromFakeIP)
		}
		out = append(out, in)
	}
	for _, f := range inUDP {
		out = append(out, FlowInfo{
			ID: f.ID, Proto: "udp", Inbound: true, Client: f.Client, Destination: f.Dst,
			Up: f.Up, Down: f.Down, Age: f.Age, State: f.State,
		})
	}
	slices.SortFunc(out, func(a, b FlowInfo) int {
		switch {
		case a.ID < b.ID:
			return -1
		case a.ID > b.ID:
			return 1
		}
		return 0
	})
	if max > 0 && len(out) > max {
		out = slices.Clip(out[:max])
	}
	return out
}

func (st *Stack) tcpFlowInfo(f tcprelay.FlowInfo) FlowInfo {
	in := FlowInfo{
		ID: f.ID, Proto: "tcp", Inbound: f.Inbound, Client: f.Client, Destination: f.Dst,
		Up: uint64(max(f.Up, 0)), Down: uint64(max(f.Down, 0)), Age: f.Age, State: f.State.String(),
	}
	if !f.Inbound {
		// A flow to a fake address holds its name (Names.Hold) while it
		// lives: looking it up costs the flow nothing until asked.
		if rt := f.Route; rt != nil {
			in.Via, in.Rule, in.Name, in.NameFrom = rt.Via, rt.Rule, rt.Name, rt.NameFrom
		}
		if in.Name == "" {
			in.Name = st.fakeName(f.Dst.Addr())
			in.NameFrom = nameFrom(in.Name, NameFromFakeIP)
		}
		if f.Upstream != nil {
			in.Upstream = f.Upstream.String()
		}
	}
	return in
}

// fakeName is the name a fake address stands for, or "".
func (st *Stack) fakeName(addr netip.Addr) string {
	if st.cfg.Names == nil || !st.cfg.Names.IsFake(addr) {
		return ""
	}
	name, _ := st.cfg.Names.Resolve(addr)
	return name
}

// CloseFlow ends the live flow with id and reports whether there was one. A
// TCP flow is reset both ways: the client sees a RST from the stack, the
// upstream one from our socket (SO_LINGER 0). A UDP association ends, its
// upstream socket closed (for a published port, its gateway port freed);
// the client's next datagram opens a new one.
func (st *Stack) CloseFlow(id uint64) bool {
	if st.relay.Abort(id) {
		return true
	}
	if st.udp != nil && st.udp.Abort(id) {
		return true
	}
	return st.inUDP.Abort(id)
}

// nameFrom is from when name is set, else "".
func nameFrom(name, from string) string {
	if name == "" {
		return ""
	}
	return from
}
