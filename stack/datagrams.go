package stack

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"os"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// datagramBufs hold the packets of one writeDatagrams call: a USO packet
// of up to 64 KiB, or one packet per datagram.
var datagramBufs = sync.Pool{New: func() any { return new(datagramBatch) }}

type datagramBatch struct {
	buf  []byte   // the packets, one after another
	pkts [][]byte // slices of buf, one per packet to write
}

// writeDatagrams carries datagrams from src to the client dst in as few
// writes as the device allows. On a device with UDP segmentation offload,
// a run of equal-sized datagrams (the last may be shorter) leaves as one
// packet that the kernel cuts, the way a UDP_SEGMENT send does; otherwise
// each datagram is a packet of its own, all handed to the device in one
// call. Payloads larger than the link MTU allows are skipped and counted
// in the returned number.
func (e *linkEndpoint) writeDatagrams(src, dst netip.AddrPort, payloads [][]byte) (dropped int) {
	if len(payloads) == 0 {
		return 0
	}
	hl := ipHeaderLen(dst.Addr())
	maxPayload := int(e.mtu) - hl - udpHeaderLen
	vh := 0
	if e.vnet {
		vh = vnetHdrLen
	}
	b := datagramBufs.Get().(*datagramBatch)
	defer datagramBufs.Put(b)
	b.buf, b.pkts = b.buf[:0], b.pkts[:0]
	// Packets are laid out in b.buf before any is sliced out, so that
	// growing b.buf cannot leave a slice behind; offsets go in ends.
	var ends [64]int
	var starts [64]int
	n := 0
	flush := func() {
		for i := range n {
			b.pkts = append(b.pkts, b.buf[starts[i]:ends[i]])
		}
		if len(b.pkts) > 0 {
			if _, err := e.writeDevice(b.pkts, 0); err != nil && !errors.Is(err, os.ErrClosed) {
				e.log.Debug("write to device failed", "err", err)
			}
		}
		b.buf, b.pkts, n = b.buf[:0], b.pkts[:0], 0
	}
	for i := 0; i < len(payloads); {
		if len(payloads[i]) > maxPayload {
			dropped++
			i++
			continue
		}
		// A run: datagrams of the first one's size, then at most one
		// shorter; within 64 KiB of IP packet.
		run := 1
		if e.uso {
			size := len(payloads[i])
			total := hl + udpHeaderLen + size
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
		if n == len(ends) {
			flush()
		}
		starts[n] = len(b.buf)
		if run == 1 {
			b.buf = append(b.buf, make([]byte, vh+hl+udpHeaderLen+len(payloads[i]))...)
			buildUDP(b.buf[starts[n]+vh:], src, dst, payloads[i])
		} else {
			b.buf = appendUSO(b.buf, vh, hl, src, dst, payloads[i:i+run])
		}
		ends[n] = len(b.buf)
		n++
		i += run
	}
	flush()
	return dropped
}

// appendUSO appends one USO packet carrying payloads (equal sizes but for
// a shorter last one), behind a vnet header, to b. The kernel's rules
// (virtio_net_hdr_to_skb, __udp_gso_segment): the IP and UDP length fields
// cover the whole packet, and the checksum field holds the pseudo-header
// sum over that length, for each segment to be completed when cut.
func appendUSO(b []byte, vh, hl int, src, dst netip.AddrPort, payloads [][]byte) []byte {
	start := len(b)
	udpLen := udpHeaderLen
	for _, p := range payloads {
		udpLen += len(p)
	}
	b = append(b, make([]byte, vh+hl+udpHeaderLen)...)
	for _, p := range payloads {
		b = append(b, p...)
	}
	pkt := b[start+vh:]
	putIPHeader(pkt, src.Addr(), dst.Addr(), header.UDPProtocolNumber, udpLen)
	u := header.UDP(pkt[hl:])
	u.Encode(&header.UDPFields{SrcPort: src.Port(), DstPort: dst.Port(), Length: uint16(udpLen)})
	xsum := header.PseudoHeaderChecksum(header.UDPProtocolNumber, tcpipAddr(src.Addr()), tcpipAddr(dst.Addr()), uint16(udpLen))
	binary.BigEndian.PutUint16(pkt[hl+6:], xsum)
	vnetHdr{
		flags:      vnetFlagNeedsCsum,
		gsoType:    vnetGSOUDPL4,
		hdrLen:     uint16(hl + udpHeaderLen),
		gsoSize:    uint16(len(payloads[0])),
		csumStart:  uint16(hl),
		csumOffset: 6,
	}.encode(b[start:])
	return b
}
