package tcprelay

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/waiter"
)

// An idle flow's cost is mostly goroutine stacks, so neither direction of
// a quiet flow holds one. The client-to-upstream direction parks on the
// endpoint's waiter queue, and gVisor's readiness callback starts a
// goroutine when data, a FIN or a reset arrives. The upstream-to-client
// direction parks its socket in our own epoll set (poller.go) once
// the socket has been quiet for parkAfter; until then it waits in the
// runtime poller, which costs nothing per read.
//
// Both follow one protocol (parking). parked is true while no goroutine
// runs the loop; whoever turns it false (a readiness event, an abort, the
// other direction finishing) starts the goroutine, which then owns the
// pipe. A loop about to park registers first and sets parked last, so a
// woken goroutine always finds the registration complete (registering an
// entry twice corrupts gVisor's waiter list). A wake that comes before
// parked is set cannot start anything, so it leaves a kick, which the
// parking loop checks after setting parked: it then takes parked back and
// goes on, unless a wake has already taken it.

// clientPipe copies the client's endpoint to the upstream connection.
type clientPipe struct {
	fl     *relayFlow
	total  atomic.Int64 // read live by Flows
	sender *socketSender
	parking
	entry  waiter.Entry
	linger lingerTimer
}

const clientReadable = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr

func (p *clientPipe) init(fl *relayFlow) {
	p.fl = fl
	p.entry.Init(p, clientReadable)
}

// start runs the loop if the client has sent something, and parks it
// otherwise.
func (p *clientPipe) start() {
	if !p.park() {
		p.fl.r.goroutines.Go(p.run)
	}
}

// NotifyEvent is gVisor's readiness callback. It runs with the waiter
// queue's lock held, so it only starts the goroutine that unregisters.
func (p *clientPipe) NotifyEvent(waiter.EventMask) { p.wake() }

// wake starts a goroutine to run the loop if none does.
func (p *clientPipe) wake() {
	if p.unpark() {
		p.fl.r.goroutines.Go(p.resume)
	}
}

func (p *clientPipe) resume() {
	p.fl.client.wq.EventUnregister(&p.entry)
	p.linger.stop()
	p.run()
}

// run copies until the client's side ends or the client goes quiet, in
// which case it parks and returns.
func (p *clientPipe) run() {
	fl := p.fl
	for {
		if fl.client.ep.Readiness(clientReadable) == 0 {
			if p.park() {
				return
			}
			continue
		}
		n, rerr, werr := p.sendReadable()
		p.total.Add(n)
		if werr != nil {
			fl.abort()
			fl.directionDone(true, p.total.Load(), werr)
			return
		}
		if rerr == nil {
			continue
		}
		if p.linger.expired() {
			rerr = fl.client.opError("read", os.ErrDeadlineExceeded)
		}
		fl.directionDone(true, p.total.Load(), finishDirection(&fl.flowConns, fl.upstream, rerr, &fl.halfDone, fl.r.halfCloseIdle))
		return
	}
}

// park registers for readiness and reports whether the loop may stop: a
// readiness that came while registering makes it go on instead.
func (p *clientPipe) park() bool {
	fl := p.fl
	p.beginPark()
	if fl.halfDone.Load() {
		// The other direction has finished: this one may linger, but
		// not for ever. (If it finishes after this, its wake kicks us.)
		p.linger.start(fl.r.halfCloseIdle, fl.abort)
	}
	fl.client.wq.EventRegister(&p.entry)
	if p.commitPark(func() bool { return fl.client.ep.Readiness(clientReadable) != 0 }) {
		return true
	}
	fl.client.wq.EventUnregister(&p.entry)
	p.linger.stop()
	return false
}

// upstreamPipe copies the upstream socket to the client's endpoint.
type upstreamPipe struct {
	fl    *relayFlow
	rc    syscall.RawConn
	total atomic.Int64 // read live by Flows
	id    uint64       // our registration with the poller; 0 before the first park
	inSet bool         // the socket is in the poller's epoll set
	parking
	linger lingerTimer
}

func (p *upstreamPipe) init(fl *relayFlow, rc syscall.RawConn) {
	p.fl, p.rc = fl, rc
}

// errQuiet says the upstream sent nothing for parkAfter.
var errQuiet = errors.New("upstream quiet")

func (p *upstreamPipe) pollReady() { p.wake() }

// wake starts a goroutine to run the loop if none does.
func (p *upstreamPipe) wake() {
	if p.unpark() {
		p.fl.r.goroutines.Go(p.resume)
	}
}

