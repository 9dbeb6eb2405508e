package tundev_test

import (
	"bytes"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/tundev"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// testLogger logs to the test's output at Debug level.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

// socketpair returns a Device on one end of a SOCK_SEQPACKET socketpair,
// which keeps packet boundaries as a TUN fd does, and the other end as the
// "kernel" side. The device's end is left blocking on purpose: FromFile
// must make it poller-owned itself.
func socketpair(t *testing.T) (*tundev.Device, *os.File) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := tundev.FromFile(os.NewFile(uintptr(fds[0]), "seqpacket"), 0)
	if err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "peer")
	t.Cleanup(func() {
		dev.Close()
		peer.Close()
	})
	return dev, peer
}

func TestFromFile(t *testing.T) {
	dev, _ := socketpair(t)
	if got := dev.MTU(); got != tundev.DefaultMTU {
		t.Errorf("MTU() = %d, want %d", got, tundev.DefaultMTU)
	}
	if got := dev.BatchSize(); got != 16 {
		t.Errorf("BatchSize() = %d, want 16", got)
	}
	if got := dev.Name(); got != "seqpacket" {
		t.Errorf("Name() = %q, want the file's name", got)
	}
	if err := dev.Up(); err != nil {
		t.Errorf("Up() on a device from a file = %v, want nil (nothing to configure)", err)
	}
}

func TestFromFileRejects(t *testing.T) {
	stream := func(t *testing.T) *os.File {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Close(fds[1]) })
		return os.NewFile(uintptr(fds[0]), "stream")
	}
	regular := func(t *testing.T) *os.File {
		f, err := os.Create(filepath.Join(t.TempDir(), "regular"))
		if err != nil {
			t.Fatal(err)
		}
		return f
	}
	pipe := func(t *testing.T) *os.File {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { w.Close() })
		return r
	}
	for _, tc := range []struct {
		name string
		open func(*testing.T) *os.File
		mtu  int
		want string
	}{
		{"stream socket", stream, 0, "does not keep packet boundaries"},
		{"regular file", regular, 0, "neither a TUN fd"},
		{"pipe", pipe, 0, "neither a TUN fd"},
		{"mtu too small", stream, 20, "mtu 20 out of range"},
		{"mtu too large", stream, 70000, "mtu 70000 out of range"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.open(t)
			defer f.Close()
			dev, err := tundev.FromFile(f, tc.mtu)
			if err == nil {
				dev.Close()
				t.Fatal("FromFile succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("FromFile error = %q, want it to contain %q", err, tc.want)
			}
			// On error the caller keeps f, still usable.
			if _, err := f.Stat(); err != nil {
				t.Errorf("f after a failed FromFile: %v", err)
			}
		})
	}
}

func TestReadWrite(t *testing.T) {
	dev, peer := socketpair(t)

	// Write: each packet goes out as one, its pieces joined in order.
	big := bytes.Repeat([]byte{0x45}, 1500)
	pkts := [][][]byte{
		{[]byte("first packet")},
		{[]byte("ip+tcp header"), big[:1000], big[1000:]},
		{[]byte("a"), nil, []byte("b")},
	}
	n, err := dev.Write(pkts, make([]device.Meta, len(pkts)))
	if n != len(pkts) || err != nil {
		t.Fatalf("Write = %d, %v; want %d, nil", n, err, len(pkts))
	}
	got := make([]byte, 2048)
	for i, pieces := range pkts {
		m, err := peer.Read(got)
		if err != nil {
			t.Fatal(err)
		}
		if want := bytes.Join(pieces, nil); !bytes.Equal(got[:m], want) {
			t.Errorf("packet %d on the wire = %.20q (%d bytes), want %.20q (%d bytes)", i, got[:m], m, want, len(want))
		}
	}
	// A device without offloads refuses what only offloads can carry.
	if _, err := dev.Write([][][]byte{{[]byte("x")}}, []device.Meta{{GSO: device.GSOTCPv4, GSOSize: 1000}}); err == nil {
		t.Error("Write of a segment to a device without offloads succeeded")
	}

	// Read: packets placed at the offset, their lengths in sizes.
	want := [][]byte{[]byte("first packet"), []byte("second"), big}
	for _, p := range want {
		if _, err := peer.Write(p); err != nil {
			t.Fatal(err)
		}
	}
	rbufs := [][]byte{make([]byte, device.ReadOffset+2048), make([]byte, device.ReadOffset+2048)}
	sizes := make([]int, len(rbufs))
	for i := 0; i < len(want); {
		n, err := readPackets(dev, 0, rbufs, sizes)
		if err != nil {
			t.Fatal(err)
		}
		if n < 1 || n > len(rbufs) {
			t.Fatalf("Read returned %d packets for %d buffers", n, len(rbufs))
		}
		for j := range n {
			if got := packetAt(rbufs, sizes, j); !bytes.Equal(got, want[i]) {
				t.Errorf("packet %d read = %.20q, want %.20q", i, got, want[i])
			}
			i++
		}
	}
	dev.Close()
	if _, err := writePackets(dev, []byte("x")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Write after Close = %v, want os.ErrClosed", err)
	}
}

