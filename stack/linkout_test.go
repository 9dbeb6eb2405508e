package stack

import (
	"net/netip"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// vectorSeqpacketDevice is the socketpair device with WriteVectored: one
// writev per packet keeps the packet one message, as one writev does on a
// TUN. It counts the packets written from gVisor's own views.
type vectorSeqpacketDevice struct {
	*seqpacketDevice
	held atomic.Int64 // packets of more than one piece: gVisor's views
	all  atomic.Int64
}

func (d *vectorSeqpacketDevice) WriteVectored(pkts [][][]byte) (int, error) {
	rc, err := d.f.SyscallConn()
	if err != nil {
		return 0, err
	}
	for i, pieces := range pkts {
		var werr error
		if err := rc.Write(func(fd uintptr) bool {
			_, werr = unix.Writev(int(fd), pieces)
			return werr != unix.EAGAIN
		}); err != nil {
			return i, err
		}
		if werr != nil {
			return i, werr
		}
		d.all.Add(1)
		if len(pieces) > 1 {
			d.held.Add(1)
		}
	}
	return len(pkts), nil
}

// On a device that writes vectors, long segments toward the client go out
// as gVisor's views (no copy) and short packets as copies, and a bulk echo
// arrives intact both ways: at MTU 65000 with both kinds, at MTU 1500 with
// copies alone.
func TestVectoredWritesEcho(t *testing.T) {
	for _, tc := range []struct {
		name string
		mtu  int
		held bool // some packets go out as views
	}{
		{"mtu1500", 1500, false},
		{"mtu65000", 65000, true},
	} {
		mtu := tc.mtu
		t.Run(tc.name, func(t *testing.T) {
			var vd *vectorSeqpacketDevice
			p := newPeerDevice(t, Config{}, mtu, func(d *seqpacketDevice) Device {
				vd = &vectorSeqpacketDevice{seqpacketDevice: d}
				return vd
			})
			port := listen(t, echo)
			if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port), 3, 4<<20); err != nil {
				t.Fatal(err)
			}
			held, all := vd.held.Load(), vd.all.Load()
			switch {
			case tc.held && held == 0:
				t.Errorf("no packet of %d went out as gVisor's views", all)
			case tc.held && held == all:
				t.Errorf("all %d packets went out as views; short ones (the SYN-ACK, ACKs) should be copies", all)
			case !tc.held && held != 0:
				t.Errorf("%d of %d packets, none longer than %d bytes, went out as views", held, all, mtu)
			}
		})
	}
}
