// Package stack owns the userspace TCP/IP stack: a gVisor netstack whose only
// NIC is fed by a packet Device, accepting every destination. It turns the
// connections that enter the device into flows and relays each one to a
// Dialer, carrying the byte stream, half-close and resets faithfully.
//
// The data path, in the order a packet meets it:
//
//   - internal/link: the gVisor NIC on the Device; one dispatcher per
//     device queue, an outbound writer.
//   - this package: what the dispatchers do not give gVisor (handlePacket,
//     udp.go), the TCP forwarder (tcp.go), published ports (publish.go).
//   - internal/tcprelay: the bytes of TCP flows, half-close and resets,
//     idle flows parked without a goroutine.
//   - internal/udpnat: the UDP NAT table, batched socket I/O, ICMP errors.
//   - internal/inbound: published UDP ports.
//   - internal/icmp: echo requests.
//   - internal/packet and internal/gverr: packets built and parsed by hand,
//     and gVisor's errors as Go errors.
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
	gicmp "gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack/internal/gverr"
	"github.com/netstackd/netstackd/stack/internal/icmp"
	"github.com/netstackd/netstackd/stack/internal/inbound"
	"github.com/netstackd/netstackd/stack/internal/link"
	"github.com/netstackd/netstackd/stack/internal/tcprelay"
	"github.com/netstackd/netstackd/stack/internal/udpnat"
)

// Device is the packet device the stack is fed by: *tundev.Device fits it.
type Device = device.Device

// Dialer reaches the far end of a flow. address is "host:port". Both
// *net.Dialer and every proxy dialer fit. The conn must be a socket
// (syscall.Conn): the relay parks its descriptor while the flow is idle.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Config configures a Stack. The zero value of every field but Device and
// Dialer is a usable default.
type Config struct {
	// Device carries the packets. The Stack owns it from New on and closes it
	// in Close, and stops serving (Done) when the device goes down.
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
	// MaxInFlightPerSource caps the TCP handshakes in progress from one
	// source, an IPv4 address or an IPv6 /64: its further SYNs are dropped,
	// so one host cannot take every MaxInFlight slot. 0 means MaxInFlight/4.
	MaxInFlightPerSource int
	// HandshakeTimeout bounds how long a client may take to answer our
	// SYN-ACK (SYN-RCVD); past it the handshake is dropped and, dial-first,
	// its upstream reset (handshake.go says why). 0 means 2.5s.
	HandshakeTimeout time.Duration
	// MaxFlows caps TCP flows, outbound and published (ServeInbound) alike;
	// new ones beyond it are reset.
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
	// MaxUDPFlows caps UDP associations, each an upstream socket; beyond
	// it the least recently active one is evicted if it has been silent
	// for 10s (udpEvictIdle), else the new source's datagrams are
	// dropped until one is. 0 means 16384.
	MaxUDPFlows int
	// MaxPingFlows caps the ping sockets of ForwardPing, one per client,
	// destination and identifier; beyond it new ones are dropped. 0 means
	// 1024.
	MaxPingFlows int
	// DNS, when set, answers every UDP and TCP flow to port 53, whatever
	// its destination, so no query from a client leaves unless DNS sends it.
	DNS DNS
	// Names, when set, turns flows to fake addresses into flows to names.
	// A flow to a fake address with no name is refused.
	Names FakeNames
	// Refuse, if not nil, reports destinations the stack must not relay
	// anywhere (netstackd gives its own addresses, and in direct mode
	// loopback: a dial there would loop into the TUN, or reach what is not
	// the client's). A TCP flow to one is reset, a datagram answered with
	// ICMP port unreachable, an echo request answered by the stack itself.
	// It is asked about the address the client sent to, after DNS
	// interception; TCP and UDP to a fake address go by Names instead, so
	// Refuse may list the fake ranges whole.
	Refuse func(netip.Addr) bool
	// AddrNames, if set, names a real destination address by the DNS
	// answer that gave it (*dns.Server's NameOf): a flow to it is routed
	// by that name (NameFromDNS) without sniffing, and shows it.
	AddrNames func(netip.Addr) (string, bool)
	// Route, if set, decides each new outbound flow: which upstream it
	// takes, or whether it is rejected or dropped (route.go). Without it
	// every flow goes to Dialer and UDP.
	Route func(Flow) Decision
	// SniffTimeout bounds the wait for a client's first bytes when a
	// Decision asks for its name (Sniff): a protocol where the server
	// speaks first (SSH, SMTP) is routed without a name once it passes.
	// 0 means 300ms.
	SniffTimeout time.Duration
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

	// udpEvictIdle overrides udpEvictIdle for tests; negative evicts
	// the least recently active association whatever its age.
	udpEvictIdle time.Duration
	// parkAfter is how long an upstream socket stays quiet before its
	// flow parks it (internal/tcprelay); tests shorten it. 0 means 2s.
	parkAfter time.Duration
}

