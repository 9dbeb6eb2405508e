package tundev

import (
	"bytes"
	"encoding/binary"
	"testing"

	"github.com/netstackd/netstackd/internal/device"
)

// udpPacket builds an IPv4 or IPv6 UDP packet with valid checksums.
func udpPacket(v6 bool, payload []byte) []byte {
	hl := ipv4HeaderLen
	if v6 {
		hl = ipv6HeaderLen
	}
	p := make([]byte, hl+udpHeaderLen+len(payload))
	copy(p[hl+udpHeaderLen:], payload)
	var sum uint64
	if v6 {
		p[0] = 6 << 4
		binary.BigEndian.PutUint16(p[4:], uint16(udpHeaderLen+len(payload)))
		p[6], p[7] = protoUDP, 64
		copy(p[8:24], []byte{0xfd, 0, 0x18, 0x98, 15: 1})
		copy(p[24:40], []byte{0xfd, 0, 0x18, 0x98, 15: 2})
		sum = pseudoHeaderSum(p[8:24], p[24:40], protoUDP, udpHeaderLen+len(payload))
	} else {
		p[0] = 0x45
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		p[8], p[9] = 64, protoUDP
		copy(p[12:16], []byte{198, 18, 0, 1})
		copy(p[16:20], []byte{198, 18, 0, 2})
		setIPv4Checksum(p)
		sum = pseudoHeaderSum(p[12:16], p[16:20], protoUDP, udpHeaderLen+len(payload))
	}
	u := p[hl:]
	binary.BigEndian.PutUint16(u[0:], 5353)
	binary.BigEndian.PutUint16(u[2:], 53)
	binary.BigEndian.PutUint16(u[4:], uint16(udpHeaderLen+len(payload)))
	binary.BigEndian.PutUint16(u[6:], ^fold(sumBytes(u, sum)))
	return p
}

// udpValid checks a datagram's lengths and checksums and returns its
// payload.
func udpValid(t *testing.T, p []byte) []byte {
	t.Helper()
	var hl int
	var sum uint64
	if p[0]>>4 == 4 {
		hl = int(p[0]&0xf) * 4
		if fold(sumBytes(p[:hl], 0)) != 0xffff {
			t.Fatalf("ipv4 header checksum wrong")
		}
		if int(binary.BigEndian.Uint16(p[2:])) != len(p) {
			t.Fatalf("ipv4 total length %d, packet %d", binary.BigEndian.Uint16(p[2:]), len(p))
		}
		sum = pseudoHeaderSum(p[12:16], p[16:20], protoUDP, len(p)-hl)
	} else {
		hl = ipv6HeaderLen
		if int(binary.BigEndian.Uint16(p[4:])) != len(p)-hl {
			t.Fatalf("ipv6 payload length %d, packet %d", binary.BigEndian.Uint16(p[4:]), len(p))
		}
		sum = pseudoHeaderSum(p[8:24], p[24:40], protoUDP, len(p)-hl)
	}
	u := p[hl:]
	if int(binary.BigEndian.Uint16(u[4:])) != len(u) {
		t.Fatalf("udp length %d, segment %d", binary.BigEndian.Uint16(u[4:]), len(u))
	}
	if fold(sumBytes(u, sum)) != 0xffff {
		t.Fatalf("udp checksum wrong")
	}
	return u[udpHeaderLen:]
}

// batchOf makes a read batch of n buffers on a vnet device.
func batchOf(n int) (*queue, *readBatch) {
	d := &Device{vnet: true}
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, device.ReadOffset+device.MaxPacket)
	}
	q := &queue{}
	q.rb = readBatch{d: d, bufs: bufs, sizes: make([]int, n), metas: make([]device.Meta, n), offset: device.ReadOffset}
	return q, &q.rb
}

// frame puts a vnet header h and pkt where the batch reads its next frame,
// and returns the frame's length.
func frame(b *readBatch, h vnetHdr, pkt []byte) int {
	f := b.frame()
	h.encode(f)
	return VnetHdrLen + copy(f[VnetHdrLen:], pkt)
}

