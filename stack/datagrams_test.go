package stack

import (
	"bytes"
	"fmt"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestUSORoundTrip: a USO packet built for the kernel, cut as the kernel
// cuts it, gives back every datagram intact with true lengths and
// checksums.
func TestUSORoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name  string
		sizes []int
	}{
		{"equal", []int{1400, 1400, 1400}},
		{"short last", []int{1200, 1200, 7}},
		{"one", []int{100}},
		{"many small", []int{1, 1, 1, 1, 1, 1, 1, 1}},
	} {
		for _, fam := range []struct{ src, dst string }{
			{"192.0.2.2:53", "198.18.0.1:4000"},
			{"[2001:db8::2]:53", "[fd00:1898::1]:4000"},
		} {
			t.Run(fmt.Sprintf("%s/%s", tc.name, fam.src), func(t *testing.T) {
				checkUSORoundTrip(t, netip.MustParseAddrPort(fam.src), netip.MustParseAddrPort(fam.dst), tc.sizes)
			})
		}
	}
}

func checkUSORoundTrip(t *testing.T, src, dst netip.AddrPort, sizes []int) {
	var payloads [][]byte
	for i, n := range sizes {
		payloads = append(payloads, bytes.Repeat([]byte{byte('a' + i)}, n))
	}
	hl := ipHeaderLen(dst.Addr())
	frame := appendUSO(nil, vnetHdrLen, hl, src, dst, payloads)
	h, ok := decodeVnetHdr(frame)
	if !ok || prepareInbound(h, frame[vnetHdrLen:]) != inboundDatagrams {
		t.Fatalf("header %+v not taken as datagrams", h)
	}
	var got [][]byte
	ok = splitDatagrams(frame[vnetHdrLen:], int(h.gsoSize), make([]byte, maxPacket), func(pkt []byte) {
		if !checksumsValid(pkt) {
			t.Errorf("datagram %d: checksums do not verify", len(got))
		}
		s, d, p, ok := parseTestUDP(pkt)
		if !ok || s != src || d != dst {
			t.Errorf("datagram %d: %s→%s (parsed %v), want %s→%s", len(got), s, d, ok, src, dst)
		}
		got = append(got, bytes.Clone(p))
	})
	if !ok {
		t.Fatal("splitDatagrams refused its own packet")
	}
	if len(got) != len(payloads) {
		t.Fatalf("%d datagrams, want %d", len(got), len(payloads))
	}
	for i := range got {
		if !bytes.Equal(got[i], payloads[i]) {
			t.Errorf("datagram %d: %d bytes differ from the %d sent", i, len(got[i]), len(payloads[i]))
		}
	}
}

// parseTestUDP reads an IPv4 or IPv6 UDP packet, checking its lengths.
func parseTestUDP(pkt []byte) (src, dst netip.AddrPort, payload []byte, ok bool) {
	var hl int
	var s, d netip.Addr
	switch header.IPVersion(pkt) {
	case 4:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || int(ip.TotalLength()) != len(pkt) {
			return
		}
		hl = int(ip.HeaderLength())
		s, d = netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4())
	case 6:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || int(ip.PayloadLength())+header.IPv6MinimumSize != len(pkt) {
			return
		}
		hl = header.IPv6MinimumSize
		s, d = netip.AddrFrom16(ip.SourceAddress().As16()), netip.AddrFrom16(ip.DestinationAddress().As16())
	default:
		return
	}
	u := header.UDP(pkt[hl:])
	if int(u.Length()) != len(pkt)-hl {
		return
	}
	return netip.AddrPortFrom(s, u.SourcePort()), netip.AddrPortFrom(d, u.DestinationPort()), pkt[hl+udpHeaderLen:], true
}

// FuzzSplitDatagrams cuts arbitrary USO packets: nothing panics, nothing
// longer than the scratch buffer comes out, and what comes out verifies.
func FuzzSplitDatagrams(f *testing.F) {
	src, dst := netip.MustParseAddrPort("192.0.2.2:53"), netip.MustParseAddrPort("198.18.0.1:4000")
	f.Add(appendUSO(nil, 0, ipv4HeaderLen, src, dst, [][]byte{[]byte("hello"), []byte("hel")}), uint16(5))
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 17, 64}, uint16(1))
	f.Fuzz(func(t *testing.T, pkt []byte, gsoSize uint16) {
		if len(pkt) > maxPacket {
			return
		}
		scratch := make([]byte, 2048)
		splitDatagrams(pkt, int(gsoSize), scratch, func(out []byte) {
			if len(out) > len(scratch) {
				t.Fatalf("datagram of %d bytes from a %d-byte buffer", len(out), len(scratch))
			}
			if !checksumsValid(out) {
				t.Fatalf("datagram does not verify: % x", out)
			}
		})
	})
}
