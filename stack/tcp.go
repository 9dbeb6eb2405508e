package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack/internal/packet"
	"github.com/netstackd/netstackd/stack/internal/tcprelay"
)

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

// takeFlowSlot takes one of the MaxFlows slots that every TCP flow holds,
// outbound or published, or reports false when none is free.
func (st *Stack) takeFlowSlot() bool {
	select {
	case st.flowSlots <- struct{}{}:
		return true
	default:
		return false
	}
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
	start := time.Now()
	handedOff := false
	defer func() {
		if !handedOff {
			st.flows.Done()
		}
	}()

	id := req.ID()
	client := netip.AddrPortFrom(packet.AddrFrom(id.RemoteAddress), id.RemotePort)
	dst := netip.AddrPortFrom(packet.AddrFrom(id.LocalAddress), id.LocalPort)
	log := flowLogger{base: st.log, seq: st.nextFlowID(), src: client, dst: dst}

	if !st.takeFlowSlot() {
		st.tcpLimited.Add(1)
		st.warnFlowLimit.Warn(st.log, "flow limit reached, resetting new flows", "max_flows", st.cfg.MaxFlows, "src", client, "dst", dst)
		req.Complete(true)
		return
	}
	defer func() {
		if !handedOff {
			<-st.flowSlots
		}
	}()

	h := &handshake{st: st, req: req, src: sourceOf(client.Addr())}
	if !st.sources.take(h.src) {
		// Dropped, not reset: a real client's retransmission may find room.
		log.log(slog.LevelDebug, "too many handshakes from this source, dropping SYN", "max_per_source", st.cfg.MaxInFlightPerSource)
		req.Complete(false)
		// Counted once its slot in the forwarder is free again.
		st.sources.dropped.Add(1)
		st.warnHalfOpen()
		return
	}

	if st.cfg.DNS != nil && dst.Port() == 53 {
		st.serveDNSStream(h, client, dst, log)
		return
	}
	address, name, release, err := st.upstreamAddress(dst)
	if err != nil {
		st.tcpRefused.Add(1)
		var own errRefusedDst
		if errors.As(err, &own) {
			// Config.Refuse's owner counts and reports these.
			log.log(slog.LevelDebug, "refusing flow", "err", err)
		} else {
			st.logRefused.Log(st.log, slog.LevelInfo, "refusing flow", "src", client, "dst", dst, "err", err)
		}
		h.complete(true)
		return
	}
	defer func() {
		if !handedOff {
			release()
		}
	}()
	r := flowRoute{flow: Flow{Proto: "tcp", Client: client, Dst: dst}, address: address}
	st.nameFlow(&r.flow, name)
	r.decision = st.decide(r.flow)
	if st.refuseByRoute(h, r.flow, r.decision, log) {
		return
	}
	var (
		wq waiter.Queue
		o  openFlow
	)
	if r.decision.Sniff {
		o, err = st.openSniffing(h, &wq, &r, log)
	} else {
		open := st.dialThenAccept
		if st.cfg.AcceptFirst {
			open = st.acceptWhileDialing
		}
		var ep tcpip.Endpoint
		o.upstream, o.via, ep, err = open(h, &wq, st.dialer(r.decision), r.address)
		if err == nil {
			o.conn = tcprelay.NewConn(ep, &wq, dst, client)
		}
	}
	if err != nil {
		switch {
		case ratelog.IsFDExhaustion(err):
			st.warnFDs.Warn(st.log, "out of file descriptors: resetting new flows", "src", client, "dst", dst, "err", err)
		case errors.Is(err, errHandshakeTimeout):
			st.warnHalfOpen()
			log.log(slog.LevelDebug, "flow not opened", "address", r.address, "err", err)
		default:
			log.log(slog.LevelDebug, "flow not opened", "address", r.address, "err", err)
		}
		return
	}
	o.conn.SetKeepAlive()
	if len(o.first) > 0 {
		// A fresh socket's send buffer takes the few kilobytes sniffing
		// read at once.
		if _, err := o.upstream.Write(o.first); err != nil {
			log.log(slog.LevelDebug, "flow not opened", "address", r.address, "err", fmt.Errorf("send the client's first bytes: %w", err))
			o.conn.Abort()
			tcprelay.ResetConn(o.upstream)
			return
		}
	}
	tag := tcprelay.Tag{ID: log.seq, Route: st.tagRoute(r, o.via)}

	st.connectLatency.observe(time.Since(start))
	st.tcpOpened.Add(1)
	log.log(slog.LevelDebug, "flow open", "upstream", o.upstream.RemoteAddr(), "via", tag.Route.ViaName(), "rule", r.decision.Rule,
		"name", r.flow.Name, "name_from", r.flow.NameFrom)
	handedOff = true
	// The done func lives as long as the flow, idle or not: it holds the
	// address and the shared route, not the flow's decision.
	address, rt := r.address, tag.Route
	st.relay.Relay(o.conn, o.upstream, tag, func(res tcprelay.Result) {
		st.bytesUp.Add(uint64(max(res.Up, 0)))
		st.bytesDown.Add(uint64(max(res.Down, 0)))
		// One line says the whole flow: where it went, how much each
		// way, how long, and how it ended.
		if l := log.logger(slog.LevelDebug); l != nil {
			attrs := append(res.LogAttrs(), slog.String("address", address))
			if rt != nil {
				attrs = append(attrs, slog.String("via", rt.Via), slog.String("rule", rt.Rule))
				if rt.Name != "" {
					attrs = append(attrs, slog.String("name", rt.Name), slog.String("name_from", rt.NameFrom))
				}
			}
			l.LogAttrs(context.Background(), slog.LevelDebug, "flow closed", attrs...)
		}
		release()
		<-st.flowSlots
		st.flows.Done()
	})
}