func TestReadShortBuffer(t *testing.T) {
	dev, _ := socketpair(t)
	_, err := dev.Read(0, [][]byte{make([]byte, device.ReadOffset)}, []int{0}, []device.Meta{{}}, device.ReadOffset)
	if !errors.Is(err, io.ErrShortBuffer) {
		t.Errorf("Read with no room after offset = %v, want io.ErrShortBuffer", err)
	}
	if _, err := dev.Read(0, [][]byte{make([]byte, 100)}, []int{0}, []device.Meta{{}}, device.ReadOffset-1); err == nil {
		t.Error("Read with an offset below ReadOffset succeeded")
	}
}

// TestReadWriteAllocs guards the packet path: moving a packet must not
// allocate.
func TestReadWriteAllocs(t *testing.T) {
	dev, peer := socketpair(t)
	pkt := [][][]byte{{make([]byte, 1400)}}
	metas := make([]device.Meta, 2)
	rbuf := [][]byte{make([]byte, 2048), make([]byte, 2048)}
	sizes := []int{0, 0}
	buf := make([]byte, 2048)
	roundTrip := func() {
		if _, err := dev.Write(pkt, metas[:1]); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Read(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := peer.Write(buf[:1400]); err != nil {
			t.Fatal(err)
		}
		if _, err := dev.Read(0, rbuf, sizes, metas, device.ReadOffset); err != nil {
			t.Fatal(err)
		}
	}
	// AllocsPerRun counts the whole process's allocations, so goroutines a
	// previous test left winding down can add to one measurement (seen
	// once in a full run on a loaded machine); they cannot take away from
	// it, so the least of three is the path's own.
	allocs := min(testing.AllocsPerRun(100, roundTrip), testing.AllocsPerRun(100, roundTrip), testing.AllocsPerRun(100, roundTrip))
	if allocs != 0 {
		t.Errorf("a write and a read allocate %v times, want 0", allocs)
	}
}

func TestCloseWakesRead(t *testing.T) {
	dev, _ := socketpair(t)
	done := make(chan error, 1)
	go func() {
		_, err := readPackets(dev, 0, [][]byte{make([]byte, 2048)}, []int{0})
		done <- err
	}()
	waitBlockedInRead(t)
	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("blocked Read after Close = %v, want os.ErrClosed", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Read still blocked 10s after Close")
	}
	if err := dev.Close(); err != nil {
		t.Errorf("second Close = %v, want nil", err)
	}
	if _, err := readPackets(dev, 0, [][]byte{make([]byte, 2048)}, []int{0}); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Read after Close = %v, want os.ErrClosed", err)
	}
	if _, err := writePackets(dev, []byte("x")); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Write after Close = %v, want os.ErrClosed", err)
	}
	if err := dev.Up(); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Up after Close = %v, want os.ErrClosed", err)
	}
}

// waitBlockedInRead polls the goroutine dump until some goroutine is parked
// by the poller inside Device.Read, so that Close is known to wake a Read
// that is really blocked rather than one that has not started.
func waitBlockedInRead(t *testing.T) {
	t.Helper()
	buf := make([]byte, 1<<20)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		n := runtime.Stack(buf, true)
		for g := range strings.SplitSeq(string(buf[:n]), "\n\n") {
			if strings.Contains(g, "[IO wait") && strings.Contains(g, "tundev.(*Device).Read") {
				return
			}
		}
		runtime.Gosched()
	}
	t.Fatal("no goroutine blocked in Device.Read within 10s")
}

