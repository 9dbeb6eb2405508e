package stack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/stack/internal/gverr"
)

// Half-open handshakes, and why they are bounded here rather than by gVisor.
//
// gVisor's forwarder performs the client's handshake inside
// ForwarderRequest.CreateEndpoint, which blocks until the final ACK comes or
// the SYN-ACK retransmissions give up: seven SYN-ACKs with a backoff of 1 s
// doubling up to 120 s, 127 s in all. tcpip.TCPSynRetriesOption does not
// shorten that in this gVisor version: it sets a field that only getsockopt
// reads (transport/tcp/endpoint.go maxSynRetries), while the handshake's
// backoffTimer stops at MaxRTO. A forwarded handshake holds a slot of
// MaxInFlight all that time and, dial-first, a real upstream connection too,
// so a flood of SYNs from forged addresses filled the table for two minutes
// and held 1,024 upstream connections open on the attacker's behalf.
//
// SYN cookies would keep no state at all, but gVisor only answers with
// cookies for a listening endpoint (transport/tcp/accept.go); the
// forwarder's requests never do, and a flow dialed first must hold its
// upstream while the client answers anyway. What stands in for them here:
// a short bound on SYN-RCVD (Config.HandshakeTimeout), a cap per source
// (Config.MaxInFlightPerSource) so one address cannot take the whole
// table, and the forwarder's own cap (Config.MaxInFlight) past which SYNs
// are dropped. A forged flood therefore holds at most MaxInFlight upstream
// connections, each for at most DialTimeout + HandshakeTimeout, and each
// closed with a reset when its client does not answer.

// defaultHandshakeTimeout is Config.HandshakeTimeout's default. gVisor sends
// the SYN-ACK at 0 and 1 s, then 3 s (its backoff starts at 1 s); clients
// send their SYN again at 1, 3 and 7 s (gVisor, older Linux), or every second
// for the first four times (Linux with net.ipv4.tcp_syn_linear_timeouts=4).
// A bound just under 3 s gives a client two SYN-ACKs, with 1.5 s of round
// trip for the second, and ends before the client's retransmission at 3 s: a
// handshake given up is dropped without a reset, as Linux drops an expired
// request, so that retransmission starts a fresh one, and a lossy client
// loses a little time but not its connection. After a flood fills the
// table, the table is free again before that same retransmission, and a
// client gets through 3 s after the flood; with the 1-3-7 schedule a bound of
// 3 s or more would miss it by the dial's milliseconds and keep clients
// waiting until 7 s. Measured with 30 % loss each way (docs/tuning.md),
// 2.5 s failed fewer connections than 127 s, and 1 s reset a sixth of them:
// a client whose final ACK was lost was still retransmitting its first data.
const defaultHandshakeTimeout = 2500 * time.Millisecond

// rewakeAfter is how soon a handshake woken for its timeout or for Close is
// woken again if CreateEndpoint has not returned: the first wake can come
// before CreateEndpoint waits on the queue, and would then be lost.
const rewakeAfter = 20 * time.Millisecond

// closeHandshakeGrace is how long Close lets the client handshakes in
// progress go on before it gives them up. A client whose final ACK is on its
// way when Close starts, already connected on its side, then becomes a flow
// that Close resets properly; given up at once, it would be sent only the
// reset that answers its SYN, whose sequence number (0) its established
// connection ignores (RFC 5961). An ACK through a TUN takes microseconds;
// a client that has not answered by then is not a client Close waits for.
const closeHandshakeGrace = 250 * time.Millisecond

var (
	errHandshakeTimeout = errors.New("client handshake timed out")
	errStackClosing     = errors.New("stack closing")
)

// handshake is one client's TCP handshake in progress: gVisor's request and
// the per-source slot it holds until it completes.
type handshake struct {
	st  *Stack
	req *tcp.ForwarderRequest
	src netip.Prefix
}

// complete completes the request (exactly once: a second Complete panics in
// gVisor), optionally replying to the SYN with a reset, and frees the
// source's slot.
func (h *handshake) complete(reset bool) {
	h.req.Complete(reset)
	h.st.sources.release(h.src)
}

