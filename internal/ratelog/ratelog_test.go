package ratelog

import (
	"bytes"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// clock is a hand-moved clock for Limiter.Now.
type clock struct{ t time.Time }

func (c *clock) now() time.Time          { return c.t }
func (c *clock) advance(d time.Duration) { c.t = c.t.Add(d) }

func TestLimiterOneLinePerPeriod(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	var buf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&buf, nil))
	l := &Limiter{Every: 10 * time.Second, Now: c.now}

	steps := []struct {
		name           string
		advance        time.Duration
		wantWritten    bool
		wantSuppressed string // the suppressed attribute of the line written, "" for none
	}{
		{name: "first line goes through", wantWritten: true},
		{name: "at once: counted", advance: 0},
		{name: "within the period: counted", advance: 5 * time.Second},
		{name: "just before the end: counted", advance: 5*time.Second - time.Nanosecond},
		{name: "period over: written with the count", advance: time.Nanosecond, wantWritten: true, wantSuppressed: "suppressed=3"},
		{name: "next period starts at that line", advance: 9 * time.Second},
		{name: "long quiet: written, one suppressed", advance: time.Hour, wantWritten: true, wantSuppressed: "suppressed=1"},
		{name: "after quiet: no count", advance: time.Hour, wantWritten: true},
	}
	for _, s := range steps {
		c.advance(s.advance)
		buf.Reset()
		got := l.Warn(log, "fds exhausted", "reason", "emfile")
		if got != s.wantWritten {
			t.Fatalf("%s: written %v, want %v", s.name, got, s.wantWritten)
		}
		line := buf.String()
		if s.wantWritten != (line != "") {
			t.Fatalf("%s: output %q", s.name, line)
		}
		if !s.wantWritten {
			continue
		}
		if !strings.Contains(line, "level=WARN") || !strings.Contains(line, "reason=emfile") {
			t.Errorf("%s: line %q lacks level or attributes", s.name, line)
		}
		if s.wantSuppressed == "" && strings.Contains(line, "suppressed") {
			t.Errorf("%s: line %q counts lines none were left out", s.name, line)
		}
		if s.wantSuppressed != "" && !strings.Contains(line, s.wantSuppressed) {
			t.Errorf("%s: line %q, want %s", s.name, line, s.wantSuppressed)
		}
	}
}

func TestLimiterZeroValueDefaults(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	l := &Limiter{Now: c.now}
	if _, ok := l.Allow(); !ok {
		t.Fatal("first line refused")
	}
	c.advance(DefaultEvery - time.Millisecond)
	if _, ok := l.Allow(); ok {
		t.Fatal("line allowed before DefaultEvery passed")
	}
	c.advance(time.Millisecond)
	if n, ok := l.Allow(); !ok || n != 1 {
		t.Fatalf("after DefaultEvery: ok %v suppressed %d, want true 1", ok, n)
	}
}

func TestLimiterNilLoggerCounts(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	l := &Limiter{Now: c.now}
	if l.Warn(nil, "x") {
		t.Fatal("wrote to a nil logger")
	}
	if _, ok := l.Allow(); ok {
		t.Fatal("the nil-logger line did not start a period")
	}
}

// TestLimiterConcurrent lets many goroutines race for one period: exactly
// one line goes through and every other one is counted.
func TestLimiterConcurrent(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	l := &Limiter{Now: c.now}
	const n = 64
	var wg sync.WaitGroup
	var mu sync.Mutex
	written := 0
	for range n {
		wg.Go(func() {
			if _, ok := l.Allow(); ok {
				mu.Lock()
				written++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if written != 1 {
		t.Fatalf("%d lines written in one period, want 1", written)
	}
	c.advance(DefaultEvery)
	if got, ok := l.Allow(); !ok || got != n-1 {
		t.Fatalf("next period: ok %v suppressed %d, want true %d", ok, got, n-1)
	}
}

func TestIsFDExhaustion(t *testing.T) {
	cases := []struct {
		name string
		err  error
		want bool
	}{
		{name: "emfile", err: syscall.EMFILE, want: true},
		{name: "enfile", err: syscall.ENFILE, want: true},
		{name: "wrapped-dial", err: &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("socket", syscall.EMFILE)}, want: true},
		{name: "wrapped-fmt", err: fmt.Errorf("dial upstream x: %w", syscall.ENFILE), want: true},
		{name: "refused", err: syscall.ECONNREFUSED, want: false},
		{name: "nil", err: nil, want: false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := IsFDExhaustion(c.err); got != c.want {
				t.Errorf("IsFDExhaustion(%v) = %v, want %v", c.err, got, c.want)
			}
		})
	}
}