// flowRoute is how a new TCP flow is routed: the flow as Config.Route
// sees it, its decision, and the address to dial. Sniffing may change all
// three.
type flowRoute struct {
	flow     Flow
	decision Decision
	address  string
}

// openFlow is a TCP flow with both sides open.
type openFlow struct {
	conn     *tcprelay.Conn
	upstream net.Conn
	via      string // the upstream's name, when the dialer gave one
	first    []byte // what sniffing read from the client, owed to the upstream
}

// tagRoute is the route the live view shows for a flow: shared by flows
// routed alike, the flow's own when it carries a name of its own (a fake
// address's is looked up when the view asks).
func (st *Stack) tagRoute(r flowRoute, via string) *tcprelay.Route {
	if via == "" {
		via = r.decision.Via
	}
	if f := r.flow; f.NameFrom == NameFromSniffed || f.NameFrom == NameFromDNS {
		return &tcprelay.Route{Via: via, Rule: r.decision.Rule, Name: f.Name, NameFrom: f.NameFrom}
	}
	return st.routes.of(via, r.decision.Rule)
}

// refuseByRoute carries out a decision to reject or drop a flow before
// its handshake, and reports whether it did.
func (st *Stack) refuseByRoute(h *handshake, f Flow, d Decision, log flowLogger) bool {
	if !st.countRefused(d.Action) {
		return false
	}
	log.log(slog.LevelDebug, "flow refused", "action", d.Action, "rule", d.Rule, "name", f.Name)
	// A reject resets the SYN; a drop sends not even that: the client
	// retransmits its SYN, and each retransmission is dropped again.
	h.complete(d.Action == Reject)
	return true
}

// warnHalfOpen says, at most once per period, that clients are leaving
// handshakes half open or exceeding their share: the mark of a SYN flood,
// perhaps from forged addresses.
func (st *Stack) warnHalfOpen() {
	// Once per dropped SYN of a flood: the arguments (and gVisor's stats,
	// which Stats copies whole) are read only for the line a period that
	// is written.
	suppressed, ok := st.synWarn.Allow()
	if !ok {
		return
	}
	st.log.Warn("tcp handshakes left half open or over the per-source cap; a SYN flood?",
		"half_open", st.halfOpen.Load(), "timed_out", st.handshakeTimeouts.Load(), "dropped_per_source", st.sources.dropped.Load(),
		"dropped_table_full", st.s.Stats().TCP.ForwardMaxInFlightDrop.Value(),
		"max_inflight", st.cfg.MaxInFlight, "max_per_source", st.cfg.MaxInFlightPerSource,
		"handshake_timeout", st.timeouts.Load().Handshake, "suppressed", suppressed)
}

