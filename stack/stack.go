// Package stack owns the userspace TCP/IP stack: a gVisor netstack whose only
// NIC is fed by a packet Device, accepting every destination. It turns the
// connections that enter the device into flows and relays each one to a
// Dialer, carrying the byte stream, half-close and resets faithfully.
//
// gVisor types stay inside this package: a flow leaves it as netip.AddrPort
// values and a net.Conn, and its errors are Go errors that errors.Is can
// test against syscall errnos.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	gstack "gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Dialer reaches the far end of a flow. address is "host:port". Both
// *net.Dialer and every proxy dialer fit.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Config configures a Stack. The zero value of every field but Device and
// Dialer is a usable default.
type Config struct {
	// Device carries the packets. The Stack owns it from New on and closes it
	// in Close.
	Device Device
	// Dialer reaches the destination of each TCP flow.
	Dialer Dialer
	// Logger receives the stack's logs; nil discards them.
	Logger *slog.Logger
	// MaxInFlight caps TCP handshakes not yet completed: further SYNs are
	// dropped (the client retransmits), bounding the work a SYN flood
	// causes. By default a handshake completes once its upstream is
	// reached; with AcceptFirst it does not wait for the dial, and dials
	// still in progress are bounded by MaxFlows instead. 0 means 1024.
	MaxInFlight int
	// MaxFlows caps established TCP flows; new ones beyond it are reset.
	// 0 means 65536.
	MaxFlows int
	// DialTimeout bounds reaching the upstream of a flow. 0 means 10s.
	DialTimeout time.Duration
	// AcceptFirst completes a client's TCP handshake while its upstream is
	// being dialed, not after: connect returns one upstream handshake
	// sooner (with a proxy, one proxy negotiation sooner), but an upstream
	// that cannot be reached resets a connection the client already holds
	// open, where by default the client's connect is refused.
	AcceptFirst bool
	// UDP opens the upstream side of UDP associations; nil makes the stack
	// refuse UDP with ICMP port unreachable.
	UDP UDPDialer
	// UDPTimeout ends a UDP association idle this long. 0 means 60s.
	UDPTimeout time.Duration
	// MaxUDPFlows caps UDP associations; beyond it the least recently active
	// one is evicted. 0 means 16384.
	MaxUDPFlows int
	// DNS, when set, answers every UDP and TCP flow to port 53, whatever
	// its destination, so no query from a client leaves unless DNS sends it.
	DNS DNS
	// Names, when set, turns flows to fake addresses into flows to names.
	// A flow to a fake address with no name is refused.
	Names FakeNames
	// Gateway4 and Gateway6 are addresses the stack owns on the TUN's link,
	// from which connections to published ports (ServeInbound) come. Zero
	// disables inbound connections of that family.
	Gateway4, Gateway6 netip.Addr
	// ForwardPing sends echo requests on with the host's unprivileged ping
	// sockets, so round-trip times are real. When false, or where the host
	// does not allow ping sockets, the stack answers every echo request.
	ForwardPing bool
	// PingControl, if not nil, is called with each ping socket before it is
	// bound, as net.Dialer.Control is: netstackd sets SO_MARK with it in
	// host-wide mode. Its error fails that echo request.
	PingControl func(network, address string, c syscall.RawConn) error
	// HalfCloseIdle is how long the remaining direction of a half-closed
	// flow may stay silent before the flow is reset. 0 means 2 minutes.
	HalfCloseIdle time.Duration
	// TCP tunes gVisor's TCP (buffers, SACK, congestion control); its zero
	// value is netstackd's measured defaults (tcp_options.go).
	TCP TCPOptions

	// parkAfter is how long an upstream socket stays quiet before its
	// flow parks it (relay_park.go); tests shorten it. 0 means 2s.
	parkAfter time.Duration
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 1024
	}
	if c.MaxFlows <= 0 {
		c.MaxFlows = 65536
	}
	if c.DialTimeout <= 0 {
		c.DialTimeout = 10 * time.Second
	}
	if c.UDPTimeout <= 0 {
		c.UDPTimeout = 60 * time.Second
	}
	if c.MaxUDPFlows <= 0 {
		c.MaxUDPFlows = 16384
	}
	if c.HalfCloseIdle <= 0 {
		c.HalfCloseIdle = 2 * time.Minute
	}
	if c.parkAfter <= 0 {
		c.parkAfter = 2 * time.Second
	}
}

const nicID = 1

// timeWait is how long a flow closed by our side first keeps its 4-tuple.
const timeWait = time.Second

