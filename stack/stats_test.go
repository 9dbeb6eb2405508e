package stack

import (
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestStatsFlowsBytesDialErrors: Stats counts dial failures by reason, the
// bytes of ended flows each way, the latency of successful dials, and the
// flows active now (issue 16's metrics read these).
func TestStatsFlowsBytesDialErrors(t *testing.T) {
	p := newPeer(t, Config{})
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	const refused = 3
	for range refused {
		if c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.7"), closedPort)); err == nil {
			c.Close()
			t.Fatal("a flow to a closed port opened")
		}
	}
	const size = 3000
	dst := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.8"), listen(t, echo))
	for seed := range 2 {
		if err := echoFlow(t, p, dst, seed, size); err != nil {
			t.Fatal(err)
		}
	}
	// A flow's bytes are counted when both its directions have ended,
	// a moment after the client saw the echo end.
	var s Stats
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		if s = p.st.Stats(); s.TCPActive == 0 && s.BytesUp == 2*size {
			break
		}
	}
	if s.TCPActive != 0 || s.BytesUp != 2*size || s.BytesDown != 2*size {
		t.Errorf("active %d, bytes up %d down %d; want 0, %d, %d", s.TCPActive, s.BytesUp, s.BytesDown, 2*size, 2*size)
	}
	if s.DialErrors[DialRefused] != refused || s.TCPDialFailed != refused {
		t.Errorf("dial errors %v (failed %d), want %d refused", s.DialErrors, s.TCPDialFailed, refused)
	}
	if n := s.DialLatency.Count(); n != 2 || s.DialLatency.Sum <= 0 {
		t.Errorf("dial latency: %d observations, sum %v; want 2 and a positive sum", n, s.DialLatency.Sum)
	}
	if n := s.ConnectLatency.Count(); n != 2 || s.ConnectLatency.Sum < s.DialLatency.Sum {
		t.Errorf("connect latency: %d observations, sum %v; want 2 and at least the dials' %v", n, s.ConnectLatency.Sum, s.DialLatency.Sum)
	}
	if len(s.TUNReads) != 1 || s.TUNReads[0] == 0 || len(s.TUNBatches) != 1 || s.TUNBatches[0] == 0 || s.TUNBatches[0] > s.TUNReads[0] {
		t.Errorf("TUN reads %v in batches %v, want one queue with packets in at most as many batches", s.TUNReads, s.TUNBatches)
	}
}

func TestLatencyHistogramBuckets(t *testing.T) {
	var h latencyHistogram
	for _, d := range []time.Duration{0, time.Millisecond, time.Millisecond + 1, 3 * time.Millisecond, time.Minute} {
		h.observe(d)
	}
	s := h.snapshot()
	if s.Counts[0] != 2 || s.Counts[1] != 1 || s.Counts[2] != 1 || s.Over != 1 || s.Count() != 5 {
		t.Errorf("counts %v over %d, want [2 1 1 0...] over 1", s.Counts, s.Over)
	}
	if want := time.Minute + 5*time.Millisecond + 1; s.Sum != want {
		t.Errorf("sum %v, want %v", s.Sum, want)
	}
}

// BenchmarkStats is what a metrics scrape costs the stack: one snapshot.
func BenchmarkStats(b *testing.B) {
	p := newPeer(b, Config{})
	b.ReportAllocs()
	for b.Loop() {
		_ = p.st.Stats()
	}
}
