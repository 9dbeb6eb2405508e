package stack

import (
	"bytes"
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// TestInboundPayloadViews checks how an inbound packet is laid out in
// gVisor's buffer: a packet with a long payload has its IP header in a view
// of its own (so gVisor's re-read of the header copies the header, not the
// packet), a short or malformed one stays in one view, and the bytes are
// the packet's either way.
func TestInboundPayloadViews(t *testing.T) {
	v4 := func(ihl byte, total int) []byte {
		p := make([]byte, total)
		p[0] = 0x40 | ihl
		for i := 20; i < total; i++ {
			p[i] = byte(i)
		}
		return p
	}
	v6 := make([]byte, header.IPv6MinimumSize+1400)
	v6[0] = 0x60
	for _, tc := range []struct {
		name      string
		pkt       []byte
		headerLen int // 0: one view
	}{
		{"ipv4 long", v4(5, 20+splitPayloadMin), 20},
		{"ipv4 options long", v4(15, 60+4000), 60},
		{"ipv4 short", v4(5, 20+splitPayloadMin-1), 0},
		{"ipv4 bad ihl", v4(2, 1500), 0},
		{"ipv4 ihl past the end", v4(15, 40), 0},
		{"ipv6 long", v6, header.IPv6MinimumSize},
		{"ipv4 segment", v4(5, 65535), 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := inboundPayload(tc.pkt)
			defer b.Release()
			if got := b.Flatten(); !bytes.Equal(got, tc.pkt) {
				t.Fatalf("buffer holds other bytes than the packet")
			}
			var sizes []int
			b.Apply(func(v *buffer.View) { sizes = append(sizes, v.Size()) })
			switch {
			case tc.headerLen == 0 && len(sizes) != 1:
				t.Fatalf("views %v, want the packet in one", sizes)
			case tc.headerLen != 0 && (len(sizes) < 2 || sizes[0] != tc.headerLen):
				t.Fatalf("views %v, want the %d-byte header alone first", sizes, tc.headerLen)
			}
		})
	}
}
