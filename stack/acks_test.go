package stack

import (
	"io"
	"net"
	"net/netip"
	"testing"
	"time"
)

// TestRequestReplyOneSegment checks that on a request/reply flow the reply
// carries the acknowledgement of the request: the client receives about
// one segment per round trip, not the ACK and then the reply.
func TestRequestReplyOneSegment(t *testing.T) {
	const rounds = 50
	p := newPeer(t, Config{})
	port := listen(t, echo)
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	buf := make([]byte, 64)
	roundTrip := func() {
		if _, err := c.Write(buf); err != nil {
			t.Fatalf("write: %v", err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			t.Fatalf("read: %v", err)
		}
	}
	roundTrip() // the handshake's segments are behind us
	segs := p.client.Stats().TCP.ValidSegmentsReceived.Value()
	merged := p.st.Stats().CoalescedACKs
	for range rounds {
		roundTrip()
	}
	segs = p.client.Stats().TCP.ValidSegmentsReceived.Value() - segs
	merged = p.st.Stats().CoalescedACKs - merged
	t.Logf("%d round trips: %d segments to the client, %d ACKs coalesced", rounds, segs, merged)
	// An echo over loopback answers well within the hold, but a loaded
	// machine (or the race detector) may make some replies late: then
	// their ACK goes alone, which is what the hold is for.
	if merged < rounds/5 || segs > 2*rounds-rounds/5 {
		t.Fatalf("%d segments and %d ACKs coalesced for %d round trips: the replies do not carry the requests' ACKs", segs, merged, rounds)
	}
}

// TestAckWithoutReply checks that data the upstream never answers is still
// acknowledged, by the ACK held back for a reply that does not come.
func TestAckWithoutReply(t *testing.T) {
	p := newPeer(t, Config{})
	got := make(chan struct{})
	port := listen(t, func(c *net.TCPConn) {
		var one [1]byte
		if _, err := io.ReadFull(c, one[:]); err == nil {
			close(got)
		}
		io.Copy(io.Discard, c) // never a byte back
	})
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()
	segs := p.client.Stats().TCP.ValidSegmentsReceived.Value()
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatalf("write: %v", err)
	}
	<-got
	// The ACK waits ackHold (200 µs) for a reply; allow for a slow machine,
	// far below the client's retransmission timeout (at least 200 ms),
	// which would also make a segment arrive.
	deadline := time.Now().Add(150 * time.Millisecond)
	for p.client.Stats().TCP.ValidSegmentsReceived.Value() == segs {
		if time.Now().After(deadline) {
			t.Fatal("the client's data was not acknowledged")
		}
		time.Sleep(time.Millisecond)
	}
}
