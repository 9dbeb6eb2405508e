package stack

import (
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// FuzzInboundPacket feeds arbitrary bytes to the stack as if read from the
// TUN: whatever a client (or a hostile program in the namespace) writes, the
// daemon must not crash. Each packet goes through the test device, so it
// takes the whole inbound path (the link's checks, handlePacket, gVisor),
// and the next is sent only once the dispatcher has delivered it.
func FuzzInboundPacket(f *testing.F) {
	var udp [packet.IPv6HeaderLen + packet.UDPHeaderLen + 16]byte
	client := netip.MustParseAddrPort("198.18.0.1:5353")
	server := netip.MustParseAddrPort("192.0.2.2:53")
	f.Add(append([]byte(nil), packet.BuildUDP(udp[:], client, server, []byte("0123456789abcdef"))...))
	f.Add(append([]byte(nil), packet.BuildUDP(udp[:], netip.MustParseAddrPort("[fd00:1898::1]:1000"), netip.MustParseAddrPort("[2001:db8::2]:9"), []byte("x"))...))
	var icmp [packet.ICMPQuoteLen + 2*header.IPv6MinimumSize]byte
	f.Add(append([]byte(nil), packet.BuildPortUnreachable(icmp[:], server.Addr(), client.Addr(), udp[:28])...))
	syn := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	packet.PutIPHeader(syn, client.Addr(), server.Addr(), header.TCPProtocolNumber, header.TCPMinimumSize)
	header.TCP(syn[header.IPv4MinimumSize:]).Encode(&header.TCPFields{SrcPort: 1, DstPort: 80, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 1000})
	f.Add(syn)
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 58, 64})

	// The stack's replies are drained, so its writes never block.
	p := newPeer(f, Config{UDP: &loopbackUDP{}, ForwardPing: true, MaxUDPFlows: 16})
	far := p.dev.far[0]
	f.Fuzz(func(t *testing.T, pkt []byte) {
		// An empty message reads as the far end's close.
		if len(pkt) == 0 || len(pkt) > device.MaxPacket {
			return
		}
		before := p.st.link.QueueReads()[0]
		if _, err := unix.Write(far, pkt); err != nil {
			t.Skipf("socketpair refused the packet: %v", err)
		}
		for deadline := time.Now().Add(5 * time.Second); p.st.link.QueueReads()[0] == before; {
			if time.Now().After(deadline) {
				t.Fatalf("the stack did not read a %d-byte packet", len(pkt))
			}
			time.Sleep(10 * time.Microsecond)
		}
		select {
		case <-p.st.Done():
			t.Fatalf("the stack stopped serving: %v", p.st.Err())
		default:
		}
		if _, _, msg, ok := packet.ParseEcho(pkt); ok && len(msg) < header.ICMPv4MinimumSize {
			t.Fatalf("ParseEcho accepted a %d-byte message", len(msg))
		}
	})
}