// Stack is a running userspace stack. Close stops it.
type Stack struct {
	cfg  Config
	log  *slog.Logger
	link *linkEndpoint
	s    *gstack.Stack
	udp  *udpTable  // nil when UDP is refused
	ping *pingTable // nil when the stack answers echo requests itself

	// inUDP holds the associations of published UDP ports (inbound_udp.go).
	inUDP *inboundUDP
	// relay carries the TCP flows' bytes (relay.go).
	relay *relayer

	ctx    context.Context // ends when Close starts
	cancel context.CancelFunc

	mu     sync.Mutex
	closed bool
	flows  sync.WaitGroup // one per forwarder handler we accepted

	flowSlots chan struct{}
	flowSeq   atomic.Uint64
	closeOnce sync.Once
}

// New builds the stack and starts serving the device: once New returns,
// packets read from the device are answered, so the caller may bring the
// link up.
func New(cfg Config) (*Stack, error) {
	if cfg.Device == nil || cfg.Dialer == nil {
		return nil, errors.New("stack: Device and Dialer are required")
	}
	cfg.setDefaults()
	st := &Stack{cfg: cfg, log: cfg.Logger, flowSlots: make(chan struct{}, cfg.MaxFlows)}
	st.ctx, st.cancel = context.WithCancel(context.Background())
	st.relay = &relayer{halfCloseIdle: cfg.HalfCloseIdle, parkAfter: cfg.parkAfter}

	st.s = gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
	})
	if err := st.configure(); err != nil {
		st.s.Close()
		st.s.Wait()
		return nil, err
	}
	st.link = newLinkEndpoint(cfg.Device, st.log)
	if err := st.s.CreateNIC(nicID, st.link); err != nil {
		st.s.Close()
		st.s.Wait()
		return nil, fmt.Errorf("create nic: %w", goError("create nic", err))
	}
	// Accept packets for every destination and answer from it: the stack
	// stands in for the whole network behind the TUN.
	if err := st.s.SetPromiscuousMode(nicID, true); err != nil {
		st.closeStack()
		return nil, fmt.Errorf("set promiscuous: %w", goError("promiscuous", err))
	}
	if err := st.s.SetSpoofing(nicID, true); err != nil {
		st.closeStack()
		return nil, fmt.Errorf("set spoofing: %w", goError("spoofing", err))
	}
	if err := st.addGateways(); err != nil {
		st.closeStack()
		return nil, err
	}
	st.inUDP = newInboundUDP(st)
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	fwd := tcp.NewForwarder(st.s, cfg.TCP.forwarderReceiveWindow(), cfg.MaxInFlight, st.handleTCP)
	st.s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	if cfg.UDP != nil || cfg.DNS != nil {
		st.udp = newUDPTable(st, cfg.UDP, cfg.UDPTimeout, cfg.MaxUDPFlows)
		st.s.SetTransportProtocolHandler(udp.ProtocolNumber, st.udp.handlePacket)
	}
	if cfg.ForwardPing {
		st.ping = newPingTable(st)
	}
	poller, perr := newUpstreamPoller(st.log)
	if perr != nil {
		// Flows then keep a goroutine in each upstream read: slower to
		// scale, not wrong.
		st.log.Warn("idle flows will not park their upstream sockets", "err", perr)
	} else {
		st.relay.poller = poller
	}
	st.link.intercept = st.intercept
	st.link.endBatch = st.endBatch
	st.link.start()
	return st, nil
}

// Close resets every flow, stops the stack and closes the device. It is safe
// to call more than once.
func (st *Stack) Close() error {
	var err error
	st.closeOnce.Do(func() {
		st.mu.Lock()
		st.closed = true
		st.mu.Unlock()
		st.cancel()
		st.relay.abortAll()
		st.flows.Wait()
		st.relay.goroutines.Wait()
		if st.relay.poller != nil {
			st.relay.poller.close()
		}
		if st.udp != nil {
			st.udp.close()
		}
		if st.ping != nil {
			st.ping.close()
		}
		// The resets of the flows just ended are queued: they reach
		// the clients before the device goes.
		st.link.flushOutbound(time.Second)
		err = st.cfg.Device.Close()
		st.link.stopOutbound()
		// Our reader and writer stop here, not inside gVisor's Stack.Wait:
		// that waits for the link holding the stack's lock, and a reader
		// still delivering a packet may need that lock (a reset to an
		// unknown flow finds its route under it).
		st.link.Wait()
		st.closeStack()
	})
	return err
}

func (st *Stack) closeStack() {
	st.s.Close()
	st.s.Wait()
}

