package main

import (
	"context"
	"log/slog"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Go gives freed heap memory back to the kernel slowly. Garbage is found
// only by a collection, and once a burst stops allocating none comes until
// the runtime forces one every two minutes (forcegcperiod in
// runtime/proc.go); the background scavenger then returns only what exceeds
// the next heap goal by a tenth, and the goal is twice the live heap. After
// a burst (thousands of flows opening, each on a goroutine whose stack is
// freed once the flow goes idle, or a throughput run's buffers) a daemon
// holding ten thousand idle flows would stay at twice what it needs for
// minutes. memoryTrimmer collects and gives the memory back once a burst is
// over.
type memoryTrimmer struct {
	log *slog.Logger
	// Trim at the first check that finds less than quietAlloc allocated
	// since the check before, once at least burstAlloc has been allocated
	// since the last trim: garbage worth a collection may be lying about,
	// and the daemon is no longer busy making more. Under steady load no
	// check is quiet, and the runtime's own collections are enough.
	burstAlloc uint64
	quietAlloc uint64

	samples   []metrics.Sample
	lastAlloc uint64 // allocation count at the last check
	trimmedAt uint64 // allocation count after the last trim
	trims     int
}

// memoryTrimInterval is how often the trimmer looks. A burst that ends is
// seen as over by the first or the second check after it, so its memory
// goes back to the kernel at most 10 s after it ends.
const memoryTrimInterval = 5 * time.Second

const (
	metricAllocs   = "/gc/heap/allocs:bytes"
	metricObjects  = "/memory/classes/heap/objects:bytes"
	metricHeapFree = "/memory/classes/heap/free:bytes"
)

func newMemoryTrimmer(log *slog.Logger) *memoryTrimmer {
	return &memoryTrimmer{
		log: log,
		// 8 MiB: below that a collection and the pages it frees are not
		// worth the pause; an idle daemon never reaches it.
		burstAlloc: 8 << 20,
		// 2 MiB in 5 s: what a daemon with idle flows and a few DNS
		// queries allocates is far less; a single busy flow, more.
		quietAlloc: 2 << 20,
		samples:    []metrics.Sample{{Name: metricAllocs}, {Name: metricObjects}, {Name: metricHeapFree}},
	}
}

// run checks at every tick until ctx ends. The caller owns the ticker.
func (m *memoryTrimmer) run(ctx context.Context, tick <-chan time.Time) {
	m.baseline()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick:
			m.check()
		}
	}
}

// baseline counts allocation from now on, as if a trim had just been made.
func (m *memoryTrimmer) baseline() {
	metrics.Read(m.samples)
	m.lastAlloc = m.value(0)
	m.trimmedAt = m.lastAlloc
}

// check trims if a burst of allocation is over, and reports whether it
// did.
func (m *memoryTrimmer) check() bool {
	metrics.Read(m.samples)
	allocs := m.value(0)
	quiet := allocs-m.lastAlloc < m.quietAlloc
	m.lastAlloc = allocs
	if !quiet || allocs-m.trimmedAt < m.burstAlloc {
		return false
	}
	// The heap's objects include the garbage no collection has found yet;
	// free is what collections found and the scavenger has not returned.
	held, burst := m.value(1)+m.value(2), allocs-m.trimmedAt
	start := time.Now()
	debug.FreeOSMemory() // a full collection, then every free page back
	took := time.Since(start)
	m.trims++
	metrics.Read(m.samples)
	m.lastAlloc = m.value(0)
	m.trimmedAt = m.lastAlloc
	m.log.Debug("returned free heap memory to the kernel", "allocated_mib", burst>>20,
		"heap_before_mib", held>>20, "heap_after_mib", (m.value(1)+m.value(2))>>20,
		"took", took.Round(time.Millisecond))
	return true
}

func (m *memoryTrimmer) value(i int) uint64 {
	if m.samples[i].Value.Kind() != metrics.KindUint64 {
		return 0 // not offered by this runtime: never trim on it
	}
	return m.samples[i].Value.Uint64()
}
