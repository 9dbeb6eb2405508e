package packet

import (
	"bytes"
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

var (
	client4 = netip.MustParseAddrPort("198.18.0.1:40000")
	server4 = netip.MustParseAddrPort("192.0.2.7:53")
	client6 = netip.MustParseAddrPort("[fd00:1898::1]:40000")
	server6 = netip.MustParseAddrPort("[2001:db8::7]:53")
)

// TestUDPRoundTrip: what BuildUDP builds, ParseUDP reads back field for
// field, with a valid checksum, and ChecksumsValid agrees.
func TestUDPRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.AddrPort
		payload  []byte
	}{
		{"ipv4", client4, server4, []byte("query")},
		{"ipv4 odd", client4, server4, []byte("odd")},
		{"ipv4 empty", client4, server4, nil},
		{"ipv6", client6, server6, bytes.Repeat([]byte{0xab}, 1200)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := BuildUDP(make([]byte, Headroom+len(tc.payload)), tc.src, tc.dst, tc.payload)
			u, ok := ParseUDP(pkt)
			if !ok {
				t.Fatal("ParseUDP refused a packet BuildUDP built")
			}
			if u.Src != tc.src || u.Dst != tc.dst || !bytes.Equal(u.Payload, tc.payload) {
				t.Errorf("parsed %s -> %s %q, want %s -> %s %q", u.Src, u.Dst, u.Payload, tc.src, tc.dst, tc.payload)
			}
			if !u.ChecksumValid() || !ChecksumsValid(pkt) {
				t.Error("checksum of a built datagram not valid")
			}
			if len(u.Head) != IPHeaderLen(tc.dst.Addr())+UDPHeaderLen {
				t.Errorf("head %d bytes", len(u.Head))
			}
			pkt[len(pkt)-1] ^= 0xff
			if len(tc.payload) > 0 && (u.ChecksumValid() || ChecksumsValid(pkt)) {
				t.Error("a corrupted datagram passes its checksum")
			}
			if _, ok := ParseUDP(pkt[:len(pkt)-1]); ok && len(tc.payload) > 0 {
				t.Error("ParseUDP took a packet shorter than its lengths say")
			}
		})
	}
}

// TestPortUnreachable: the error BuildPortUnreachable makes names the
// quoted datagram's source port, as PortUnreachableQuote reads it.
func TestPortUnreachable(t *testing.T) {
	for _, pair := range [][2]netip.AddrPort{{client4, server4}, {client6, server6}} {
		orig := BuildUDP(make([]byte, Headroom+4), pair[0], pair[1], []byte("ping"))
		msg := BuildPortUnreachable(make([]byte, 1500), pair[1].Addr(), pair[0].Addr(), orig)
		dst, port, ok := PortUnreachableQuote(msg)
		if !ok || dst != pair[0].Addr() || port != pair[0].Port() {
			t.Errorf("%s: quote = %s %d %v, want %s %d", pair[0], dst, port, ok, pair[0].Addr(), pair[0].Port())
		}
		if !ChecksumsValid(msg) {
			t.Errorf("%s: the ICMP error's checksums are not valid", pair[0])
		}
	}
}

// TestUSO: a USO packet says the whole length, and its checksum field the
// pseudo-header sum over it.
func TestUSO(t *testing.T) {
	payloads := [][]byte{bytes.Repeat([]byte{1}, 100), bytes.Repeat([]byte{2}, 100), []byte("end")}
	pkt := AppendUSO(nil, client4, server4, payloads)
	if len(pkt) != IPv4HeaderLen+UDPHeaderLen+203 {
		t.Fatalf("USO packet of %d bytes", len(pkt))
	}
	u := header.UDP(pkt[IPv4HeaderLen:])
	want := header.PseudoHeaderChecksum(header.UDPProtocolNumber, TCPIPAddr(client4.Addr()), TCPIPAddr(server4.Addr()), uint16(UDPHeaderLen+203))
	if int(u.Length()) != UDPHeaderLen+203 || u.Checksum() != want {
		t.Errorf("udp length %d checksum %#x, want %d %#x", u.Length(), u.Checksum(), UDPHeaderLen+203, want)
	}
}

// FuzzParse feeds any packet to every parser here: none panics, and what
// ParseUDP accepts lies inside the packet and agrees with itself.
func FuzzParse(f *testing.F) {
	f.Add(BuildUDP(make([]byte, Headroom+5), client4, server4, []byte("hello")))
	f.Add(BuildUDP(make([]byte, Headroom+5), client6, server6, []byte("hello")))
	orig := BuildUDP(make([]byte, Headroom+4), client4, server4, []byte("ping"))
	f.Add(BuildPortUnreachable(make([]byte, 1500), server4.Addr(), client4.Addr(), orig))
	echo := make([]byte, IPv4HeaderLen+8)
	PutIPHeader(echo, client4.Addr(), server4.Addr(), header.ICMPv4ProtocolNumber, 8)
	echo[IPv4HeaderLen] = byte(header.ICMPv4Echo)
	header.ICMPv4(echo[IPv4HeaderLen:]).SetChecksum(^checksum.Checksum(echo[IPv4HeaderLen:], 0))
	f.Add(echo)
	f.Add([]byte{0x60})
	f.Fuzz(func(t *testing.T, pkt []byte) {
		_ = TransportProtocol(pkt)
		_ = Dst(pkt)
		_ = ChecksumsValid(pkt)
		_, _, _ = PortUnreachableQuote(pkt)
		if _, _, msg, ok := ParseEcho(pkt); ok && len(msg) < icmpEchoLen {
			t.Fatalf("echo message of %d bytes accepted", len(msg))
		}
		u, ok := ParseUDP(pkt)
		if !ok {
			return
		}
		if len(u.Segment) < UDPHeaderLen || len(u.Head) > len(pkt) || len(u.Payload) != len(u.Segment)-UDPHeaderLen {
			t.Fatalf("parsed lengths out of bounds: segment %d head %d payload %d of %d", len(u.Segment), len(u.Head), len(u.Payload), len(pkt))
		}
		_ = u.ChecksumValid()
		if u.Src.Addr().Is4() != u.Dst.Addr().Is4() {
			t.Fatal("addresses of two families")
		}
	})
}