// beginFlow registers a forwarder handler with the stack's WaitGroup unless
// the stack is closing. The lock makes Add and Close's Wait never race.
func (st *Stack) beginFlow() bool {
	st.mu.Lock()
	defer st.mu.Unlock()
	if st.closed {
		return false
	}
	st.flows.Add(1)
	return true
}

// handleTCP runs on a goroutine of gVisor's forwarder, one per new SYN.
// It dials the upstream first and only then completes the client's
// handshake, so a refused or unreachable upstream reaches the client as a
// reset in reply to its SYN; with Config.AcceptFirst it does both at once.
// Once the flow is relayed it returns while the flow goes on: what the flow
// holds (its count in st.flows, its slot, a fake address's name) is let go
// when it ends.
func (st *Stack) handleTCP(req *tcp.ForwarderRequest) {
	if !st.beginFlow() {
		req.Complete(false)
		return
	}
	handedOff := false
	defer func() {
		if !handedOff {
			st.flows.Done()
		}
	}()

	id := req.ID()
	client := netip.AddrPortFrom(addrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(addrFrom(id.LocalAddress), id.LocalPort)
	log := flowLogger{base: st.log, seq: st.flowSeq.Add(1), src: client, dst: dst}

	select {
	case st.flowSlots <- struct{}{}:
		defer func() {
			if !handedOff {
				<-st.flowSlots
			}
		}()
	default:
		log.log(slog.LevelWarn, "flow limit reached, resetting", "max_flows", st.cfg.MaxFlows)
		req.Complete(true)
		return
	}

	if st.cfg.DNS != nil && dst.Port() == 53 {
		st.serveDNSStream(req, client, dst, log)
		return
	}
	address, release, err := st.upstreamAddress(dst)
	if err != nil {
		log.log(slog.LevelInfo, "refusing flow", "err", err)
		req.Complete(true)
		return
	}
	defer func() {
		if !handedOff {
			release()
		}
	}()
	var wq waiter.Queue
	open := st.dialThenAccept
	if st.cfg.AcceptFirst {
		open = st.acceptWhileDialing
	}
	upstream, ep, err := open(req, &wq, address)
	if err != nil {
		log.log(slog.LevelDebug, "flow not opened", "address", address, "err", err)
		return
	}
	ep.SocketOptions().SetKeepAlive(true)
	conn := newTCPConn(ep, &wq, dst, client)

	log.log(slog.LevelDebug, "flow open", "upstream", upstream.RemoteAddr())
	handedOff = true
	st.relay.relay(conn, upstream, func(res relayResult) {
		if l := log.logger(slog.LevelDebug); l != nil {
			l.LogAttrs(context.Background(), slog.LevelDebug, "flow closed", res.logAttrs()...)
		}
		release()
		<-st.flowSlots
		st.flows.Done()
	})
}

// dialThenAccept reaches the upstream and only then completes the client's
// handshake, so that a refused or unreachable upstream reaches the client
// as a reset in reply to its SYN, as if the far end had refused it. It
// calls req.Complete.
func (st *Stack) dialThenAccept(req *tcp.ForwarderRequest, wq *waiter.Queue, address string) (net.Conn, tcpip.Endpoint, error) {
	upstream, err := st.dialUpstream(address)
	if err != nil {
		req.Complete(true)
		return nil, nil, err
	}
	ep, terr := req.CreateEndpoint(wq)
	if terr != nil {
		// The client reset or gave up during the handshake: the upstream,
		// which has already accepted, sees a reset as well.
		req.Complete(true)
		resetConn(upstream)
		return nil, nil, fmt.Errorf("client handshake: %w", goError("accept", terr))
	}
	req.Complete(false)
	return upstream, ep, nil
}

// acceptWhileDialing completes the client's handshake while the upstream is
// being dialed (Config.AcceptFirst). The client's connect returns without
// waiting for the upstream, and what it sends meanwhile waits in the
// endpoint's receive buffer; an upstream that cannot be reached resets the
// established connection instead of refusing the SYN. It calls
// req.Complete.
func (st *Stack) acceptWhileDialing(req *tcp.ForwarderRequest, wq *waiter.Queue, address string) (net.Conn, tcpip.Endpoint, error) {
	type dialResult struct {
		conn net.Conn
		err  error
	}
	// Every return below first receives from dialed, so this goroutine is
	// always waited for. It starts before the handshake: on one P the
	// runtime runs the goroutine readied last first, which is then the
	// writer carrying the SYN-ACK, and the dial runs while the client
	// answers.
	dialed := make(chan dialResult, 1)
	go func() {
		c, err := st.dialUpstream(address)
		dialed <- dialResult{c, err}
	}()
	ep, terr := req.CreateEndpoint(wq)
	if terr != nil {
		req.Complete(true)
		if d := <-dialed; d.err == nil {
			resetConn(d.conn)
		}
		return nil, nil, fmt.Errorf("client handshake: %w", goError("accept", terr))
	}
	req.Complete(false)
	d := <-dialed
	if d.err != nil {
		ep.Abort()
		return nil, nil, d.err
	}
	return d.conn, ep, nil
}

func (st *Stack) dialUpstream(address string) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(st.ctx, st.cfg.DialTimeout)
	defer cancel()
	c, err := st.cfg.Dialer.DialContext(ctx, "tcp", address)
	if err != nil {
		return nil, fmt.Errorf("dial upstream %s: %w", address, err)
	}
	return c, nil
}

