package link

import (
	"errors"
	"os"
	"sync"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/frag"
)

// IP fragments, both ways.
//
// Inbound, fragments are reassembled here, before any path sees them
// (frag.Reassembler, bounded in memory and time), so that the UDP NAT,
// published ports, ping and gVisor all see whole packets. gVisor's own
// reassembly is never reached: it has no bound per source, and a flood of
// 300 MB of fragments grew the daemon by 32 MiB through it (14 MiB through
// ours, whose bound is 4 MiB).
//
// Outbound, a packet the stack built (a UDP reply, a DNS answer, an echo
// reply) that is longer than the MTU is cut into fragments here
// (frag.AppendFragments), without DF, as a kernel's UDP socket sends a
// datagram longer than the path MTU. gVisor's own packets are TCP segments
// sized to the MSS, and gVisor fragments anything else it sends itself.

// fragScratch is where a dispatcher reassembles: allocated at the first
// fragment, so that a queue that never sees one holds nothing.
type fragScratch struct{ buf []byte }

func (s *fragScratch) get() []byte {
	if s.buf == nil {
		s.buf = make([]byte, frag.MaxPacket)
	}
	return s.buf
}

// isFragment reports cheaply whether pkt may be a fragment: an IPv4 packet
// with MF or an offset, or an IPv6 packet with any extension header before
// its payload (the reassembler walks them).
func isFragment(pkt []byte) bool {
	switch {
	case len(pkt) >= 20 && pkt[0]>>4 == 4:
		return pkt[6]&0x3f != 0 || pkt[7] != 0
	case len(pkt) >= 40 && pkt[0]>>4 == 6:
		switch pkt[6] {
		case 0, 43, 44, 60: // Hop-by-Hop, Routing, Fragment, Destination Options
			return true
		}
	}
	return false
}

// fragWrite is what writeFragments hands the device, pooled.
type fragWrite struct {
	buf    []byte
	lens   []int
	pieces [][]byte
	pkts   [][][]byte
	metas  []device.Meta
}

var fragWrites = sync.Pool{New: func() any { return new(fragWrite) }}

// writeFragments writes pkt, longer than the MTU, as fragments that fit it,
// in one device write.
func (e *Endpoint) writeFragments(pkt []byte) {
	w := fragWrites.Get().(*fragWrite)
	defer fragWrites.Put(w)
	var ok bool
	w.buf, w.lens, ok = frag.AppendFragments(w.buf[:0], w.lens[:0], pkt, int(e.MTU()), e.fragID.Add(1))
	if !ok {
		e.droppedBig.Add(1)
		return
	}
	w.pieces, w.pkts, w.metas = w.pieces[:0], w.pkts[:0], w.metas[:0]
	off := 0
	for _, n := range w.lens {
		w.pieces = append(w.pieces, w.buf[off:off+n])
		off += n
	}
	for i := range w.pieces {
		w.pkts = append(w.pkts, w.pieces[i:i+1:i+1])
		w.metas = append(w.metas, device.Meta{})
	}
	if _, err := e.dev.Write(w.pkts, w.metas); err != nil && !errors.Is(err, os.ErrClosed) {
		e.log.Debug("write to device failed", "err", err)
	}
	clear(w.pieces)
	clear(w.pkts)
}

// FragStats are the reassembler's counters, and the packets too large to
// send even as fragments.
type FragStats struct {
	frag.Stats
	DroppedBig uint64
}

// FragStats reads the fragment counters.
func (e *Endpoint) FragStats() FragStats {
	return FragStats{Stats: e.frag.Stats(), DroppedBig: e.droppedBig.Load()}
}
