package icmp

import (
	"errors"
	"log/slog"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// capture is a Writer that keeps what it is given.
type capture struct{ pkts [][]byte }

func (c *capture) WriteRaw(pkt []byte) { c.pkts = append(c.pkts, append([]byte(nil), pkt...)) }
func (c *capture) MTU() uint32         { return 1500 }

// echoRequest builds an echo request from src to dst, as a client sends it.
func echoRequest(src, dst netip.Addr, id, seq uint16, data string) []byte {
	hl := packet.IPHeaderLen(dst)
	pkt := make([]byte, hl+icmpEchoLen+len(data))
	msg := pkt[hl:]
	copy(msg[icmpEchoLen:], data)
	if dst.Is4() {
		packet.PutIPHeader(pkt, src, dst, header.ICMPv4ProtocolNumber, len(msg))
		ic := header.ICMPv4(msg)
		ic.SetType(header.ICMPv4Echo)
		ic.SetIdent(id)
		ic.SetSequence(seq)
		ic.SetChecksum(^checksum.Checksum(msg, 0))
	} else {
		packet.PutIPHeader(pkt, src, dst, header.ICMPv6ProtocolNumber, len(msg))
		ic := header.ICMPv6(msg)
		ic.SetType(header.ICMPv6EchoRequest)
		ic.SetIdent(id)
		ic.SetSequence(seq)
		ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: packet.TCPIPAddr(src), Dst: packet.TCPIPAddr(dst)}))
	}
	return pkt
}

// TestAnswer: without forwarding, an echo request is answered at once from
// the address pinged, with the client's identifier, sequence and data, and
// checksums a kernel accepts.
func TestAnswer(t *testing.T) {
	for _, pair := range [][2]netip.Addr{
		{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("192.0.2.9")},
		{netip.MustParseAddr("fd00:1898::1"), netip.MustParseAddr("2001:db8::9")},
	} {
		w := &capture{}
		p := New(Config{Writer: w, Log: slog.New(slog.DiscardHandler), NextFlowID: func() uint64 { return 1 }})
		req := echoRequest(pair[0], pair[1], 0x1234, 7, "abcdefgh")
		src, dst, msg, ok := packet.ParseEcho(req)
		if !ok || !p.Echo(src, dst, msg) {
			t.Fatalf("%s: echo request not taken", pair[1])
		}
		p.Close()
		if len(w.pkts) != 1 {
			t.Fatalf("%s: %d replies, want 1", pair[1], len(w.pkts))
		}
		reply := w.pkts[0]
		if !packet.ChecksumsValid(reply) || packet.Dst(reply) != pair[0] {
			t.Fatalf("%s: reply to %s with valid checksums %v", pair[1], packet.Dst(reply), packet.ChecksumsValid(reply))
		}
		hl := packet.IPHeaderLen(pair[0])
		var typ uint8
		var id, seq uint16
		if pair[0].Is4() {
			ic := header.ICMPv4(reply[hl:])
			typ, id, seq = uint8(ic.Type()), ic.Ident(), ic.Sequence()
			if typ != uint8(header.ICMPv4EchoReply) {
				t.Errorf("type %d, want echo reply", typ)
			}
		} else {
			ic := header.ICMPv6(reply[hl:])
			typ, id, seq = uint8(ic.Type()), ic.Ident(), ic.Sequence()
			if typ != uint8(header.ICMPv6EchoReply) {
				t.Errorf("type %d, want echo reply", typ)
			}
		}
		if id != 0x1234 || seq != 7 || string(reply[hl+icmpEchoLen:]) != "abcdefgh" {
			t.Errorf("reply id %#x seq %d data %q", id, seq, reply[hl+icmpEchoLen:])
		}
	}
}

// TestRefusedAnswered: an echo request to a destination Config.Refuse names
// (netstackd's own addresses) opens no ping socket and is answered here
// (issue 19), with forwarding on.
func TestRefusedAnswered(t *testing.T) {
	own := netip.MustParsePrefix("198.18.0.0/15")
	w := &capture{}
	var controlled bool
	p := New(Config{
		Writer: w, Forward: true, Log: slog.New(slog.DiscardHandler), NextFlowID: func() uint64 { return 1 },
		Control: func(string, string, syscall.RawConn) error {
			controlled = true
			return errors.New("no ping socket in this test")
		},
		Refuse: own.Contains,
	})
	defer p.Close()
	src, dst, msg, ok := packet.ParseEcho(echoRequest(netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("198.18.7.7"), 1, 1, "loop?"))
	if !ok || !p.Echo(src, dst, msg) {
		t.Fatal("echo request not taken")
	}
	// A ping socket would have been handed to Control, or, where the host
	// forbids them, have turned forwarding off.
	if controlled || p.disabled.Load() {
		t.Fatalf("a ping socket was opened for a refused destination (control called %v, forwarding off %v)", controlled, p.disabled.Load())
	}
	if len(w.pkts) != 1 || packet.Dst(w.pkts[0]) != src {
		t.Fatalf("%d replies, want 1 to %s", len(w.pkts), src)
	}
}

// TestNotAllowedDrops: where the host refuses ping sockets, forwarded echo
// requests get no reply (issue 15: the stack answered them, so a dead host
// replied in 0.25 ms), and one warning says how to allow them.
func TestNotAllowedDrops(t *testing.T) {
	netnstest.RequireRoot(t)
	name, path := netnstest.NewBareNetns(t, "icmp")
	ns := netnstest.Netns{Name: name, Path: path}
	ns.Sysctl(t, "net.ipv4.ping_group_range", "1 0")
	var logs strings.Builder
	w := &capture{}
	p := New(Config{Writer: w, Forward: true, Log: slog.New(slog.NewTextHandler(&logs, nil)), NextFlowID: func() uint64 { return 1 }})
	defer p.Close()
	for i, pair := range [][2]netip.Addr{
		{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("192.0.2.9")},
		{netip.MustParseAddr("198.18.0.1"), netip.MustParseAddr("192.0.2.10")},
		{netip.MustParseAddr("fd00:1898::1"), netip.MustParseAddr("2001:db8::9")},
	} {
		req := echoRequest(pair[0], pair[1], 0x1234, uint16(i), "abcdefgh")
		src, dst, msg, ok := packet.ParseEcho(req)
		if !ok {
			t.Fatal("echo request does not parse")
		}
		// The ping socket is opened by Echo, on the calling thread: in ns.
		var taken bool
		if err := ns.Do(func() error { taken = p.Echo(src, dst, msg); return nil }); err != nil {
			t.Fatal(err)
		}
		if !taken {
			t.Errorf("%s: echo request not taken (gVisor would answer it)", dst)
		}
	}
	if len(w.pkts) != 0 {
		t.Errorf("%d replies, want none where ping sockets are not allowed", len(w.pkts))
	}
	if n := strings.Count(logs.String(), "\n"); n != 1 || !strings.Contains(logs.String(), "level=WARN") || !strings.Contains(logs.String(), "sysctl -w net.ipv4.ping_group_range") {
		t.Errorf("%d log lines, want one warning saying how to allow ping sockets:\n%s", n, logs.String())
	}
}
