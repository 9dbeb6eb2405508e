package stack

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/waiter"
)

// An idle flow's cost is mostly goroutine stacks. The client-to-upstream
// direction therefore holds no goroutine while the client sends nothing:
// it parks on the endpoint's waiter queue, and gVisor's readiness callback
// starts a goroutine when data, a FIN or a reset arrives. (The other
// direction waits in the upstream socket's read, in the handler's
// goroutine; Go gives no readiness callback for a socket.)

// clientPipe copies the client's endpoint to the upstream connection.
type clientPipe struct {
	f        *flowConns
	src      *tcpConn
	dst      net.Conn
	halfDone *atomic.Bool
	idle     time.Duration // halfCloseIdle
	done     func(total int64, err error)

	total   int64
	parked  atomic.Bool    // no goroutine runs the loop; a wake starts one
	running sync.WaitGroup // the goroutine running the loop, if any
	entry   waiter.Entry

	timerMu  sync.Mutex
	timer    *time.Timer // bounds a parked, lingering half
	timedOut atomic.Bool
}

const clientReadable = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr

func newClientPipe(f *flowConns, halfDone *atomic.Bool, idle time.Duration, done func(int64, error)) *clientPipe {
	p := &clientPipe{f: f, src: f.client, dst: f.upstream, halfDone: halfDone, idle: idle, done: done}
	p.entry.Init(p, clientReadable)
	return p
}

// NotifyEvent is gVisor's readiness callback. It runs with the waiter
// queue's lock held, so it only starts the goroutine that unregisters.
func (p *clientPipe) NotifyEvent(waiter.EventMask) { p.wake() }

// wake starts a goroutine to run the loop if none does.
func (p *clientPipe) wake() {
	if p.parked.CompareAndSwap(true, false) {
		p.running.Go(p.resume)
	}
}

func (p *clientPipe) resume() {
	p.src.wq.EventUnregister(&p.entry)
	p.stopTimer()
	p.run()
}

// run copies until the client's side ends or the client goes quiet, in
// which case it parks and returns.
func (p *clientPipe) run() {
	for {
		if p.src.ep.Readiness(clientReadable) == 0 {
			if p.park() {
				return
			}
			continue
		}
		bp, n, rerr := readBorrowed(p.src) // does not wait: readable
		if n > 0 {
			_, werr := p.dst.Write((*bp)[:n])
			if werr != nil {
				relayBufs.Put(bp)
				p.f.abort()
				p.done(p.total, werr)
				return
			}
			p.total += int64(n)
		}
		if bp != nil {
			relayBufs.Put(bp)
		}
		if rerr == nil {
			continue
		}
		if p.timedOut.Load() {
			rerr = p.src.opError("read", os.ErrDeadlineExceeded)
		}
		p.done(p.total, finishDirection(p.f, p.dst, rerr, p.halfDone, p.idle))
		return
	}
}

// park registers for readiness and reports whether the loop may stop: a
// readiness that came while registering makes it go on instead.
func (p *clientPipe) park() bool {
	p.parked.Store(true)
	p.src.wq.EventRegister(&p.entry)
	if p.halfDone.Load() {
		// The other direction has finished: this one may linger, but
		// not for ever.
		p.startTimer()
	}
	if p.src.ep.Readiness(clientReadable) == 0 {
		return true
	}
	if !p.parked.CompareAndSwap(true, false) {
		return true // a wake already started a goroutine
	}
	p.src.wq.EventUnregister(&p.entry)
	p.stopTimer()
	return false
}

func (p *clientPipe) startTimer() {
	p.timerMu.Lock()
	defer p.timerMu.Unlock()
	if p.timer == nil {
		p.timer = time.AfterFunc(p.idle, func() {
			p.timedOut.Store(true)
			p.f.abort() // the reset wakes the parked loop, which ends
		})
	}
}

func (p *clientPipe) stopTimer() {
	p.timerMu.Lock()
	defer p.timerMu.Unlock()
	if p.timer != nil {
		p.timer.Stop()
		p.timer = nil
	}
}
