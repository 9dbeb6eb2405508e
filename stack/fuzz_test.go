package stack

import (
	"encoding/binary"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
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
		p.st.link.deliver(pkt, inboundPlain)
		if _, _, msg, ok := parseEcho(pkt); ok && len(msg) < icmpEchoLen {
			t.Fatalf("parseEcho accepted a %d-byte message", len(msg))
		}
	})
}

// FuzzInboundVnetFrame feeds arbitrary frames as a device with a vnet header
// returns them: any header with any packet. Whatever prepareInbound lets
// through must be safe for the stack, and a packet whose partial checksum
// it completed must then verify.
func FuzzInboundVnetFrame(f *testing.F) {
	client := netip.MustParseAddrPort("198.18.0.1:40000")
	server := netip.MustParseAddrPort("192.0.2.2:80")
	seg := make([]byte, header.IPv4MinimumSize+header.TCPMinimumSize+3000)
	putIPHeader(seg, client.Addr(), server.Addr(), header.TCPProtocolNumber, len(seg)-header.IPv4MinimumSize)
	header.TCP(seg[header.IPv4MinimumSize:]).Encode(&header.TCPFields{SrcPort: client.Port(), DstPort: server.Port(), DataOffset: header.TCPMinimumSize, Flags: header.TCPFlagAck, WindowSize: 1000})
	var h [vnetHdrLen]byte
	vnetHdr{flags: vnetFlagNeedsCsum, gsoType: vnetGSOTCPv4, hdrLen: 40, gsoSize: 1460, csumStart: 20, csumOffset: 16}.encode(h[:])
	f.Add(append(h[:], seg...))
	var udp [ipv6HeaderLen + udpHeaderLen + 16]byte
	d := buildUDP(udp[:], netip.MustParseAddrPort("198.18.0.1:5353"), netip.MustParseAddrPort("192.0.2.2:53"), []byte("0123456789abcdef"))
	vnetHdr{flags: vnetFlagNeedsCsum, csumStart: 20, csumOffset: 6}.encode(h[:])
	f.Add(append(h[:], d...))
	f.Add([]byte{1, 4, 0, 0})

	p := newPeer(f, Config{UDP: &loopbackUDP{}, ForwardPing: true, MaxUDPFlows: 16})
	f.Fuzz(func(t *testing.T, frame []byte) {
		if len(frame) > vnetHdrLen+maxPacket {
			return
		}
		hdr, ok := decodeVnetHdr(frame)
		if !ok {
			return
		}
		pkt := frame[vnetHdrLen:]
		// The field held the pseudo-header sum, which a receiver adds
		// back when it verifies.
		start, at := int(hdr.csumStart), int(hdr.csumStart)+int(hdr.csumOffset)
		var pseudo uint16
		if at+2 <= len(pkt) {
			pseudo = binary.BigEndian.Uint16(pkt[at:])
		}
		kind := prepareInbound(hdr, pkt)
		if kind == inboundDrop {
			return
		}
		if kind == inboundValidated && hdr.flags&vnetFlagNeedsCsum != 0 && hdr.gsoType&^vnetGSOECN == vnetGSONone {
			if got := checksum.Checksum(pkt[start:], pseudo); got != 0xffff {
				t.Fatalf("completed checksum verifies to %#04x, want 0xffff", got)
			}
		}
		p.st.link.deliver(pkt, kind)
	})
}