func (c *Config) setDefaults() {
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.MaxInFlight <= 0 {
		c.MaxInFlight = 1024
	}
	if c.MaxInFlightPerSource <= 0 {
		c.MaxInFlightPerSource = max(c.MaxInFlight/4, 1)
	}
	if c.HandshakeTimeout <= 0 {
		c.HandshakeTimeout = defaultHandshakeTimeout
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
	if c.MaxPingFlows <= 0 {
		c.MaxPingFlows = 1024
	}
	if c.udpEvictIdle == 0 {
		c.udpEvictIdle = udpEvictIdle
	}
	if c.HalfCloseIdle <= 0 {
		c.HalfCloseIdle = 2 * time.Minute
	}
	if c.SniffTimeout <= 0 {
		c.SniffTimeout = defaultSniffTimeout
	}
	if c.parkAfter <= 0 {
		c.parkAfter = 2 * time.Second
	}
}

const nicID = 1

// udpEvictIdle is how long the least recently active UDP association must
// have been silent for a new source to take its place in a full table
// (udpnat.Config.EvictIdle): long enough that request/response exchanges
// and media streams keep their mapping under a flood of new sources, short
// enough that a one-off sweep of source ports stops blocking new ones soon.
const udpEvictIdle = 10 * time.Second

// timeWait is how long a flow closed by our side first keeps its 4-tuple.
const timeWait = time.Second

// Stack is a running userspace stack. Close stops it; Done tells when it can
// no longer serve.
type Stack struct {
	cfg   Config
	log   *slog.Logger
	link  *link.Endpoint
	s     *gstack.Stack
	relay *tcprelay.Relayer
	udp   *udpnat.Table // nil when UDP is refused
	inUDP *inbound.UDP  // published UDP ports
	ping  *icmp.Pinger

	ctx    context.Context // ends when Close starts
	cancel context.CancelFunc
	// handshakes ends shortly after ctx (closeHandshakeGrace): it gives up
	// the client handshakes still in progress.
	handshakes       context.Context
	cancelHandshakes context.CancelFunc

	mu     sync.Mutex
	closed bool
	flows  sync.WaitGroup // one per forwarder handler we accepted, and per published flow
	// helpers are the stack's own goroutines: DNS answers, the device
	// event watcher.
	helpers sync.WaitGroup

	flowSlots chan struct{}
	flowSeq   atomic.Uint64
	dnsSlots  chan struct{} // DNS queries over UDP being answered
	// droppedDNS counts queries dropped: too many at once, or an answer
	// too large for an IP packet.
	droppedDNS atomic.Uint64
	closeOnce  sync.Once

	// Lines a client can trigger at will (issue 19), one per period
	// each: flows beyond MaxFlows, descriptors exhausted, flows refused.
	warnFlowLimit, warnFDs, logRefused ratelog.Limiter
	// logDialFailed says why upstreams cannot be reached, one line per
	// period for each reason (failures.go).
	logDialFailed [NumDialReasons]ratelog.Limiter

	tcpOpened, tcpRefused, tcpLimited atomic.Uint64
	// routes are the live view's shared routes; rejected and dropped
	// count flows Config.Route refused, sniffed those whose name was
	// found in their first bytes (route.go, sniff.go).
	routes routes
	// timeouts are the Config's that a reload may change (SetTimeouts).
	timeouts                   atomic.Pointer[Timeouts]
	rejected, dropped, sniffed atomic.Uint64
	// For Stats (stats.go): bytes of ended flows, dial failures by
	// reason, dial latencies, and from SYN to relayed flow.
	bytesUp, bytesDown          atomic.Uint64
	dialErrors                  [NumDialReasons]atomic.Uint64
	dialLatency, connectLatency latencyHistogram

	// sources counts handshakes in progress per source, halfOpen those
	// waiting for the client's final ACK; handshakeTimeouts counts those
	// given up (handshake.go), synWarn rate-limits the warning.
	sources           *sourceLimiter
	halfOpen          atomic.Int64
	handshakeTimeouts atomic.Uint64
	synWarn           ratelog.Limiter

	done    chan struct{} // closed when the stack stops serving
	doneErr error         // why, set before done is closed; nil after Close
	endOnce sync.Once
}

// New builds the stack and starts serving the device: once New returns,
// packets read from the device are answered, so the caller may bring the
// link up.
func New(cfg Config) (*Stack, error) {
	if cfg.Device == nil || cfg.Dialer == nil {
		return nil, errors.New("stack: Device and Dialer are required")
	}
	cfg.setDefaults()
	st := &Stack{
		cfg:       cfg,
		log:       cfg.Logger,
		flowSlots: make(chan struct{}, cfg.MaxFlows),
		sources:   newSourceLimiter(cfg.MaxInFlightPerSource),
		dnsSlots:  make(chan struct{}, maxDNSInFlight),
		done:      make(chan struct{}),
	}
	st.timeouts.Store(&Timeouts{Dial: cfg.DialTimeout, Handshake: cfg.HandshakeTimeout, Sniff: cfg.SniffTimeout, UDP: cfg.UDPTimeout})
	st.ctx, st.cancel = context.WithCancel(context.Background())
	st.handshakes, st.cancelHandshakes = context.WithCancel(context.Background())
	relay, err := tcprelay.New(tcprelay.Config{HalfCloseIdle: cfg.HalfCloseIdle, ParkAfter: cfg.parkAfter, Log: st.log})
	if err != nil {
		return nil, fmt.Errorf("stack: %w", err)
	}
	st.relay = relay

	st.s = gstack.New(gstack.Options{
		NetworkProtocols:   []gstack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []gstack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, gicmp.NewProtocol4, gicmp.NewProtocol6},
	})
	if err := st.configure(); err != nil {
		st.closeStack()
		relay.Close()
		return nil, err
	}
	st.link = link.New(cfg.Device, linkHandler{st}, st.log)
	if err := st.s.CreateNIC(nicID, st.link); err != nil {
		st.closeStack()
		relay.Close()
		return nil, fmt.Errorf("create nic: %w", gverr.Error("create nic", err))
	}
	// Accept packets for every destination and answer from it: the stack
	// stands in for the whole network behind the TUN.
	if err := st.s.SetPromiscuousMode(nicID, true); err != nil {
		st.closeStack()
		relay.Close()
		return nil, fmt.Errorf("set promiscuous: %w", gverr.Error("promiscuous", err))
	}
	if err := st.s.SetSpoofing(nicID, true); err != nil {
		st.closeStack()
		relay.Close()
		return nil, fmt.Errorf("set spoofing: %w", gverr.Error("spoofing", err))
	}
	if err := st.addGateways(); err != nil {
		st.closeStack()
		relay.Close()
		return nil, err
	}
	st.s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	fwd := tcp.NewForwarder(st.s, cfg.TCP.forwarderReceiveWindow(), cfg.MaxInFlight, st.handleTCP)
	st.s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	st.s.SetTransportProtocolHandler(udp.ProtocolNumber, st.handleUDP)

	st.inUDP = inbound.NewUDP(st.ctx, inbound.Config{
		Gateway4: cfg.Gateway4, Gateway6: cfg.Gateway6,
		Timeout: cfg.UDPTimeout, Max: cfg.MaxUDPFlows,
		Writer: st.link, Log: st.log, NextFlowID: st.nextFlowID,
	})
	if cfg.UDP != nil {
		st.udp = udpnat.New(st.ctx, udpnat.Config{
			Dialer: cfg.UDP, Writer: st.link, Names: st.fakeNames(),
			Timeout: cfg.UDPTimeout, Max: cfg.MaxUDPFlows, DialTimeout: cfg.DialTimeout,
			EvictIdle: max(cfg.udpEvictIdle, 0),
			Route:     st.udpRoute(),
			Log:       st.log, NextFlowID: st.nextFlowID,
		})
	}
	st.ping = icmp.New(icmp.Config{
		Writer: st.link, Forward: cfg.ForwardPing, Control: cfg.PingControl, Refuse: cfg.Refuse,
		Max: cfg.MaxPingFlows,
		Log: st.log, NextFlowID: st.nextFlowID,
	})
	st.link.Start()
	st.helpers.Go(st.watchDevice)
	return st, nil
}

