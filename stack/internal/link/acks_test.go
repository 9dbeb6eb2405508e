package link

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// tcpOut builds an outbound TCP packet laid out as gVisor's endpoints build
// them: headers pushed in front of the payload. The caller releases it.
func tcpOut(t *testing.T, src, dst netip.AddrPort, flags header.TCPFlags, ack uint32, payload int) *stack.PacketBuffer {
	t.Helper()
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{
		ReserveHeaderBytes: header.IPv6MinimumSize + header.TCPMinimumSize,
		Payload:            buffer.MakeWithData(make([]byte, payload)),
	})
	header.TCP(pkt.TransportHeader().Push(header.TCPMinimumSize)).Encode(&header.TCPFields{
		SrcPort: src.Port(), DstPort: dst.Port(), AckNum: ack, DataOffset: header.TCPMinimumSize,
		Flags: flags, WindowSize: 65535,
	})
	pkt.TransportProtocolNumber = header.TCPProtocolNumber
	nh := pkt.NetworkHeader().Push(packet.IPHeaderLen(dst.Addr()))
	packet.PutIPHeader(nh, src.Addr(), dst.Addr(), header.TCPProtocolNumber, header.TCPMinimumSize+payload)
	pkt.NetworkProtocolNumber = header.IPv4ProtocolNumber
	if dst.Addr().Is6() {
		pkt.NetworkProtocolNumber = header.IPv6ProtocolNumber
	}
	return pkt
}

var (
	server4 = netip.MustParseAddrPort("192.0.2.2:80")
	client4 = netip.MustParseAddrPort("198.18.0.1:40000")
	other4  = netip.MustParseAddrPort("198.18.0.1:40001")
	server6 = netip.MustParseAddrPort("[2001:db8::2]:80")
	client6 = netip.MustParseAddrPort("[fd00::1]:40000")
)

func TestClassifyAck(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		flags    header.TCPFlags
		payload  int
		want     ackKind
	}{
		{"pure ack", server4, client4, header.TCPFlagAck, 0, ackPure},
		{"pure ack ipv6", server6, client6, header.TCPFlagAck, 0, ackPure},
		{"data", server4, client4, header.TCPFlagAck | header.TCPFlagPsh, 100, ackCarried},
		{"data without psh", server6, client6, header.TCPFlagAck, 1, ackCarried},
		{"fin", server4, client4, header.TCPFlagAck | header.TCPFlagFin, 0, ackCarried},
		{"syn-ack", server4, client4, header.TCPFlagSyn | header.TCPFlagAck, 0, ackCarried},
		{"rst-ack", server4, client4, header.TCPFlagRst | header.TCPFlagAck, 0, ackCarried},
		{"rst alone", server4, client4, header.TCPFlagRst, 0, ackNone},
		{"syn alone", server6, client6, header.TCPFlagSyn, 0, ackNone},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := tcpOut(t, tc.src, tc.dst, tc.flags, 1000, tc.payload)
			defer pkt.DecRef()
			a := classifyAck(pkt)
			if a.kind != tc.want {
				t.Fatalf("kind %d, want %d", a.kind, tc.want)
			}
			if a.kind != ackNone && a.ack != 1000 {
				t.Fatalf("ack %d, want 1000", a.ack)
			}
		})
	}

	// Each direction and each flow has a key of its own.
	key := func(src, dst netip.AddrPort) tcpKey {
		pkt := tcpOut(t, src, dst, header.TCPFlagAck, 1, 0)
		defer pkt.DecRef()
		return classifyAck(pkt).key
	}
	if key(server4, client4) != key(server4, client4) {
		t.Fatal("one flow's packets have different keys")
	}
	if key(server4, client4) == key(server4, other4) || key(server4, client4) == key(client4, server4) {
		t.Fatal("two flows, or a flow's two directions, share a key")
	}

	// A UDP packet is nothing to coalescing.
	udp := stack.NewPacketBuffer(stack.PacketBufferOptions{ReserveHeaderBytes: 64})
	defer udp.DecRef()
	udp.TransportProtocolNumber = header.UDPProtocolNumber
	if classifyAck(udp).kind != ackNone {
		t.Fatal("a UDP packet classified as a TCP acknowledgement")
	}
}

// queued makes the outPacket WritePackets would queue for pkt, copied.
func queued(t *testing.T, pkt *stack.PacketBuffer) outPacket {
	t.Helper()
	defer pkt.DecRef()
	bp := getOutBuf(pkt.Size())
	for _, s := range pkt.AsSlices() {
		*bp = append(*bp, s...)
	}
	return outPacket{buf: bp, size: pkt.Size(), ack: classifyAck(pkt)}
}

func TestCoalesceAcks(t *testing.T) {
	ack := func(ack uint32) outPacket { return queued(t, tcpOut(t, server4, client4, header.TCPFlagAck, ack, 0)) }
	data := func(ack uint32) outPacket {
		return queued(t, tcpOut(t, server4, client4, header.TCPFlagAck|header.TCPFlagPsh, ack, 64))
	}
	fin := func(ack uint32) outPacket {
		return queued(t, tcpOut(t, server4, client4, header.TCPFlagAck|header.TCPFlagFin, ack, 0))
	}
	otherAck := func(ack uint32) outPacket { return queued(t, tcpOut(t, server4, other4, header.TCPFlagAck, ack, 0)) }
	for _, tc := range []struct {
		name  string
		batch []outPacket
		keep  []int // indexes into batch of the packets to be written
	}{
		{"reply carries the ack of the request", []outPacket{ack(100), data(100)}, []int{1}},
		{"later ack", []outPacket{ack(100), ack(200)}, []int{1}},
		{"fin carries it", []outPacket{ack(100), fin(100)}, []int{1}},
		{"duplicate acks all go", []outPacket{ack(100), ack(100), ack(100)}, []int{0, 1, 2}},
		{"an older ack supersedes nothing", []outPacket{ack(200), data(100)}, []int{0, 1}},
		{"another flow's packet supersedes nothing", []outPacket{ack(100), otherAck(300)}, []int{0, 1}},
		{"across another flow", []outPacket{ack(100), otherAck(5), data(100)}, []int{1, 2}},
		{"sequence wrap", []outPacket{ack(0xffffff00), data(0x10)}, []int{1}},
		{"the last ack goes", []outPacket{data(1), ack(100)}, []int{0, 1}},
		{"data is never dropped", []outPacket{data(100), data(200)}, []int{0, 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			want := make([]*[]byte, len(tc.keep))
			for i, k := range tc.keep {
				want[i] = tc.batch[k].buf
			}
			kept, removed := coalesceAcks(tc.batch)
			defer func() {
				for i := range kept {
					kept[i].release()
				}
			}()
			if removed != len(tc.batch)-len(tc.keep) || len(kept) != len(want) {
				t.Fatalf("kept %d, removed %d; want %d kept", len(kept), removed, len(want))
			}
			for i := range kept {
				if kept[i].buf != want[i] {
					t.Fatalf("packet %d kept is not the one expected (order or choice)", i)
				}
			}
		})
	}

	// The look-ahead is bounded: a superseding packet too far along does
	// not make a long batch quadratic.
	batch := []outPacket{ack(100)}
	for i := range ackLookahead {
		batch = append(batch, otherAck(uint32(i)))
	}
	batch = append(batch, data(100))
	first := batch[0].buf
	kept, _ := coalesceAcks(batch)
	firstKept := kept[0].buf == first
	for i := range kept {
		kept[i].release()
	}
	if !firstKept {
		t.Fatalf("a pure ACK removed for a packet %d places on", ackLookahead+1)
	}
}