// flowLogger logs a TCP flow's lines with its attributes. It builds the
// logger only for a line that is logged: a logger With attributes costs a
// few hundred bytes, which every idle flow would hold for nothing.
type flowLogger struct {
	base     *slog.Logger
	seq      uint64
	src, dst netip.AddrPort
}

// logger is the flow's logger if level is enabled, else nil.
func (l flowLogger) logger(level slog.Level) *slog.Logger {
	if !l.base.Enabled(context.Background(), level) {
		return nil
	}
	return l.base.With("flow", l.seq, "proto", "tcp", "src", l.src, "dst", l.dst)
}

func (l flowLogger) log(level slog.Level, msg string, args ...any) {
	if lg := l.logger(level); lg != nil {
		lg.Log(context.Background(), level, msg, args...)
	}
}

// serveDNSStream answers DNS over TCP on the stack itself: there is nothing
// to dial first.
func (st *Stack) serveDNSStream(req *tcp.ForwarderRequest, client, dst netip.AddrPort, log flowLogger) {
	var wq waiter.Queue
	ep, terr := req.CreateEndpoint(&wq)
	if terr != nil {
		req.Complete(true)
		return
	}
	req.Complete(false)
	conn := newTCPConn(ep, &wq, dst, client)
	defer conn.Close()
	stop := context.AfterFunc(st.ctx, conn.Abort)
	defer stop()
	if err := st.cfg.DNS.ServeStream(st.ctx, conn); err != nil {
		log.log(slog.LevelDebug, "dns over tcp ended", "err", err)
	}
}

func addrFrom(a tcpip.Address) netip.Addr {
	if a.Len() == 4 {
		return netip.AddrFrom4(a.As4())
	}
	return netip.AddrFrom16(a.As16())
}

// intercept sees every inbound packet before gVisor does: echo requests
// forwarded for real and plain UDP datagrams take a shorter path.
func (st *Stack) intercept(pkt []byte, verified bool) bool {
	// One look at the protocol keeps TCP, the bulk of the traffic, off
	// both shorter paths.
	switch transportProtocol(pkt) {
	case header.UDPProtocolNumber:
		// Datagrams to a gateway address belong to published ports
		// (inbound_udp.go), never to the outbound NAT.
		if st.inUDP.handleRaw(pkt, verified) {
			return true
		}
		return st.udp != nil && st.udp.handleRaw(pkt, verified)
	case header.ICMPv4ProtocolNumber, header.ICMPv6ProtocolNumber:
		if st.inUDP.handleICMPError(pkt) {
			return true
		}
		src, dst, msg, ok := parseEcho(pkt)
		if !ok {
			return false
		}
		if st.ping != nil && st.ping.handle(src, dst, msg) {
			return true
		}
		return st.answerEcho(src, dst, msg)
	}
	return false
}

// endBatch runs after the packets of one device read were delivered: what
// they queued for upstream sockets leaves now, in as few calls as it can.
func (st *Stack) endBatch() {
	if st.udp != nil {
		st.udp.flush()
	}
}

// transportProtocol is the protocol an IPv4 packet, or an IPv6 packet
// without extension headers, carries; 0 when there is none to read.
func transportProtocol(pkt []byte) tcpip.TransportProtocolNumber {
	switch {
	case len(pkt) >= header.IPv4MinimumSize && header.IPVersion(pkt) == header.IPv4Version:
		return header.IPv4(pkt).TransportProtocol()
	case len(pkt) >= header.IPv6MinimumSize && header.IPVersion(pkt) == header.IPv6Version:
		return header.IPv6(pkt).TransportProtocol()
	}
	return 0
}

// udpFlows is the number of open UDP associations.
func (st *Stack) udpFlows() int {
	if st.udp == nil {
		return 0
	}
	return st.udp.len()
}