// accept performs the client's handshake: the SYN-ACK, then the wait for the
// final ACK, for at most Config.HandshakeTimeout and no longer than the
// stack serves. It does not complete the request.
func (h *handshake) accept(wq *waiter.Queue) (tcpip.Endpoint, error) {
	w := startHandshakeWaker(h.st.handshakes, wq, h.st.timeouts.Load().Handshake)
	h.st.halfOpen.Add(1)
	ep, terr := h.req.CreateEndpoint(wq)
	h.st.halfOpen.Add(-1)
	why := w.stop()
	if terr == nil {
		// Established, even if the waker fired as the ACK came: keep it.
		// If the stack is closing, the relay resets it (AbortAll).
		return ep, nil
	}
	if why != nil {
		if why == errHandshakeTimeout {
			h.st.handshakeTimeouts.Add(1)
		}
		return nil, why
	}
	return nil, fmt.Errorf("client handshake: %w", gverr.Error("accept", terr))
}

// failAccept completes the request of a handshake accept gave up on: a
// timed-out one is dropped without a word, as Linux drops an expired
// request, so that a real client's next SYN retransmission starts afresh;
// any other failure replies with a reset.
func (h *handshake) failAccept(err error) {
	h.complete(!errors.Is(err, errHandshakeTimeout))
}

// handshakeWaker ends a CreateEndpoint blocked on wq when the handshake has
// taken too long or the stack closes. CreateEndpoint waits for a writable
// event on the queue it is given and then gives the handshake up unless it
// completed, closing the endpoint; a writable event from us is therefore
// the way to end it.
type handshakeWaker struct {
	wq      *waiter.Queue
	timer   *time.Timer
	stopCtx func() bool

	mu      sync.Mutex
	stopped bool
	why     error // why it fired; nil while it has not
}

func startHandshakeWaker(ctx context.Context, wq *waiter.Queue, timeout time.Duration) *handshakeWaker {
	w := &handshakeWaker{wq: wq}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.timer = time.AfterFunc(timeout, func() { w.wake(errHandshakeTimeout) })
	w.stopCtx = context.AfterFunc(ctx, func() { w.wake(errStackClosing) })
	return w
}

func (w *handshakeWaker) wake(why error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.stopped {
		return
	}
	if w.why == nil || why == errStackClosing {
		w.why = why
	}
	w.wq.Notify(waiter.WritableEvents)
	w.timer.Reset(rewakeAfter)
}

// stop disarms the waker once CreateEndpoint has returned and says why it
// fired, nil if it did not. No wake reaches the queue after stop returns.
func (w *handshakeWaker) stop() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.stopped = true
	w.timer.Stop()
	w.stopCtx()
	return w.why
}

// sourceLimiter counts the handshakes in progress per source: an IPv4
// address, or an IPv6 /64, the least a host is usually given, so a host
// cannot escape its cap by cycling through its own addresses.
type sourceLimiter struct {
	max     int
	dropped atomic.Uint64 // SYNs dropped for the cap; the caller counts them

	mu sync.Mutex
	// n has an entry only for a source with a handshake in progress, so
	// it holds at most MaxInFlight entries whatever the flood.
	n map[netip.Prefix]int
}

func newSourceLimiter(max int) *sourceLimiter {
	return &sourceLimiter{max: max, n: make(map[netip.Prefix]int)}
}

// sourceOf is the key a client address is counted under.
func sourceOf(a netip.Addr) netip.Prefix {
	a = a.Unmap()
	bits := 32
	if a.Is6() {
		bits = 64
	}
	p, _ := a.Prefix(bits)
	return p
}

// take counts a handshake from src, or reports false when src has max in
// progress already.
func (l *sourceLimiter) take(src netip.Prefix) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n[src] >= l.max {
		return false
	}
	l.n[src]++
	return true
}

func (l *sourceLimiter) release(src netip.Prefix) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.n[src] <= 1 {
		delete(l.n, src)
		return
	}
	l.n[src]--
}
