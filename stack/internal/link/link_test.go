package link

import (
	"bytes"
	"slices"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestInboundPayloadViews checks how an inbound packet is laid out in
// gVisor's buffer: a packet with a long payload has its IP header, and its
// TCP header, each in a view of its own (so gVisor's re-reads of headers copy
// a header, not the packet), a short or malformed one stays in one view, and
// the bytes are the packet's either way.
func TestInboundPayloadViews(t *testing.T) {
	// ip builds a packet: IPv4 with the given IHL, or IPv6 for ihl 0, with
	// the given transport protocol and TCP data offset (in 32-bit words).
	ip := func(ihl byte, proto uint8, tcpWords byte, total int) []byte {
		p := make([]byte, total)
		for i := range p {
			p[i] = byte(i)
		}
		hlen := int(ihl) * 4
		if ihl == 0 {
			hlen = header.IPv6MinimumSize
			p[0], p[6] = 0x60, proto
		} else {
			p[0], p[9] = 0x40|ihl, proto
		}
		if hlen+12 < total {
			p[hlen+12] = tcpWords << 4
		}
		return p
	}
	const tcp, udp = uint8(header.TCPProtocolNumber), uint8(header.UDPProtocolNumber)
	for _, tc := range []struct {
		name  string
		pkt   []byte
		views []int // the leading views' sizes; nil: one view
	}{
		{"ipv4 tcp", ip(5, tcp, 5, 20+20+splitPayloadMin), []int{20, 20}},
		{"ipv4 options, tcp options", ip(15, tcp, 15, 60+4000), []int{60, 60}},
		{"ipv4 tcp bad data offset", ip(5, tcp, 4, 1500), []int{20}},
		{"ipv4 udp", ip(5, udp, 0, 1500), []int{20}},
		{"ipv4 short", ip(5, tcp, 5, 20+splitPayloadMin-1), nil},
		{"ipv4 bad ihl", ip(2, tcp, 5, 1500), nil},
		{"ipv4 ihl past the end", ip(15, tcp, 5, 40), nil},
		{"ipv6 tcp", ip(0, tcp, 8, 40+1400), []int{40, 32}},
		{"ipv6 udp", ip(0, udp, 0, 40+1400), []int{40}},
		{"ipv4 tcp segment", ip(5, tcp, 5, 65535), []int{20, 20}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := inboundPayload(tc.pkt)
			defer b.Release()
			if got := b.Flatten(); !bytes.Equal(got, tc.pkt) {
				t.Fatalf("buffer holds other bytes than the packet")
			}
			var sizes []int
			b.Apply(func(v *buffer.View) { sizes = append(sizes, v.Size()) })
			want := len(tc.views) + 1
			if tc.views == nil {
				want = 1
			}
			if len(sizes) != want || !slices.Equal(sizes[:len(tc.views)], tc.views) {
				t.Fatalf("views %v, want %v then the rest", sizes, tc.views)
			}
		})
	}
}
