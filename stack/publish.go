package stack

import (
	"context"
	"fmt"
	"net"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/stack/internal/gverr"
	"github.com/netstackd/netstackd/stack/internal/packet"
	"github.com/netstackd/netstackd/stack/internal/tcprelay"
)

// Published ports (inbound connections from netstackd's side to a server
// behind the TUN) are connected from a gateway address that the stack owns:
// the server sees them coming from Config.Gateway4 or Gateway6, as a server
// behind slirp4netns sees its host.

// addGateways assigns the gateway addresses to the NIC, so that the stack may
// originate connections from them.
func (st *Stack) addGateways() error {
	for _, gw := range []netip.Addr{st.cfg.Gateway4, st.cfg.Gateway6} {
		if !gw.IsValid() {
			continue
		}
		proto := ipv4.ProtocolNumber
		if gw.Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: packet.TCPIPAddr(gw).WithPrefix()}
		if err := st.s.AddProtocolAddress(nicID, pa, gstack.AddressProperties{}); err != nil {
			return fmt.Errorf("add gateway address %s: %w", gw, gverr.Error("add address", err))
		}
	}
	return nil
}

// ServeInbound relays c, a connection accepted on netstackd's side, to dst
// behind the TUN, and owns c from then on: it is closed when the flow ends.
// It returns at once; the flow ends with Close at the latest. A published
// flow takes one of the MaxFlows slots like any other: beyond them c is
// reset at once.
func (st *Stack) ServeInbound(c net.Conn, dst netip.AddrPort) {
	if !st.beginFlow() {
		c.Close()
		return
	}
	if !st.takeFlowSlot() {
		st.warnFlowLimit.Warn(st.log, "flow limit reached, resetting new flows", "max_flows", st.cfg.MaxFlows, "src", c.RemoteAddr().String(), "dst", dst, "via", "publish")
		tcprelay.ResetConn(c)
		st.flows.Done()
		return
	}
	go func() {
		defer st.flows.Done()
		defer func() { <-st.flowSlots }()
		id := st.nextFlowID()
		log := st.log.With("flow", id, "proto", "tcp", "src", c.RemoteAddr().String(), "dst", dst, "via", "publish")
		ctx, cancel := context.WithTimeout(st.ctx, st.timeouts.Load().Dial)
		inside, err := st.dialInside(ctx, dst)
		cancel()
		if err != nil {
			log.Debug("published port: dial inside failed", "err", err)
			tcprelay.ResetConn(c)
			return
		}
		res := st.relay.RelayWait(inside, c, tcprelay.Tag{ID: id, Inbound: true})
		log.Debug("flow closed", "up", res.Down, "down", res.Up, "reset", res.Reset)
	}()
}

// dialInside opens a TCP connection from the gateway address to dst.
func (st *Stack) dialInside(ctx context.Context, dst netip.AddrPort) (*tcprelay.Conn, error) {
	gw, proto := st.cfg.Gateway4, ipv4.ProtocolNumber
	if dst.Addr().Is6() {
		gw, proto = st.cfg.Gateway6, ipv6.ProtocolNumber
	}
	if !gw.IsValid() {
		return nil, fmt.Errorf("no gateway address for %s", dst)
	}
	var wq waiter.Queue
	ep, terr := st.s.NewEndpoint(tcp.ProtocolNumber, proto, &wq)
	if terr != nil {
		return nil, gverr.Error("socket", terr)
	}
	if terr := ep.Bind(tcpip.FullAddress{NIC: nicID, Addr: packet.TCPIPAddr(gw)}); terr != nil {
		ep.Close()
		return nil, gverr.Error("bind", terr)
	}
	entry, done := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	defer wq.EventUnregister(&entry)
	terr = ep.Connect(tcpip.FullAddress{NIC: nicID, Addr: packet.TCPIPAddr(dst.Addr()), Port: dst.Port()})
	if _, ok := terr.(*tcpip.ErrConnectStarted); ok {
		select {
		case <-done:
			terr = ep.LastError()
		case <-ctx.Done():
			ep.Abort()
			return nil, fmt.Errorf("connect %s: %w", dst, ctx.Err())
		}
	}
	if terr != nil {
		ep.Close()
		return nil, fmt.Errorf("connect %s: %w", dst, gverr.Error("connect", terr))
	}
	local, err := ep.GetLocalAddress()
	if err != nil {
		ep.Close()
		return nil, gverr.Error("getsockname", err)
	}
	ep.SocketOptions().SetKeepAlive(true)
	return tcprelay.NewConn(ep, &wq, netip.AddrPortFrom(packet.AddrFrom(local.Addr), local.Port), dst), nil
}

// ServeInboundUDP publishes a UDP port: it relays the datagrams that pc, a
// socket on netstackd's side, receives to dst behind the TUN, and the
// replies back to each sender, until pc is closed or the stack is. It
// blocks until then and returns nil; an error means that pc failed or that
// the stack has no gateway address of dst's family. pc stays the caller's
// to close. UDPTimeout ends an idle association and MaxUDPFlows bounds them
// (the least recently active is evicted).
func (st *Stack) ServeInboundUDP(pc net.PacketConn, dst netip.AddrPort) error {
	if !st.beginFlow() {
		return fmt.Errorf("publish udp %s to %s: %w", pc.LocalAddr(), dst, net.ErrClosed)
	}
	defer st.flows.Done()
	return st.inUDP.Serve(pc, dst)
}

// inboundUDPFlows is the number of open inbound UDP associations.
func (st *Stack) inboundUDPFlows() int { return st.inUDP.Len() }
