package main

import (
	"context"
	"log/slog"
	"runtime/metrics"
	"sync"
	"testing"
	"time"
)

var sink [][]byte

// allocate allocates n MiB and drops it, leaving the garbage for the
// collector to find; it does not collect.
func allocate(n int) {
	for range n {
		sink = append(sink, make([]byte, 1<<20))
	}
	sink = nil
}

// heapHeld is the heap memory the runtime holds and has not returned:
// objects, dead ones not yet collected included, and free pages.
func heapHeld() uint64 {
	s := []metrics.Sample{{Name: metricObjects}, {Name: metricHeapFree}}
	metrics.Read(s)
	return s[0].Value.Uint64() + s[1].Value.Uint64()
}

// quietTrimmer is a trimmer with its baseline taken: what the test binary
// allocated before does not count.
func quietTrimmer() *memoryTrimmer {
	m := newMemoryTrimmer(slog.New(slog.DiscardHandler))
	m.baseline()
	return m
}

// TestMemoryTrimmerAfterBurst (issue 19): after a burst that no collection
// has followed, the first or second check gives the memory back: the
// documented 10 s at most, at one check per memoryTrimInterval. Before, the
// trimmer looked only at pages already collected, and the garbage of the
// burst's end waited for Go's forced collection, two minutes on.
func TestMemoryTrimmerAfterBurst(t *testing.T) {
	const burst = 64 // MiB
	m := quietTrimmer()
	if m.check() {
		t.Fatal("trimmed with nothing allocated")
	}
	allocate(burst)
	before := heapHeld()
	checks := 0
	for trimmed := false; !trimmed; {
		if checks++; checks > 2 {
			t.Fatalf("no trim %d checks (%v) after a %d MiB burst, want one within 10 s",
				checks-1, time.Duration(checks-1)*memoryTrimInterval, burst)
		}
		trimmed = m.check()
	}
	// The first check saw the burst: it waits for a quiet one.
	if checks != 2 {
		t.Errorf("trimmed at check %d after the burst, want 2 (the first saw it allocating)", checks)
	}
	after := heapHeld()
	t.Logf("heap held %d MiB -> %d MiB, trimmed at check %d (within %v)",
		before>>20, after>>20, checks, time.Duration(checks)*memoryTrimInterval)
	if before < after+burst/2<<20 {
		t.Errorf("heap held %d MiB -> %d MiB after the trim, want at least %d MiB of the burst returned",
			before>>20, after>>20, burst/2)
	}
	if m.check() {
		t.Error("trimmed again with nothing allocated since")
	}
}

// TestMemoryTrimmerNotWhileBusy: as long as every check finds the daemon
// allocating, the trimmer does not collect; the first quiet check does.
func TestMemoryTrimmerNotWhileBusy(t *testing.T) {
	m := quietTrimmer()
	for i := range 6 {
		allocate(4) // 4 MiB per check: busy
		if m.check() {
			t.Fatalf("trimmed at busy check %d", i+1)
		}
	}
	if !m.check() {
		t.Error("no trim at the first quiet check after 24 MiB")
	}
	// A trickle below the burst threshold never trims.
	for i := range 3 {
		allocate(1)
		if m.check() {
			t.Fatalf("trimmed after %d MiB since the last trim", i+1)
		}
	}
}

// TestMemoryTrimmerRun: run checks once per tick and stops when its context
// ends. The tick channel is unbuffered, so each send returns only once run
// has finished the check before.
func TestMemoryTrimmerRun(t *testing.T) {
	m := newMemoryTrimmer(slog.New(slog.DiscardHandler))
	ctx, cancel := context.WithCancel(t.Context())
	tick := make(chan time.Time)
	var wg sync.WaitGroup
	wg.Go(func() { m.run(ctx, tick) })
	tick <- time.Now() // run has taken its baseline
	allocate(32)
	tick <- time.Now() // saw the burst
	tick <- time.Now() // quiet: trims
	tick <- time.Now() // nothing since
	cancel()
	wg.Wait()
	if m.trims != 1 {
		t.Errorf("%d trims over a burst and three ticks, want 1", m.trims)
	}
}