// TestSplitUSO: a run of datagrams sent with UDP_SEGMENT comes out as
// datagrams, whole and in order, across reads when the buffers run out.
func TestSplitUSO(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, bufs := range []int{16, 3, 1} {
			const segs, size = 7, 100
			payload := make([]byte, segs*size-37) // a shorter last datagram
			for i := range payload {
				payload[i] = byte(i)
			}
			pkt := udpPacket(v6, payload)
			q, b := batchOf(bufs)
			hl := ipv4HeaderLen
			if v6 {
				hl = ipv6HeaderLen
			}
			n := frame(b, vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOUDPL4, hdrLen: uint16(hl + udpHeaderLen),
				gsoSize: size, csumStart: uint16(hl), csumOffset: 6}, pkt)
			q.take(b, n)
			var got []byte
			datagrams := 0
			for {
				for i := range b.count {
					if !b.metas[i].Verified || b.metas[i].GSO != device.GSONone {
						t.Fatalf("datagram meta %+v, want verified and whole", b.metas[i])
					}
					got = append(got, udpValid(t, b.bufs[i][b.offset:b.offset+b.sizes[i]])...)
					datagrams++
				}
				if !q.rest.pending() {
					break
				}
				b.count, b.full = 0, false
				q.rest.emit(b)
			}
			if datagrams != segs || !bytes.Equal(got, payload) {
				t.Errorf("v6=%v bufs=%d: %d datagrams carrying %d bytes, want %d carrying %d in order", v6, bufs, datagrams, len(got), segs, len(payload))
			}
		}
	}
}

// TestInboundVnet: what each kind of header makes of a packet.
func TestInboundVnet(t *testing.T) {
	pkt := udpPacket(false, []byte("hello"))
	partial := bytes.Clone(pkt)
	binary.BigEndian.PutUint16(partial[ipv4HeaderLen+6:], fold(pseudoHeaderSum(partial[12:16], partial[16:20], protoUDP, len(partial)-ipv4HeaderLen)))
	seg := bytes.Clone(pkt)
	seg[9] = protoTCP
	for _, tc := range []struct {
		name string
		h    vnetHdr
		pkt  []byte
		ok   bool
		want device.Meta
	}{
		{"plain", vnetHdr{}, pkt, true, device.Meta{}},
		{"data valid", vnetHdr{flags: vnetFlagDataValid}, pkt, true, device.Meta{Verified: true}},
		{"partial checksum", vnetHdr{flags: vnetFlagNeedsCsum, csumStart: ipv4HeaderLen, csumOffset: 6}, partial, true, device.Meta{Verified: true}},
		{"odd checksum offset", vnetHdr{flags: vnetFlagNeedsCsum, csumStart: ipv4HeaderLen, csumOffset: 5}, partial, false, device.Meta{}},
		{"tcp segment", vnetHdr{gsoType: vnetGSOTCPv4 | vnetGSOECN, gsoSize: 1448}, seg, true, device.Meta{GSO: device.GSOTCPv4, GSOSize: 1448, Verified: true}},
		{"tcp segment that is udp", vnetHdr{gsoType: vnetGSOTCPv4, gsoSize: 1448}, pkt, false, device.Meta{}},
		{"uso without size", vnetHdr{gsoType: vnetGSOUDPL4}, pkt, false, device.Meta{}},
		{"ufo", vnetHdr{gsoType: 3}, pkt, false, device.Meta{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := bytes.Clone(tc.pkt)
			m, ok := tc.h.inbound(p)
			if ok != tc.ok || ok && m != tc.want {
				t.Fatalf("inbound = %+v, %v; want %+v, %v", m, ok, tc.want, tc.ok)
			}
			if tc.name == "partial checksum" {
				udpValid(t, p)
			}
		})
	}
}

