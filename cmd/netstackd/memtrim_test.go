package main

import (
	"log/slog"
	"runtime"
	"runtime/metrics"
	"testing"
)

var sink [][]byte

func heapFree() uint64 {
	s := []metrics.Sample{{Name: metricHeapFree}}
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// TestMemoryTrimmerReturnsFreedHeap: after a burst of allocation is freed,
// a quiet check gives the free memory back; a busy one does not.
func TestMemoryTrimmerReturnsFreedHeap(t *testing.T) {
	m := newMemoryTrimmer(slog.New(slog.DiscardHandler))
	m.check()
	burst := func() {
		for range 64 {
			sink = append(sink, make([]byte, 1<<20))
		}
		sink = nil
		runtime.GC() // freed, but kept by the runtime
	}
	burst()
	// The burst itself counts as allocation: not quiet yet.
	if m.check() {
		t.Fatal("trimmed right after 64 MiB were allocated")
	}
	before := heapFree()
	if before < 32<<20 {
		t.Skipf("the runtime already returned the burst (%d MiB free): nothing to test", before>>20)
	}
	if !m.check() {
		t.Fatalf("quiet, with %d MiB free: no trim", before>>20)
	}
	if after := heapFree(); after > before/4 {
		t.Errorf("free heap %d MiB -> %d MiB after the trim, want most of it returned", before>>20, after>>20)
	}
	// Nothing left to return: the next check does nothing.
	if m.check() {
		t.Error("trimmed again with nothing freed since")
	}
}
