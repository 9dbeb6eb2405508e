package inbound

import (
	"context"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// discardWriter takes every packet written to the link and forgets it.
type discardWriter struct{}

func (discardWriter) WriteRaw([]byte) {}
func (discardWriter) MTU() uint32     { return 1500 }

// FuzzInboundUDPFromTUN feeds arbitrary packets to the published-port paths
// of the device dispatcher, with inbound associations on gateway ports
// 49152 (IPv4) and 49153 (IPv6). Whatever the namespace writes, they must
// not crash, and they may take only packets addressed to a gateway.
func FuzzInboundUDPFromTUN(f *testing.F) {
	gw4, gw6 := netip.MustParseAddr("198.18.0.2"), netip.MustParseAddr("fd00:1898::2")
	var b [packet.IPv6HeaderLen + packet.UDPHeaderLen + 64]byte
	reply4 := append([]byte(nil), packet.BuildUDP(b[:], netip.MustParseAddrPort("198.18.0.1:9000"), netip.AddrPortFrom(gw4, inboundPortFirst), []byte("reply"))...)
	reply6 := append([]byte(nil), packet.BuildUDP(b[:], netip.MustParseAddrPort("[fd00:1898::1]:9000"), netip.AddrPortFrom(gw6, inboundPortFirst+1), []byte("reply"))...)
	f.Add(reply4)
	f.Add(reply6)
	in4 := append([]byte(nil), packet.BuildUDP(b[:], netip.AddrPortFrom(gw4, inboundPortFirst), netip.MustParseAddrPort("198.18.0.1:9000"), []byte("x"))...)
	in6 := append([]byte(nil), packet.BuildUDP(b[:], netip.AddrPortFrom(gw6, inboundPortFirst+1), netip.MustParseAddrPort("[fd00:1898::1]:9000"), []byte("x"))...)
	var icmp [packet.IPv6HeaderLen + 8 + packet.ICMPQuoteLen]byte
	refused4 := append([]byte(nil), packet.BuildPortUnreachable(icmp[:], netip.MustParseAddr("198.18.0.1"), gw4, in4)...)
	refused6 := append([]byte(nil), packet.BuildPortUnreachable(icmp[:], netip.MustParseAddr("fd00:1898::1"), gw6, in6)...)
	f.Add(refused4)
	f.Add(refused6)
	f.Add([]byte{0x45, 0, 0, 20})

	log := slog.New(slog.DiscardHandler)
	var flows uint64
	in := NewUDP(context.Background(), Config{
		Gateway4: gw4, Gateway6: gw6, Timeout: time.Minute, Max: 16,
		Writer: discardWriter{}, Log: log, NextFlowID: func() uint64 { flows++; return flows },
	})
	// The association's outside source is the published socket itself, so
	// whatever the fuzzer delivers stays on loopback.
	pc, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		f.Fatal(err)
	}
	defer pc.Close()
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("198.18.0.1:9000"), netip.MustParseAddrPort("[fd00:1898::1]:9000")} {
		srv := &inboundServer{pc: pc, udp: pc, dst: dst, gw: in.Gateway(dst.Addr()), log: log, assocs: make(map[netip.AddrPort]*inboundAssoc)}
		in.lookup(srv, pc.LocalAddr().(*net.UDPAddr).AddrPort())
	}
	// receive is what the dispatcher does with a datagram: one to a
	// gateway is the table's (handlePacket in package stack).
	receive := func(pkt []byte) bool {
		u, ok := packet.ParseUDP(pkt)
		if !ok || !in.IsGateway(u.Dst.Addr()) {
			return false
		}
		in.Receive(u)
		return true
	}
	// The seeds that are well formed are taken.
	for _, pkt := range [][]byte{reply4, reply6} {
		if !receive(pkt) || in.Stats().Refused != 0 {
			f.Fatalf("Receive did not deliver a reply on an association: % x", pkt)
		}
	}
	for _, pkt := range [][]byte{refused4, refused6} {
		if !in.HandleICMPError(pkt) {
			f.Fatalf("HandleICMPError did not take a port unreachable for an association: % x", pkt)
		}
	}
	f.Fuzz(func(t *testing.T, pkt []byte) {
		if len(pkt) > device.MaxPacket {
			return
		}
		toGateway := in.IsGateway(packet.Dst(pkt))
		if receive(pkt) && !toGateway {
			t.Fatalf("Receive took a packet to %v, not a gateway", packet.Dst(pkt))
		}
		if u, ok := packet.ParseUDP(pkt); ok && in.Deliver(u.Src, u.Dst, u.Payload) && !toGateway {
			t.Fatalf("Deliver took a packet to %v, not a gateway", packet.Dst(pkt))
		}
		if in.HandleICMPError(pkt) && !toGateway {
			t.Fatalf("HandleICMPError took a packet to %v, not a gateway", packet.Dst(pkt))
		}
	})
}
