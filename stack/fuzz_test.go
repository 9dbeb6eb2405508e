package stack

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// FuzzInboundPacket feeds arbitrary bytes to the stack as if read from the
// TUN: whatever a client (or a hostile program in the namespace) writes, the
// daemon must not crash.
func FuzzInboundPacket(f *testing.F) {
	var udp [ipv6HeaderLen + udpHeaderLen + 16]byte
	client := netip.MustParseAddrPort("198.18.0.1:5353")
	server := netip.MustParseAddrPort("192.0.2.2:53")
	f.Add(append([]byte(nil), buildUDP(udp[:], client, server, []byte("0123456789abcdef"))...))
	f.Add(append([]byte(nil), buildUDP(udp[:], netip.MustParseAddrPort("[fd00:1898::1]:1000"), netip.MustParseAddrPort("[2001:db8::2]:9"), []byte("x"))...))
	var icmp [ipv6HeaderLen + 8 + 64]byte
	f.Add(append([]byte(nil), buildPortUnreachable(icmp[:], server.Addr(), client.Addr(), udp[:28])...))
	syn := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize)
	putIPHeader(syn, client.Addr(), server.Addr(), header.TCPProtocolNumber, header.TCPMinimumSize)
	header.TCP(syn[header.IPv4MinimumSize:]).Encode(&header.TCPFields{SrcPort: 1, DstPort: 80, DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagSyn, WindowSize: 1000})
	f.Add(syn)
	f.Add([]byte{0x45})
	f.Add([]byte{0x60, 0, 0, 0, 0, 8, 58, 64})

	p := newPeer(f, Config{UDP: &loopbackUDP{}, ForwardPing: true, MaxUDPFlows: 16})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		if len(pkt) > maxPacket {
			return
		}
		p.st.link.deliver(pkt)
		if _, _, msg, ok := parseEcho(pkt); ok && len(msg) < icmpEchoLen {
			t.Fatalf("parseEcho accepted a %d-byte message", len(msg))
		}
	})
}
