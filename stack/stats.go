package stack

import (
	"sync/atomic"
	"time"
)

// The counters here are read by an operator's scrape (Stats), never on the
// data path: each is one atomic add where the event already happens (a
// flow's end, a dial's return), so a stack nobody watches pays nothing
// more.

// DialLatencyBuckets are the upper bounds of the latency histograms
// (Stats.DialLatency, Stats.ConnectLatency): from a loopback proxy's fraction of a millisecond to
// the 10s default DialTimeout.
var DialLatencyBuckets = [...]time.Duration{
	time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond, 10 * time.Millisecond,
	25 * time.Millisecond, 50 * time.Millisecond, 100 * time.Millisecond, 250 * time.Millisecond,
	500 * time.Millisecond, time.Second, 2500 * time.Millisecond, 5 * time.Second, 10 * time.Second,
}

// Histogram is a snapshot of a latency histogram: Counts[i] are the
// observations not above DialLatencyBuckets[i] and above the bound before
// (not cumulative); Over those above the last bound.
type Histogram struct {
	Counts [len(DialLatencyBuckets)]uint64
	Over   uint64
	Sum    time.Duration
}

// Count is the number of observations.
func (h Histogram) Count() uint64 {
	n := h.Over
	for _, c := range h.Counts {
		n += c
	}
	return n
}

// latencyHistogram counts durations into DialLatencyBuckets with atomics:
// observers never wait for each other or for a reader.
type latencyHistogram struct {
	counts [len(DialLatencyBuckets) + 1]atomic.Uint64
	sum    atomic.Int64 // nanoseconds
}

func (h *latencyHistogram) observe(d time.Duration) {
	i := 0
	for i < len(DialLatencyBuckets) && d > DialLatencyBuckets[i] {
		i++
	}
	h.counts[i].Add(1)
	h.sum.Add(int64(d))
}

// snapshot reads the histogram. Observations landing while it reads may
// show in a count and not yet in Sum: harmless for a rate over minutes.
func (h *latencyHistogram) snapshot() Histogram {
	var s Histogram
	for i := range s.Counts {
		s.Counts[i] = h.counts[i].Load()
	}
	s.Over = h.counts[len(DialLatencyBuckets)].Load()
	s.Sum = time.Duration(h.sum.Load())
	return s
}

// Drops are the packets and flows the stack let go, by reason, since New.
type Drops struct {
	BadChecksum    uint64 // inbound packets with a bad checksum
	TooBig         uint64 // packets too large to send even as fragments
	Fragments      uint64 // fragments invalid, evicted for memory or timed out incomplete
	OutboundQueue  uint64 // packets toward the TUN dropped by a full outbound queue
	DNS            uint64 // DNS queries dropped: too many at once, or an answer too large
	SYNPerSource   uint64 // SYNs dropped for their source's handshake cap
	SYNInFlight    uint64 // SYNs dropped for the cap on all handshakes (MaxInFlight)
	HandshakeTimed uint64 // handshakes given up: the client never answered our SYN-ACK
	UDPTableFull   uint64 // datagrams from new sources dropped by a full UDP table
	UDPSend        uint64 // datagrams a full or failing upstream socket did not take
	UDPReplyTooBig uint64 // replies too large for the client's IP family
	UDPOpening     uint64 // datagrams dropped while their association opened
}

// drops reads the drop counters of the stack and its parts.
func (st *Stack) drops() Drops {
	fs := st.link.FragStats()
	d := Drops{
		BadChecksum:    st.link.DroppedChecksum(),
		TooBig:         fs.DroppedBig,
		Fragments:      fs.Dropped + fs.Evicted + fs.TimedOut,
		OutboundQueue:  st.link.DroppedOutbound(),
		DNS:            st.droppedDNS.Load(),
		SYNPerSource:   st.sources.dropped.Load(),
		SYNInFlight:    st.s.Stats().TCP.ForwardMaxInFlightDrop.Value(),
		HandshakeTimed: st.handshakeTimeouts.Load(),
	}
	if st.udp != nil {
		u := st.udp.Stats()
		d.UDPTableFull, d.UDPSend, d.UDPReplyTooBig, d.UDPOpening = u.RefusedFull, u.DroppedSend, u.DroppedBig, u.DroppedOpening
	}
	return d
}
