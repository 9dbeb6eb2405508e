package stack

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"os"
	"syscall"

	"github.com/netstackd/netstackd/internal/ratelog"
)

// A flow whose upstream cannot be reached is the failure users most need
// to see, and the one a busy client repeats hundreds of times a second:
// each reason gets an info line of its own at most once per period, with
// the count of those left out, so a dead proxy and a refused port both
// show, and neither floods the log.

// DialReason names a class of dial failure: the index of Stats.DialErrors.
type DialReason int

// The classes of dial failure, as classifyDial sorts them.
const (
	DialRefused DialReason = iota
	DialTimeout
	DialUnreachable
	DialReset
	DialNoName
	DialNotPermitted
	DialOther
	NumDialReasons = int(iota)
)

// dialReasons are each class's metric label and the words of its log line.
var dialReasons = [NumDialReasons]struct{ label, says string }{
	DialRefused:      {"refused", "refused"},
	DialTimeout:      {"timeout", "timed out"},
	DialUnreachable:  {"unreachable", "unreachable"},
	DialReset:        {"reset", "reset"},
	DialNoName:       {"no_name", "name not resolved"},
	DialNotPermitted: {"not_permitted", "not permitted"},
	DialOther:        {"other", "failed"},
}

// String is the class in words fit for a metric label.
func (r DialReason) String() string { return dialReasons[r].label }

// classifyDial sorts a dial error by what the user can do about it.
func classifyDial(err error) DialReason {
	var dnsErr *net.DNSError
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return DialRefused
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, os.ErrDeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return DialTimeout
	case errors.Is(err, syscall.ENETUNREACH), errors.Is(err, syscall.EHOSTUNREACH):
		return DialUnreachable
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return DialReset
	case errors.As(err, &dnsErr):
		return DialNoName
	case errors.Is(err, syscall.EACCES), errors.Is(err, syscall.EPERM):
		return DialNotPermitted
	}
	return DialOther
}

// dialFailed counts a failed upstream dial and says why, rate-limited per
// reason. Running out of descriptors, which the caller reports at warn
// level, is not the upstream's failure.
func (st *Stack) dialFailed(address string, err error) {
	if ratelog.IsFDExhaustion(err) {
		return
	}
	r := classifyDial(err)
	st.dialErrors[r].Add(1)
	st.logDialFailed[r].Log(st.log, slog.LevelInfo, "upstream "+dialReasons[r].says+": resetting flows to it", "address", address, "err", err)
}

// Stats are a stack's counters since New.
type Stats struct {
	TCPFlows      uint64 // TCP flows relayed (their upstream was reached)
	TCPDialFailed uint64 // TCP flows reset because the upstream could not be reached: the sum of DialErrors
	TCPRefused    uint64 // TCP flows reset without a dial (a fake address with no name, an address Config.Refuse names)
	TCPLimited    uint64 // TCP flows reset for want of a slot (MaxFlows)
	UDPFlows      uint64 // UDP associations opened

	TCPActive int // TCP flows holding a slot now: relayed, published, or dialing
	UDPActive int // UDP associations open now
	// BytesUp and BytesDown are the bytes relayed toward upstreams and
	// toward clients by TCP flows that have ended.
	BytesUp, BytesDown uint64
	// DialErrors counts TCPDialFailed by reason, indexed by DialReason.
	DialErrors [NumDialReasons]uint64
	// DialLatency is how long successful upstream dials took;
	// ConnectLatency how long relayed flows took from the client's SYN
	// reaching the forwarder to both sides open (the dial, and the
	// client's handshake: in sequence by default, at once with
	// AcceptFirst).
	DialLatency, ConnectLatency Histogram
	HalfOpen                    int64 // handshakes waiting for the client's final ACK now
	Drops                       Drops
	// Rejected and Dropped count the flows Config.Route rejected and
	// dropped (TCP, UDP associations, echo requests); Sniffed those whose
	// name was found in their first bytes.
	Rejected, Dropped, Sniffed uint64
	// TUNReads counts the packets read from each queue of the device,
	// TUNBatches the reads that returned them: TUNReads[q]/TUNBatches[q]
	// is queue q's mean batch.
	TUNReads, TUNBatches []uint64
	// CoalescedACKs counts the pure ACKs toward clients that were not
	// written because the next packet of their flow carried them.
	CoalescedACKs uint64
}

// Stats reads the counters.
func (st *Stack) Stats() Stats {
	s := Stats{
		TCPFlows:       st.tcpOpened.Load(),
		TCPRefused:     st.tcpRefused.Load(),
		TCPLimited:     st.tcpLimited.Load(),
		TCPActive:      len(st.flowSlots),
		BytesUp:        st.bytesUp.Load(),
		BytesDown:      st.bytesDown.Load(),
		DialLatency:    st.dialLatency.snapshot(),
		ConnectLatency: st.connectLatency.snapshot(),
		HalfOpen:       st.halfOpen.Load(),
		Drops:          st.drops(),
		TUNReads:       st.link.QueueReads(),
		TUNBatches:     st.link.QueueBatches(),
		Rejected:       st.rejected.Load(),
		Dropped:        st.dropped.Load(),
		Sniffed:        st.sniffed.Load(),
		CoalescedACKs:  st.link.CoalescedAcks(),
	}
	for i := range s.DialErrors {
		s.DialErrors[i] = st.dialErrors[i].Load()
		s.TCPDialFailed += s.DialErrors[i]
	}
	if st.udp != nil {
		u := st.udp.Stats()
		s.UDPFlows = u.Associations
		s.UDPActive = st.udp.Len()
	}
	return s
}