// TestEncodeVnetHdr: the header written for each kind of packet says what
// the kernel's virtio_net_hdr_to_skb needs.
func TestEncodeVnetHdr(t *testing.T) {
	for _, tc := range []struct {
		m    device.Meta
		want vnetHdr
	}{
		{device.Meta{}, vnetHdr{}},
		{device.Meta{NeedsCsum: true, CsumStart: 20, CsumOffset: 16}, vnetHdr{flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 16}},
		{device.Meta{GSO: device.GSOTCPv6, GSOSize: 1440, HdrLen: 60, NeedsCsum: true, CsumStart: 40, CsumOffset: 16},
			vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOTCPv6, hdrLen: 60, gsoSize: 1440, csumStart: 40, csumOffset: 16}},
		{device.Meta{GSO: device.GSOUDP, GSOSize: 1200, HdrLen: 28, NeedsCsum: true, CsumStart: 20, CsumOffset: 6},
			vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOUDPL4, hdrLen: 28, gsoSize: 1200, csumStart: 20, csumOffset: 6}},
	} {
		var b [VnetHdrLen]byte
		encodeVnetHdr(b[:], tc.m)
		if got, _ := decodeVnetHdr(b[:]); got != tc.want {
			t.Errorf("encode %+v = %+v, want %+v", tc.m, got, tc.want)
		}
	}
}

// FuzzReadFrame feeds any frame to what a read does with it: nothing
// panics, every packet handed out fits its buffer, and no more packets than
// buffers come out of one read.
func FuzzReadFrame(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x45})
	uso := make([]byte, VnetHdrLen)
	vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOUDPL4, hdrLen: 28, gsoSize: 10, csumStart: 20, csumOffset: 6}.encode(uso)
	f.Add(append(uso, udpPacket(false, make([]byte, 95))...))
	tso := make([]byte, VnetHdrLen)
	vnetHdr{gsoType: vnetGSOTCPv6, gsoSize: 1000}.encode(tso)
	f.Add(append(tso, udpPacket(true, make([]byte, 50))...))
	f.Fuzz(func(t *testing.T, fr []byte) {
		if len(fr) > device.MaxPacket {
			return
		}
		for _, bufs := range []int{1, 4} {
			q, b := batchOf(bufs)
			n := copy(b.frame(), fr)
			q.take(b, n)
			for rounds := 0; ; rounds++ {
				if b.count > len(b.bufs) {
					t.Fatalf("%d packets from %d buffers", b.count, len(b.bufs))
				}
				for i := range b.count {
					if b.sizes[i] < 0 || b.offset+b.sizes[i] > len(b.bufs[i]) {
						t.Fatalf("packet %d: size %d past its buffer", i, b.sizes[i])
					}
				}
				if !q.rest.pending() || rounds > device.MaxPacket {
					break
				}
				b.count, b.full = 0, false
				q.rest.emit(b)
			}
		}
	})
}

// TestSumBytes checks the eight-bytes-at-a-time sum against the definition:
// 16-bit big-endian words added with end-around carry (RFC 1071).
func TestSumBytes(t *testing.T) {
	ref := func(b []byte, sum uint64) uint16 {
		for len(b) >= 2 {
			sum += uint64(binary.BigEndian.Uint16(b))
			b = b[2:]
		}
		if len(b) == 1 {
			sum += uint64(b[0]) << 8
		}
		for sum > 0xffff {
			sum = sum>>16 + sum&0xffff
		}
		return uint16(sum)
	}
	b := make([]byte, 300)
	for i := range b {
		b[i] = byte(i*7 + 3)
	}
	for _, fill := range []byte{0x00, 0xff} {
		for n := range len(b) {
			p := b[:n]
			if fill == 0xff {
				p = bytes.Repeat([]byte{0xff}, n)
			}
			for _, init := range []uint64{0, 1, 0xffff, 0x1fffe, 0xffffffff} {
				if got, want := fold(sumBytes(p, init)), ref(p, init); got != want {
					t.Fatalf("fill %#x, %d bytes, initial %#x: sum %#x, want %#x", fill, n, init, got, want)
				}
			}
		}
	}
}

// BenchmarkSumBytes: the checksum a partial-checksum packet from the client
// costs, for an MSS of payload.
func BenchmarkSumBytes(b *testing.B) {
	buf := make([]byte, 1448)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		_ = fold(sumBytes(buf, 0))
	}
}
