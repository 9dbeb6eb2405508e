package stack

import (
	"io"
	"net"
	"net/netip"
	"testing"
)

// BenchmarkTCPRelay measures bytes moved from a client stack through the
// Stack and its relay to a loopback sink: the link endpoint, gVisor's TCP and
// the relay, without a TUN.
func BenchmarkTCPRelay(b *testing.B) {
	p := newPeer(b, Config{})
	port := listen(b, func(c *net.TCPConn) { io.Copy(io.Discard, c) })
	c, err := p.dial(b, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		b.Fatalf("dial: %v", err)
	}
	defer c.Close()
	buf := make([]byte, 64<<10)
	b.SetBytes(int64(len(buf)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := c.Write(buf); err != nil {
			b.Fatalf("write: %v", err)
		}
	}
}
