package main

import (
	"context"
	"log/slog"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Go's background scavenger keeps memory that the heap freed until it
// exceeds the next heap goal by a tenth, and the goal is twice the live
// heap. After a burst (thousands of flows opening, each on a goroutine
// whose stack is freed once the flow goes idle, or a throughput run's
// buffers) a daemon holding ten thousand idle flows would stay at twice
// what it needs for as long as it stays quiet. memoryTrimmer gives the
// freed memory back once allocation has calmed down.
type memoryTrimmer struct {
	log *slog.Logger
	// Trim when the heap holds more than minFree of free memory and more
	// than a quarter of the live heap, and the daemon allocated less than
	// quietAlloc since the last look.
	minFree    uint64
	quietAlloc uint64

	samples   []metrics.Sample
	lastAlloc uint64
}

// memoryTrimInterval is how often the trimmer looks: a trim then follows
// a burst by 5 to 10 s.
const memoryTrimInterval = 5 * time.Second

const (
	metricAllocs   = "/gc/heap/allocs:bytes"
	metricHeapFree = "/memory/classes/heap/free:bytes"
	metricLive     = "/gc/heap/live:bytes"
)

func newMemoryTrimmer(log *slog.Logger) *memoryTrimmer {
	return &memoryTrimmer{
		log:        log,
		minFree:    16 << 20,
		quietAlloc: 8 << 20,
		samples:    []metrics.Sample{{Name: metricAllocs}, {Name: metricHeapFree}, {Name: metricLive}},
	}
}

// run looks every interval until ctx ends.
func (m *memoryTrimmer) run(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	m.check() // sets the allocation baseline
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			m.check()
		}
	}
}

// check trims if the daemon is quiet and holds much free memory, and
// reports whether it did.
func (m *memoryTrimmer) check() bool {
	metrics.Read(m.samples)
	allocs, free, live := m.value(0), m.value(1), m.value(2)
	quiet := allocs-m.lastAlloc < m.quietAlloc
	m.lastAlloc = allocs
	if !quiet || free < m.minFree || free < live/4 {
		return false
	}
	start := time.Now()
	debug.FreeOSMemory() // a full collection, then every free page back
	metrics.Read(m.samples)
	m.lastAlloc = m.value(0)
	m.log.Debug("returned free heap memory to the kernel", "free_before_mib", free>>20, "free_after_mib", m.value(1)>>20,
		"live_mib", live>>20, "took", time.Since(start).Round(time.Millisecond))
	return true
}

func (m *memoryTrimmer) value(i int) uint64 {
	if m.samples[i].Value.Kind() != metrics.KindUint64 {
		return 0 // not offered by this runtime: never trim on it
	}
	return m.samples[i].Value.Uint64()
}