// dialThenAccept reaches the upstream and only then completes the client's
// handshake, so that a refused or unreachable upstream reaches the client
// as a reset in reply to its SYN, as if the far end had refused it. It
// completes the handshake's request.
func (st *Stack) dialThenAccept(h *handshake, wq *waiter.Queue, d Dialer, address string) (net.Conn, string, tcpip.Endpoint, error) {
	upstream, via, err := st.dialUpstream(st.ctx, d, address)
	if err != nil {
		h.complete(true)
		return nil, "", nil, err
	}
	ep, err := h.accept(wq)
	if err != nil {
		// The client reset, gave up or never answered (a forged source):
		// the upstream, which has already accepted, sees a reset, so no
		// connection opened on a stranger's behalf stays open.
		h.failAccept(err)
		tcprelay.ResetConn(upstream)
		return nil, "", nil, err
	}
	h.complete(false)
	return upstream, via, ep, nil
}

// acceptWhileDialing completes the client's handshake while the upstream is
// being dialed (Config.AcceptFirst). The client's connect returns without
// waiting for the upstream, and what it sends meanwhile waits in the
// endpoint's receive buffer; an upstream that cannot be reached resets the
// established connection instead of refusing the SYN. It completes the
// handshake's request.
func (st *Stack) acceptWhileDialing(h *handshake, wq *waiter.Queue, d Dialer, address string) (net.Conn, string, tcpip.Endpoint, error) {
	type dialResult struct {
		conn net.Conn
		via  string
		err  error
	}
	// Every return below first receives from dialed, so this goroutine is
	// always waited for. It starts before the handshake: on one P the
	// runtime runs the goroutine readied last first, which is then the
	// writer carrying the SYN-ACK, and the dial runs while the client
	// answers.
	ctx, cancel := context.WithCancel(st.ctx)
	defer cancel()
	dialed := make(chan dialResult, 1)
	go func() {
		c, via, err := st.dialUpstream(ctx, d, address)
		dialed <- dialResult{c, via, err}
	}()
	ep, err := h.accept(wq)
	if err != nil {
		h.failAccept(err)
		cancel() // the client is gone: stop dialing for it
		if r := <-dialed; r.err == nil {
			tcprelay.ResetConn(r.conn)
		}
		return nil, "", nil, err
	}
	h.complete(false)
	r := <-dialed
	if r.err != nil {
		ep.Abort()
		return nil, "", nil, r.err
	}
	return r.conn, r.via, ep, nil
}

// dialUpstream dials address with d, bounded by DialTimeout, and returns
// the upstream's name when d gives one (UpstreamDialer).
func (st *Stack) dialUpstream(parent context.Context, d Dialer, address string) (net.Conn, string, error) {
	ctx, cancel := context.WithTimeout(parent, st.timeouts.Load().Dial)
	defer cancel()
	start := time.Now()
	var (
		c   net.Conn
		via string
		err error
	)
	if ud, ok := d.(UpstreamDialer); ok {
		c, via, err = ud.DialUpstream(ctx, "tcp", address)
	} else {
		c, err = d.DialContext(ctx, "tcp", address)
	}
	if err != nil {
		if parent.Err() == nil { // not given up by Close or the client
			st.dialFailed(address, err)
		}
		return nil, "", fmt.Errorf("dial upstream %s: %w", address, err)
	}
	st.dialLatency.observe(time.Since(start))
	return c, via, nil
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
func (st *Stack) serveDNSStream(h *handshake, client, dst netip.AddrPort, log flowLogger) {
	var wq waiter.Queue
	ep, err := h.accept(&wq)
	if err != nil {
		h.failAccept(err)
		return
	}
	h.complete(false)
	conn := tcprelay.NewConn(ep, &wq, dst, client)
	defer conn.Close()
	stop := context.AfterFunc(st.ctx, conn.Abort)
	defer stop()
	if err := st.cfg.DNS.ServeStream(st.ctx, conn); err != nil {
		log.log(slog.LevelDebug, "dns over tcp ended", "err", err)
	}
}
