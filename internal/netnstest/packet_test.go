package netnstest

import (
	"bytes"
	"net/netip"
	"testing"
)

func TestUDPPacket(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		payload  string
	}{
		{"ipv4", netip.MustParseAddrPort("198.18.0.5:53"), netip.MustParseAddrPort("198.18.0.1:40000"), "pong"},
		{"ipv4 odd length", netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:2"), "odd"},
		{"ipv4 empty", netip.MustParseAddrPort("10.0.0.1:1"), netip.MustParseAddrPort("10.0.0.2:2"), ""},
		{"ipv6", netip.MustParseAddrPort("[fd00:1898::5]:53"), netip.MustParseAddrPort("[fd00:1898::1]:40000"), "pong"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := UDPPacket(tc.src, tc.dst, []byte(tc.payload))
			src, dst, payload, ok := ParseUDP(pkt)
			if !ok || src != tc.src || dst != tc.dst || string(payload) != tc.payload {
				t.Fatalf("ParseUDP = %s, %s, %q, %v; want %s, %s, %q, true", src, dst, payload, ok, tc.src, tc.dst, tc.payload)
			}
			// A correct one's-complement checksum sums to all ones.
			hl := ipv6HeaderLen
			if tc.src.Addr().Is4() {
				hl = ipv4HeaderLen
				if got := checksum(0, pkt[:hl]); got != 0xffff {
					t.Errorf("IPv4 header sums to %#x, want 0xffff", got)
				}
			}
			udp := pkt[hl:]
			if got := checksum(pseudoHeaderSum(tc.src.Addr(), tc.dst.Addr(), len(udp)), udp); got != 0xffff {
				t.Errorf("UDP datagram sums to %#x, want 0xffff", got)
			}
		})
	}
}

func FuzzParseUDP(f *testing.F) {
	f.Add(UDPPacket(netip.MustParseAddrPort("198.18.0.5:53"), netip.MustParseAddrPort("198.18.0.1:4"), []byte("x")))
	f.Add(UDPPacket(netip.MustParseAddrPort("[fd00::5]:53"), netip.MustParseAddrPort("[fd00::1]:4"), []byte("xy")))
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0xff, 0xff, 17})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		src, dst, payload, ok := ParseUDP(pkt)
		if !ok {
			return
		}
		// Property: what parses rebuilds into a packet that parses the same.
		again := UDPPacket(src, dst, payload)
		src2, dst2, payload2, ok2 := ParseUDP(again)
		if !ok2 || src2 != src || dst2 != dst || !bytes.Equal(payload2, payload) {
			t.Fatalf("rebuilt packet parses as %s, %s, %q, %v; want %s, %s, %q", src2, dst2, payload2, ok2, src, dst, payload)
		}
	})
}
