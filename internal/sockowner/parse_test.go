package sockowner

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"
)

// FuzzParse feeds sock_diag replies to the parser: it never panics, takes
// a reply for another request as not its own, and reports a socket only
// from a whole inet_diag_msg.
func FuzzParse(f *testing.F) {
	c := &diagConn{seq: 7}
	c.fillRequest(unix.IPPROTO_TCP, netip.MustParseAddrPort("10.0.0.1:1000"), netip.MustParseAddrPort("10.0.0.2:80"))
	reply := make([]byte, nlmsgHdrLen+diagMsgLen)
	binary.NativeEndian.PutUint32(reply[0:], uint32(len(reply)))
	binary.NativeEndian.PutUint16(reply[4:], sockDiagByFamily)
	binary.NativeEndian.PutUint32(reply[8:], 7)
	reply[nlmsgHdrLen] = unix.AF_INET6
	f.Add(reply)
	errReply := make([]byte, nlmsgHdrLen+nlmsgErrLen)
	binary.NativeEndian.PutUint32(errReply[0:], uint32(len(errReply)))
	binary.NativeEndian.PutUint16(errReply[4:], unix.NLMSG_ERROR)
	binary.NativeEndian.PutUint32(errReply[8:], 7)
	binary.NativeEndian.PutUint32(errReply[nlmsgHdrLen:], ^uint32(unix.ENOENT)+1) // -ENOENT
	f.Add(errReply)
	f.Add(c.req[:])
	f.Fuzz(func(t *testing.T, b []byte) {
		s, mine, err := c.parse(b)
		if len(b) >= 12 && binary.NativeEndian.Uint32(b[8:]) != 7 && mine && err == nil {
			t.Fatalf("took a reply with sequence %d as its own", binary.NativeEndian.Uint32(b[8:]))
		}
		if mine && err == nil {
			if len(b) < nlmsgHdrLen+diagMsgLen {
				t.Fatalf("socket %+v from %d bytes", s, len(b))
			}
			if !s.local.IsValid() || !s.remote.IsValid() {
				t.Fatalf("socket %+v with an invalid address", s)
			}
		}
	})
}

// FuzzEachName feeds directory entries to eachName: it never panics, and
// every name it returns lies within the buffer, NUL-free.
func FuzzEachName(f *testing.F) {
	ent := func(name string) []byte {
		reclen := (19 + len(name) + 1 + 7) &^ 7
		b := make([]byte, reclen)
		binary.NativeEndian.PutUint16(b[16:], uint16(reclen))
		copy(b[19:], name)
		return b
	}
	f.Add(append(append(ent("."), ent("..")...), ent("1234")...))
	f.Add(ent("self"))
	f.Fuzz(func(t *testing.T, b []byte) {
		eachName(b, func(name []byte) bool {
			if bytes.IndexByte(name, 0) >= 0 || len(name) > len(b) {
				t.Fatalf("name %q from %d bytes", name, len(b))
			}
			if n, ok := atoi(name); ok && n < 0 {
				t.Fatalf("atoi(%q) = %d", name, n)
			}
			return true
		})
	})
}

// TestMatches: what the kernel found is the flow's socket only if it can
// have sent the flow.
func TestMatches(t *testing.T) {
	ap := netip.MustParseAddrPort
	local, remote := ap("10.0.0.1:1000"), ap("10.0.0.2:53")
	for _, tc := range []struct {
		name          string
		proto         uint8
		sLocal, sRemo netip.AddrPort
		want          bool
	}{
		{"tcp-same", unix.IPPROTO_TCP, local, remote, true},
		{"tcp-listener", unix.IPPROTO_TCP, ap("0.0.0.0:1000"), ap("0.0.0.0:0"), false},
		{"tcp-other-remote", unix.IPPROTO_TCP, local, ap("10.0.0.3:53"), false},
		{"udp-connected", unix.IPPROTO_UDP, local, remote, true},
		{"udp-bound", unix.IPPROTO_UDP, local, ap("0.0.0.0:0"), true},
		{"udp-wildcard", unix.IPPROTO_UDP, ap("0.0.0.0:1000"), ap("0.0.0.0:0"), true},
		{"udp-wildcard-v6", unix.IPPROTO_UDP, ap("[::]:1000"), ap("[::]:0"), true},
		{"udp-other-port", unix.IPPROTO_UDP, ap("0.0.0.0:1001"), ap("0.0.0.0:0"), false},
		{"udp-other-address", unix.IPPROTO_UDP, ap("10.0.0.9:1000"), ap("0.0.0.0:0"), false},
		{"udp-connected-elsewhere", unix.IPPROTO_UDP, local, ap("10.0.0.3:53"), false},
	} {
		s := diagSocket{local: tc.sLocal, remote: tc.sRemo, inode: 1}
		if got := matches(tc.proto, s, local, remote); got != tc.want {
			t.Errorf("%s: matches(%s -> %s) = %v, want %v", tc.name, tc.sLocal, tc.sRemo, got, tc.want)
		}
	}
}
