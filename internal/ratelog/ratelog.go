// Package ratelog rate-limits log lines that something outside netstackd can
// trigger as often as it likes: a client behind the TUN opening a flow per
// source port, a peer exhausting descriptors. One line a period per reason
// tells the operator what is happening; a line per event would let the
// client fill the disk and spend our CPU on formatting. The count of the
// lines left out rides on the next one that is written.
//
// It lives under internal/ so that stack, its internal packages and cmd can
// all use it, and it imports only the standard library.
package ratelog

import (
	"context"
	"errors"
	"log/slog"
	"sync/atomic"
	"syscall"
	"time"
)

// DefaultEvery is the period of a Limiter whose Every is zero.
const DefaultEvery = 10 * time.Second

// Limiter lets one line through per period and counts the others. Use one
// Limiter per reason (per message), so that a flood of one kind does not
// hide another. The zero value is ready to use; a Limiter must not be
// copied after first use.
type Limiter struct {
	// Every is the shortest time between two lines. 0 means DefaultEvery.
	Every time.Duration
	// Now reads the clock; nil means time.Now. Tests inject their own.
	Now func() time.Time

	// next is when the next line may be written, in unix nanoseconds.
	// Atomics, not a mutex: on a flood every event asks, from every
	// dispatcher, and all but one a period are told no.
	next       atomic.Int64
	suppressed atomic.Uint64 // lines left out since the last one written
}

// Allow reports whether a line may be written now and, if so, how many were
// left out since the last one. A caller that is told no must not log; a
// caller on a hot path builds the line's arguments only when told yes.
func (l *Limiter) Allow() (suppressed uint64, ok bool) {
	now := time.Now
	if l.Now != nil {
		now = l.Now
	}
	every := l.Every
	if every <= 0 {
		every = DefaultEvery
	}
	t := now().UnixNano()
	next := l.next.Load()
	if t < next || !l.next.CompareAndSwap(next, t+int64(every)) {
		l.suppressed.Add(1)
		return 0, false
	}
	return l.suppressed.Swap(0), true
}

// Log writes msg at level to log unless a line went through less than a
// period ago, in which case it only counts it. The line written carries
// "suppressed" with the count of those left out before it, when there were
// any. It reports whether it wrote. A nil log counts but never writes.
func (l *Limiter) Log(log *slog.Logger, level slog.Level, msg string, args ...any) bool {
	n, ok := l.Allow()
	if !ok || log == nil {
		return false
	}
	if n > 0 {
		args = append(args, slog.Uint64("suppressed", n))
	}
	log.Log(context.Background(), level, msg, args...)
	return true
}

// Warn is Log at slog.LevelWarn.
func (l *Limiter) Warn(log *slog.Logger, msg string, args ...any) bool {
	return l.Log(log, slog.LevelWarn, msg, args...)
}

// IsFDExhaustion reports whether err says the process (EMFILE) or the
// system (ENFILE) has no file descriptor left: the error every user of this
// package must log at warn level, rate-limited, since a client can cause it
// at will by opening flows.
func IsFDExhaustion(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE)
}
