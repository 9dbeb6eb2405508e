package link

import (
	"errors"
	"net/netip"
	"os"
	"sync"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/frag"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// datagramBufs hold the packets of one WriteDatagrams call: a USO packet
// of up to 64 KiB, or one packet per datagram.
var datagramBufs = sync.Pool{New: func() any { return new(datagramBatch) }}

// datagramBatchMax is the most packets one WriteDatagrams call hands the
// device at once.
const datagramBatchMax = 64

type datagramBatch struct {
	buf    []byte // the packets, one after another
	starts [datagramBatchMax]int
	ends   [datagramBatchMax]int
	pieces [datagramBatchMax][]byte
	pkts   [datagramBatchMax][][]byte
	metas  [datagramBatchMax]device.Meta
	n      int
	// whole, frags and lens are where a datagram longer than the MTU is
	// built and cut into fragments.
	whole, frags []byte
	lens         []int
}

// WriteDatagrams carries datagrams from src to the client dst in as few
// writes as the device allows. On a device with UDP segmentation offload,
// a run of equal-sized datagrams (the last may be shorter) leaves as one
// packet that the kernel cuts, the way a UDP_SEGMENT send does; otherwise
// each datagram is a packet of its own, all handed to the device in one
// call. A datagram longer than the MTU allows leaves as IP fragments;
// payloads larger than an IP packet can carry are skipped and counted in
// the returned number. It may be called from any goroutine.
func (e *Endpoint) WriteDatagrams(src, dst netip.AddrPort, payloads [][]byte) (dropped int) {
	if len(payloads) == 0 {
		return 0
	}
	hl := packet.IPHeaderLen(dst.Addr())
	maxPayload := int(e.MTU()) - hl - packet.UDPHeaderLen
	b := datagramBufs.Get().(*datagramBatch)
	defer datagramBufs.Put(b)
	b.buf, b.n = b.buf[:0], 0
	for i := 0; i < len(payloads); {
		if len(payloads[i]) > maxPayload {
			if !e.appendFragments(b, src, dst, payloads[i]) {
				dropped++
			}
			i++
			continue
		}
		// A run: datagrams of the first one's size, then at most one
		// shorter; within 64 KiB of IP packet.
		run := 1
		if e.caps.USO {
			size := len(payloads[i])
			total := hl + packet.UDPHeaderLen + size
			for j := i + 1; j < len(payloads) && size > 0; j++ {
				l := len(payloads[j])
				if l > size || total+l > 0xffff {
					break
				}
				total += l
				run++
				if l < size {
					break
				}
			}
		}
		if b.n == datagramBatchMax {
			e.flushDatagrams(b)
		}
		// Packets are laid out in b.buf before any is sliced out, so
		// that growing b.buf cannot leave a slice behind.
		b.starts[b.n] = len(b.buf)
		if run == 1 {
			b.buf = append(b.buf, make([]byte, hl+packet.UDPHeaderLen+len(payloads[i]))...)
			packet.BuildUDP(b.buf[b.starts[b.n]:], src, dst, payloads[i])
			b.metas[b.n] = device.Meta{}
		} else {
			b.buf = packet.AppendUSO(b.buf, src, dst, payloads[i:i+run])
			b.metas[b.n] = device.Meta{
				GSO:        device.GSOUDP,
				GSOSize:    uint16(len(payloads[i])),
				HdrLen:     uint16(hl + packet.UDPHeaderLen),
				NeedsCsum:  true,
				CsumStart:  uint16(hl),
				CsumOffset: 6, // the UDP checksum field
			}
		}
		b.ends[b.n] = len(b.buf)
		b.n++
		i += run
	}
	e.flushDatagrams(b)
	return dropped
}

// flushDatagrams writes the packets laid out in b and empties it.
func (e *Endpoint) flushDatagrams(b *datagramBatch) {
	if b.n == 0 {
		return
	}
	for i := range b.n {
		b.pieces[i] = b.buf[b.starts[i]:b.ends[i]]
		b.pkts[i] = b.pieces[i : i+1 : i+1]
	}
	if _, err := e.dev.Write(b.pkts[:b.n], b.metas[:b.n]); err != nil && !errors.Is(err, os.ErrClosed) {
		e.log.Debug("write to device failed", "err", err)
	}
	clear(b.pieces[:b.n])
	clear(b.pkts[:b.n])
	b.buf, b.n = b.buf[:0], 0
}

// appendFragments adds to b the fragments of the packet carrying payload
// from src to dst, flushing b as it fills, and reports false when the
// datagram cannot be sent: too large for IP, or an MTU too small to cut at.
func (e *Endpoint) appendFragments(b *datagramBatch, src, dst netip.AddrPort, payload []byte) bool {
	hl := packet.IPHeaderLen(dst.Addr())
	n := hl + packet.UDPHeaderLen + len(payload)
	if len(payload) > packet.MaxUDPPayload(dst.Addr()) {
		return false
	}
	if cap(b.whole) < n {
		b.whole = make([]byte, n)
	}
	pkt := packet.BuildUDP(b.whole[:n], src, dst, payload)
	var ok bool
	b.frags, b.lens, ok = frag.AppendFragments(b.frags[:0], b.lens[:0], pkt, int(e.MTU()), e.fragID.Add(1))
	if !ok {
		return false
	}
	off := 0
	for _, l := range b.lens {
		if b.n == datagramBatchMax {
			e.flushDatagrams(b)
		}
		b.starts[b.n] = len(b.buf)
		b.buf = append(b.buf, b.frags[off:off+l]...)
		b.ends[b.n] = len(b.buf)
		b.metas[b.n] = device.Meta{}
		b.n++
		off += l
	}
	return true
}