func (p *upstreamPipe) resume() {
	p.linger.stop()
	p.run()
}

// run copies until the upstream's side ends or goes quiet, in which case
// it parks and returns.
func (p *upstreamPipe) run() {
	fl := p.fl
	for {
		bp, n, rerr := p.read()
		if n > 0 {
			_, werr := fl.client.Write((*bp)[:n])
			if werr != nil {
				relayBufs.Put(bp)
				fl.abort()
				p.end(werr)
				return
			}
			p.total.Add(int64(n))
		}
		if bp != nil {
			relayBufs.Put(bp)
		}
		switch {
		case rerr == nil:
			continue
		case rerr == errQuiet:
			if p.park() {
				return
			}
			continue
		case p.linger.expired():
			rerr = &net.OpError{Op: "read", Net: "tcp", Addr: fl.upstream.RemoteAddr(), Err: os.ErrDeadlineExceeded}
		}
		p.end(finishDirection(&fl.flowConns, fl.client, rerr, &fl.halfDone, fl.r.halfCloseIdle))
		return
	}
}

// read waits for data in the runtime poller for up to parkAfter, or up to
// the lingering bound when that comes first.
func (p *upstreamPipe) read() (*[]byte, int, error) {
	r := p.fl.r
	wait, lingering := r.parkAfter, false
	if p.fl.halfDone.Load() && r.halfCloseIdle <= wait {
		wait, lingering = r.halfCloseIdle, true
	}
	_ = p.fl.upstream.SetReadDeadline(time.Now().Add(wait))
	bp, n, err := readRaw(p.fl.upstream, p.rc)
	if errors.Is(err, os.ErrDeadlineExceeded) && !lingering {
		return bp, n, errQuiet
	}
	return bp, n, err
}

// park hands the socket to the poller and reports whether the loop may
// stop.
func (p *upstreamPipe) park() bool {
	r := p.fl.r
	p.beginPark()
	if p.fl.halfDone.Load() {
		// read() has already waited parkAfter of the bound.
		rest := r.halfCloseIdle - r.parkAfter
		if rest <= 0 {
			return false // the next read waits out the bound itself
		}
		p.linger.start(rest, p.fl.abort)
	}
	if p.id == 0 {
		p.id = r.poller.register(p)
	}
	if err := r.poller.arm(p.rc, p.id, !p.inSet); err != nil {
		// The socket was closed under us (the next read says so), or
		// epoll refused it: go on waiting in the runtime.
		p.linger.stop()
		return false
	}
	p.inSet = true
	// The epoll event is one-shot: one that came before parked was set
	// was left as a kick, and is not repeated.
	if p.commitPark(nil) {
		return true
	}
	p.linger.stop()
	return false
}

// end leaves the poller for good and reports the direction's end.
func (p *upstreamPipe) end(err error) {
	if p.id != 0 {
		if p.inSet {
			p.fl.r.poller.disarm(p.rc)
		}
		p.fl.r.poller.unregister(p.id)
	}
	p.linger.stop()
	p.fl.directionDone(false, p.total.Load(), err)
}

// parking is the parked/kick pair of a pipe (see the protocol above).
type parking struct {
	parked atomic.Bool
	kick   atomic.Bool
}

// unpark is a wake: it reports whether the caller must start the loop.
func (k *parking) unpark() bool {
	k.kick.Store(true)
	return k.parked.CompareAndSwap(true, false)
}

// beginPark forgets kicks from while the loop ran: it is about to look
// afresh at everything a kick stands for.
func (k *parking) beginPark() { k.kick.Store(false) }

// commitPark parks once everything is registered, and reports whether the
// loop may stop. It does not when a kick came meanwhile or ready says
// there is work, unless a wake has already started another goroutine.
func (k *parking) commitPark(ready func() bool) bool {
	k.parked.Store(true)
	if !k.kick.Load() && (ready == nil || !ready()) {
		return true
	}
	return !k.parked.CompareAndSwap(true, false)
}

// lingerTimer bounds a parked direction of a half-closed flow.
type lingerTimer struct {
	mu       sync.Mutex
	timer    *time.Timer
	timedOut atomic.Bool
}

func (l *lingerTimer) start(d time.Duration, fire func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.timer == nil {
		l.timer = time.AfterFunc(d, func() {
			l.timedOut.Store(true)
			fire() // the reset wakes the parked loop, which ends
		})
	}
}

func (l *lingerTimer) stop() {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.timer != nil {
		l.timer.Stop()
		l.timer = nil
	}
}

func (l *lingerTimer) expired() bool { return l.timedOut.Load() }
