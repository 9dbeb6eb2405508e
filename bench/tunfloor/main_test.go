package main

import (
	"bytes"
	"net/netip"
	"testing"
)

// checksumOK says whether b, with its checksum field filled in, sums to
// all ones, starting from acc.
func checksumOK(b []byte, acc uint32) bool { return fold(sum(b, acc)) == 0xffff }

func TestSegmentRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name           string
		client, server netip.AddrPort
		ipHdr          int
	}{
		{"ipv4", netip.MustParseAddrPort("198.18.0.1:40000"), netip.MustParseAddrPort("192.0.2.2:7000"), 20},
		{"ipv6", netip.MustParseAddrPort("[fc00:ba7::1]:40000"), netip.MustParseAddrPort("[2001:db8:1::2]:7000"), 40},
	} {
		t.Run(tc.name, func(t *testing.T) {
			payload := []byte("GET / HTTP/1.0\r\n\r\n!") // odd length: the checksum pads
			s := segment{srcPort: tc.client.Port(), dstPort: tc.server.Port(), seq: 7, ack: 9, flags: flagAck | flagPsh, mss: true, payload: payload}
			pkt := s.appendTo(nil, tc.client.Addr(), tc.server.Addr())

			in, ok := parse(pkt)
			if !ok {
				t.Fatalf("parse rejects a segment appendTo built: % x", pkt)
			}
			want := inbound{client: tc.client, server: tc.server, seq: 7, ack: 9, flags: flagAck | flagPsh, data: payload}
			if in.client != want.client || in.server != want.server || in.seq != want.seq || in.ack != want.ack ||
				in.flags != want.flags || !bytes.Equal(in.data, want.data) {
				t.Fatalf("parse = %+v, want %+v", in, want)
			}

			if tc.ipHdr == 20 && !checksumOK(pkt[:20], 0) {
				t.Error("IPv4 header checksum does not verify")
			}
			tcp := pkt[tc.ipHdr:]
			acc := sum(tc.client.Addr().AsSlice(), 0)
			acc = sum(tc.server.Addr().AsSlice(), acc)
			acc += 6 + uint32(len(tcp))
			if !checksumOK(tcp, acc) {
				t.Error("TCP checksum does not verify")
			}
		})
	}
}

func TestParseRejects(t *testing.T) {
	good := segment{srcPort: 1, dstPort: 2, flags: flagSyn}.appendTo(nil,
		netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("192.0.2.2"))
	if _, ok := parse(good); !ok {
		t.Fatal("parse rejects a good SYN")
	}
	udp := bytes.Clone(good)
	udp[9] = 17
	badOffset := bytes.Clone(good)
	badOffset[20+12] = 4 << 4 // a TCP header shorter than 20 bytes
	longOffset := bytes.Clone(good)
	longOffset[20+12] = 15 << 4 // longer than the segment
	longTotal := bytes.Clone(good)
	longTotal[3] = 200 // the IPv4 total length claims more than was read
	for name, pkt := range map[string][]byte{
		"empty":            nil,
		"version 5":        {0x50},
		"truncated ipv4":   good[:19],
		"truncated tcp":    good[:30],
		"udp":              udp,
		"short tcp offset": badOffset,
		"long tcp offset":  longOffset,
		"long total":       longTotal,
		"truncated ipv6":   append([]byte{0x60}, make([]byte, 38)...),
	} {
		if in, ok := parse(pkt); ok {
			t.Errorf("%s: parse = %+v, want rejected", name, in)
		}
	}
}

func FuzzParse(f *testing.F) {
	f.Add(segment{srcPort: 1, dstPort: 2, flags: flagSyn, mss: true}.appendTo(nil,
		netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("192.0.2.2")))
	f.Add(segment{srcPort: 1, dstPort: 2, flags: flagAck, payload: []byte("x")}.appendTo(nil,
		netip.MustParseAddr("fc00::1"), netip.MustParseAddr("2001:db8::2")))
	f.Fuzz(func(t *testing.T, pkt []byte) {
		in, ok := parse(pkt)
		if !ok {
			return
		}
		if len(in.data) > len(pkt) {
			t.Fatalf("data of %d bytes from a packet of %d", len(in.data), len(pkt))
		}
		// What parse accepts, the floor answers: building the answer
		// must not fail either.
		s := segment{srcPort: in.server.Port(), dstPort: in.client.Port(), seq: in.ack, ack: in.seq + 1, flags: flagAck}
		if out := s.appendTo(nil, in.server.Addr(), in.client.Addr()); len(out) == 0 {
			t.Fatal("empty answer")
		}
	})
}