// Done is closed when the stack stops serving: the device went down (its
// interface was deleted), or Close was called. Err then says why.
func (st *Stack) Done() <-chan struct{} { return st.done }

// Err is why the stack stopped serving: nil while it serves and after Close,
// the device's failure otherwise.
func (st *Stack) Err() error {
	select {
	case <-st.done:
		return st.doneErr
	default:
		return nil
	}
}

// end records why the stack stopped serving, once.
func (st *Stack) end(err error) {
	st.endOnce.Do(func() {
		st.doneErr = err
		close(st.done)
	})
}

// watchDevice acts on the device's events until it goes down or the stack
// closes.
func (st *Stack) watchDevice() {
	events := st.cfg.Device.Events()
	for {
		select {
		case <-st.ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				// Closed without EventDown: the device was closed under
				// us, or lost the event.
				st.end(errors.New("device closed"))
				return
			}
			switch ev.Kind {
			case device.EventDown:
				// The owner reports it (Done, Err): not logged twice.
				st.log.Debug("device down", "err", ev.Err)
				st.end(ev.Err)
				return
			case device.EventMTU:
				st.log.Info("device mtu changed", "mtu", ev.MTU)
				st.link.SetDeviceMTU(ev.MTU)
			}
		}
	}
}

func (st *Stack) nextFlowID() uint64 { return st.flowSeq.Add(1) }

// Close resets every flow, stops the stack and closes the device. It is safe
// to call more than once.
func (st *Stack) Close() error {
	var err error
	st.closeOnce.Do(func() {
		st.mu.Lock()
		st.closed = true
		st.mu.Unlock()
		st.end(nil)
		st.cancel()
		st.relay.AbortAll()
		giveUp := time.AfterFunc(closeHandshakeGrace, st.cancelHandshakes)
		st.flows.Wait()
		giveUp.Stop()
		st.cancelHandshakes()
		st.relay.Close()
		if st.udp != nil {
			st.udp.Close()
		}
		st.ping.Close()
		// The resets of the flows just ended are queued: they reach
		// the clients before the device goes.
		st.link.FlushOutbound(time.Second)
		err = st.cfg.Device.Close()
		st.link.StopOutbound()
		// Our readers and writer stop here, not inside gVisor's
		// Stack.Wait: that waits for the link holding the stack's lock,
		// and a reader still delivering a packet may need that lock (a
		// reset to an unknown flow finds its route under it).
		st.link.Wait()
		st.helpers.Wait()
		st.closeStack()
	})
	return err
}

func (st *Stack) closeStack() {
	st.s.Close()
	st.s.Wait()
}
