package stack

import (
	"bytes"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/stack/internal/frag"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// TestUDPFragments sends datagrams larger than the MTU from the client as
// IP fragments, out of order, and wants each to reach the server whole; the
// server's replies must reach the client as fragments no longer than the
// MTU that reassemble into the reply. Both upstream paths: a kernel socket
// (batched, WriteDatagrams) and a conn that is not one, as a proxy's
// (WriteRaw).
func TestUDPFragments(t *testing.T) {
	const mtu = 1500
	for _, tc := range []struct {
		name string
		udp  UDPDialer
		dst  func(sink netip.AddrPort) netip.AddrPort
	}{
		{"kernel-socket", kernelUDP{}, func(s netip.AddrPort) netip.AddrPort { return s }},
		// loopbackUDP rewrites 192.0.2.2 to 127.0.0.1 and back.
		{"packet-conn", &loopbackUDP{}, func(s netip.AddrPort) netip.AddrPort {
			return netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), s.Port())
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev := newSeqpacketDevice(t, 1, 128, mtu)
			fd := dev.far[0]
			st := newTestStack(t, Config{UDP: tc.udp}, dev, &redirectDialer{})
			t.Cleanup(func() {
				st.Close()
				unix.Close(fd)
			})
			sink := newUDPSink(t)
			dst := tc.dst(sink.addr)
			client := netip.MustParseAddrPort("198.18.0.1:5000")
			r := frag.New(frag.Config{})
			whole := make([]byte, frag.MaxPacket)
			buf := make([]byte, 1<<17)
			for i, size := range []int{1400, 3000, 9000, 30000, 65000, packet.MaxUDPPayload(client.Addr())} {
				msg := patterned(0, i, size)
				pkt := packet.BuildUDP(make([]byte, packet.Headroom+size), client, dst, msg)
				frags, lens, ok := frag.AppendFragments(nil, nil, pkt, mtu, 0)
				if !ok {
					t.Fatalf("cut %d bytes", len(pkt))
				}
				// Last fragment first: the reassembler must not care.
				for k := len(lens) - 1; k >= 0; k-- {
					off := 0
					for _, l := range lens[:k] {
						off += l
					}
					if _, err := unix.Write(fd, frags[off:off+lens[k]]); err != nil {
						t.Fatalf("write fragment: %v", err)
					}
				}
				got := sink.next(t)
				if !bytes.Equal(got.payload, msg) {
					t.Fatalf("%d bytes sent as %d fragments: the server got %d bytes, not the datagram", size, len(lens), len(got.payload))
				}
				if _, err := sink.c.WriteToUDPAddrPort(msg, got.from); err != nil {
					t.Fatalf("server send: %v", err)
				}
				reply, n := readReassembled(t, fd, r, buf, whole, mtu)
				u, ok := packet.ParseUDP(reply)
				if !ok || !u.ChecksumValid() {
					t.Fatalf("reply to %d bytes: not a valid UDP datagram", size)
				}
				if u.Src != dst || u.Dst != client || !bytes.Equal(u.Payload, msg) {
					t.Fatalf("reply to %d bytes: %d bytes %v → %v, want the datagram %v → %v", size, len(u.Payload), u.Src, u.Dst, dst, client)
				}
				// IPv4 fragments of 1480 bytes after the header.
				if step := mtu - packet.IPv4HeaderLen; n != (size+packet.UDPHeaderLen+step-1)/step {
					t.Errorf("reply to %d bytes came in %d packets, want %d", size, n, (size+packet.UDPHeaderLen+step-1)/step)
				}
			}
			// The link reassembled them, not gVisor (whose reassembly
			// has no bound per source).
			if s := st.link.FragStats(); s.Reassembled != 5 || s.Packets != 0 {
				t.Errorf("the link's reassembler: %+v, want the 5 fragmented datagrams reassembled and nothing held", s)
			}
		})
	}
}

// readReassembled reads packets the stack wrote to the client until r
// reassembles one, checking that none exceeds the MTU, and returns it with
// the number of packets it came in.
func readReassembled(t *testing.T, fd int, r *frag.Reassembler, buf, whole []byte, mtu int) ([]byte, int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n := 1; ; n++ {
		tv := unix.NsecToTimeval(max(time.Until(deadline), time.Millisecond).Nanoseconds())
		_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
		k, err := unix.Read(fd, buf)
		if err != nil {
			t.Fatalf("read from stack: %v", err)
		}
		if k > mtu {
			t.Fatalf("the stack wrote a packet of %d bytes to a link of MTU %d", k, mtu)
		}
		switch pkt, res := r.Process(buf[:k], whole); res {
		case frag.NotFragment:
			return buf[:k], n
		case frag.Reassembled:
			return pkt, n
		case frag.Dropped:
			t.Fatalf("the stack wrote a fragment the reassembler refuses")
		}
	}
}
