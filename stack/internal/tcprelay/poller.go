package tcprelay

import (
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Go's runtime poller offers no readiness callback: waiting for a socket
// means a goroutine blocked in a read, and its stack is most of what an
// idle flow costs. upstreamPoller is an epoll set of our own to which a
// flow hands its upstream socket once the socket has been quiet for a
// while. The flow then holds no goroutine; an event starts one.
//
// A socket is in two epoll sets at once, the runtime's (edge-triggered) and
// ours (one-shot), which the kernel allows. Our registration holds no
// reference to the socket: closing it removes it from the set without an
// event, so whoever closes a parked socket must wake its owner (see
// upstreamPipe.wake).
type upstreamPoller struct {
	epfd   int
	stopFD int // an eventfd; writing to it ends the loop
	log    *slog.Logger

	mu      sync.Mutex
	waiters map[uint64]pollWaiter // by registration id
	nextID  uint64
	done    sync.WaitGroup
}

// pollWaiter is told when its socket becomes readable, has hung up or
// failed.
type pollWaiter interface{ pollReady() }

const pollStopID = 0

// pollEvents are what wakes a parked upstream: data, a FIN, a reset.
// EPOLLONESHOT disarms the registration after one event, so a busy socket
// is reported once per park, not once per segment.
const pollEvents = unix.EPOLLIN | unix.EPOLLRDHUP | unix.EPOLLONESHOT

func newUpstreamPoller(log *slog.Logger) (*upstreamPoller, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("create upstream epoll set: %w", err)
	}
	stopFD, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("create upstream poller eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN}
	setPollID(&ev, pollStopID)
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, stopFD, &ev); err != nil {
		unix.Close(stopFD)
		unix.Close(epfd)
		return nil, fmt.Errorf("add eventfd to upstream epoll set: %w", err)
	}
	p := &upstreamPoller{epfd: epfd, stopFD: stopFD, log: log, waiters: make(map[uint64]pollWaiter), nextID: pollStopID + 1}
	p.done.Go(p.loop)
	return p, nil
}

func setPollID(ev *unix.EpollEvent, id uint64) {
	ev.Fd = int32(uint32(id))
	ev.Pad = int32(uint32(id >> 32))
}

func pollID(ev *unix.EpollEvent) uint64 {
	return uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
}

// register gives w an id for arm. Every registration ends with unregister.
func (p *upstreamPoller) register(w pollWaiter) uint64 {
	p.mu.Lock()
	defer p.mu.Unlock()
	id := p.nextID
	p.nextID++
	p.waiters[id] = w
	return id
}

func (p *upstreamPoller) unregister(id uint64) {
	p.mu.Lock()
	delete(p.waiters, id)
	p.mu.Unlock()
}

// arm asks for one event on the socket when it is readable. first says the
// socket is not in the set yet. An fd that is already readable is reported
// at once: epoll checks readiness when a registration is armed, so nothing
// that arrived before the call is missed.
func (p *upstreamPoller) arm(rc syscall.RawConn, id uint64, first bool) error {
	op := unix.EPOLL_CTL_MOD
	if first {
		op = unix.EPOLL_CTL_ADD
	}
	var cerr error
	err := rc.Control(func(fd uintptr) {
		ev := unix.EpollEvent{Events: pollEvents}
		setPollID(&ev, id)
		cerr = unix.EpollCtl(p.epfd, op, int(fd), &ev)
		if cerr == unix.ENOENT && op == unix.EPOLL_CTL_MOD {
			// Gone from the set since (a socket reopened on the same
			// number after a close never shares our registration).
			cerr = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_ADD, int(fd), &ev)
		}
	})
	if err != nil {
		return err // closed: the caller's read reports it
	}
	if cerr != nil {
		return fmt.Errorf("epoll_ctl upstream socket: %w", cerr)
	}
	return nil
}

// disarm takes the socket out of the set before it is closed, while the
// fd number is still ours.
func (p *upstreamPoller) disarm(rc syscall.RawConn) {
	_ = rc.Control(func(fd uintptr) {
		_ = unix.EpollCtl(p.epfd, unix.EPOLL_CTL_DEL, int(fd), nil)
	})
}

func (p *upstreamPoller) loop() {
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(p.epfd, events, -1)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			p.log.Error("upstream poller stopped", "err", err)
			return
		}
		for i := range events[:n] {
			id := pollID(&events[i])
			if id == pollStopID {
				return
			}
			p.mu.Lock()
			w := p.waiters[id]
			p.mu.Unlock()
			if w != nil {
				w.pollReady()
			}
		}
	}
}

// close stops the loop. Every flow has ended by then.
func (p *upstreamPoller) close() {
	var one = [8]byte{1}
	_, _ = unix.Write(p.stopFD, one[:])
	p.done.Wait()
	unix.Close(p.stopFD)
	unix.Close(p.epfd)
}