func TestConfigErrors(t *testing.T) {
	v4 := netip.MustParsePrefix("198.18.0.1/15")
	v6 := netip.MustParsePrefix("fd00:1898::1/64")
	for _, tc := range []struct {
		name string
		cfg  tundev.Config
		want string
	}{
		{"name too long", tundev.Config{Name: "a-very-long-tun-name"}, "longer than 15 bytes"},
		{"name with slash", tundev.Config{Name: "tun/0"}, "invalid interface name"},
		{"name with space", tundev.Config{Name: "tun 0"}, "invalid interface name"},
		{"mtu too small", tundev.Config{MTU: 40}, "mtu 40 out of range"},
		{"mtu too large", tundev.Config{MTU: 65536}, "mtu 65536 out of range"},
		{"invalid address", tundev.Config{Addrs: []netip.Prefix{{}}}, "not an IPv4 or IPv6 prefix"},
		{"route with host bits", tundev.Config{Routes: []netip.Prefix{v4}}, "did you mean 198.18.0.0/15"},
		{"ipv6 with small mtu", tundev.Config{MTU: 1200, Addrs: []netip.Prefix{v6}}, "below 1280"},
		{"missing netns", tundev.Config{NetnsPath: "/run/netns/nstest-does-not-exist"}, "open netns /run/netns/nstest-does-not-exist: no such file"},
		{"not a namespace", tundev.Config{NetnsPath: "/proc/self/status"}, "not a namespace file"},
		{"not a network namespace", tundev.Config{NetnsPath: "/proc/self/ns/uts"}, "not a network namespace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := tundev.Create(tc.cfg)
			if err == nil {
				dev.Close()
				t.Fatal("Create succeeded")
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Create error = %q, want it to contain %q", err, tc.want)
			}
		})
	}
}

func TestMissingNetnsIsNotExist(t *testing.T) {
	_, err := tundev.Create(tundev.Config{NetnsPath: "/run/netns/nstest-does-not-exist"})
	if !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("Create in a missing netns = %v, want fs.ErrNotExist", err)
	}
	if _, err := tundev.LinkExists("lo", "/run/netns/nstest-does-not-exist"); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("LinkExists in a missing netns = %v, want fs.ErrNotExist", err)
	}
}

func BenchmarkWriteRead(b *testing.B) {
	for _, size := range []int{64, 1400} {
		b.Run(strconv.Itoa(size)+"B", func(b *testing.B) {
			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				b.Fatal(err)
			}
			dev, err := tundev.FromFile(os.NewFile(uintptr(fds[0]), "seqpacket"), 0)
			if err != nil {
				b.Fatal(err)
			}
			defer dev.Close()
			peer := os.NewFile(uintptr(fds[1]), "peer")
			defer peer.Close()
			pkt := [][][]byte{{make([]byte, size)}}
			metas := []device.Meta{{}}
			rbuf := [][]byte{make([]byte, 2048)}
			sizes := []int{0}
			buf := make([]byte, 2048)
			b.ReportAllocs()
			b.SetBytes(int64(2 * size))
			for b.Loop() {
				dev.Write(pkt, metas)
				peer.Read(buf)
				peer.Write(buf[:size])
				dev.Read(0, rbuf, sizes, metas, device.ReadOffset)
			}
		})
	}
}

// TestReadBatch: one Read takes every packet already queued, up to the
// buffers given, and waits for none beyond the first.
func TestReadBatch(t *testing.T) {
	dev, peer := socketpair(t)
	for i := range 5 {
		if _, err := peer.Write([]byte{0x45, byte(i)}); err != nil {
			t.Fatal(err)
		}
	}
	bufs := make([][]byte, 3)
	for i := range bufs {
		bufs[i] = make([]byte, 64)
	}
	sizes := make([]int, 3)
	var got []byte
	for _, want := range []int{3, 2} {
		n, err := readPackets(dev, 0, bufs, sizes)
		if err != nil || n != want {
			t.Fatalf("Read = %d, %v; want %d, nil", n, err, want)
		}
		for i := range n {
			if sizes[i] != 2 {
				t.Fatalf("packet %d: size %d, want 2", i, sizes[i])
			}
			got = append(got, packetAt(bufs, sizes, i)[1])
		}
	}
	if string(got) != "\x00\x01\x02\x03\x04" {
		t.Errorf("packets in order %v, want 0..4", got)
	}
}
