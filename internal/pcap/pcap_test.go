package pcap

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

var (
	client = netip.MustParseAddrPort("198.18.0.5:5353")
	server = netip.MustParseAddrPort("192.0.2.1:53")
)

// tcpdump reads path with the real tcpdump and returns its lines.
func tcpdump(t *testing.T, path string) []string {
	t.Helper()
	bin := netnstest.RequireCommand(t, "tcpdump", "tcpdump")
	out, err := exec.Command(bin, "-nn", "-r", path).CombinedOutput()
	if err != nil {
		t.Fatalf("tcpdump -r %s: %v\n%s", path, err, out)
	}
	var lines []string
	for l := range strings.SplitSeq(string(out), "\n") {
		if strings.HasPrefix(l, "reading from") || strings.TrimSpace(l) == "" {
			continue
		}
		lines = append(lines, l)
	}
	return lines
}

// TestTcpdumpReads: what Record writes is a pcapng file tcpdump reads, with
// each packet whole, however many pieces it was given in.
func TestTcpdumpReads(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pcapng")
	w, err := Create(Config{Path: path, Interface: "netstack0"})
	if err != nil {
		t.Fatal(err)
	}
	query := netnstest.UDPPacket(client, server, []byte("hello"))
	reply := netnstest.UDPPacket(server, client, []byte("hello, world"))
	w.Record(In, query)
	w.Record(Out, reply[:20], reply[20:28], reply[28:]) // IP header, UDP header, payload
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := w.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	w.Record(In, query) // after Close: ignored, no panic
	lines := tcpdump(t, path)
	want := []string{"198.18.0.5.5353 > 192.0.2.1.53: ", "192.0.2.1.53 > 198.18.0.5.5353: "}
	if len(lines) != len(want) {
		t.Fatalf("tcpdump read %d packets, want %d:\n%s", len(lines), len(want), strings.Join(lines, "\n"))
	}
	for i, l := range lines {
		if !strings.Contains(l, want[i]) {
			t.Errorf("packet %d: %q, want it to contain %q", i, l, want[i])
		}
	}
}

// TestRotate: a file that reaches MaxSize becomes FILE.1 and recording goes
// on in a new FILE; both stay readable, and together they hold the newest
// packets.
func TestRotate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pcapng")
	var logs bytes.Buffer
	w, err := Create(Config{Path: path, MaxSize: 2000, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	pkt := netnstest.UDPPacket(client, server, make([]byte, 200))
	for range 30 {
		w.Record(In, pkt)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + ".1"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Size() > 2000+400 {
			t.Errorf("%s is %d bytes, beyond the 2000 limit by more than a packet", p, fi.Size())
		}
		if n := len(tcpdump(t, p)); n == 0 {
			t.Errorf("%s holds no packet tcpdump reads", p)
		}
	}
	if !strings.Contains(logs.String(), "pcap: rotated") {
		t.Errorf("no rotation logged:\n%s", logs.String())
	}
}

// TestWriteErrorStops: a file that cannot be written (a full disk, here
// /dev/full) stops recording with one warning, and never fails the caller.
func TestWriteErrorStops(t *testing.T) {
	var logs bytes.Buffer
	w, err := Create(Config{Path: "/dev/full", Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	if err != nil {
		t.Skipf("/dev/full: %v", err)
	}
	pkt := netnstest.UDPPacket(client, server, make([]byte, 1400))
	for range 200 { // well past the 64 KiB buffer
		w.Record(Out, pkt)
	}
	w.Close()
	if n := strings.Count(logs.String(), "recording stopped"); n != 1 {
		t.Errorf("%d warnings, want 1:\n%s", n, logs.String())
	}
}

// TestTap: a tapped device records what is read from it and written to it,
// and still delivers both.
func TestTap(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := tundev.FromFile(os.NewFile(uintptr(fds[0]), "seqpacket"), 0)
	if err != nil {
		t.Fatal(err)
	}
	peer := os.NewFile(uintptr(fds[1]), "peer")
	defer peer.Close()
	path := filepath.Join(t.TempDir(), "x.pcapng")
	w := NewSwitch(Config{Path: path})
	if err := w.On(); err != nil {
		t.Fatal(err)
	}
	d := Tap(dev, w)
	defer d.Close()

	query := netnstest.UDPPacket(client, server, []byte("q"))
	if _, err := peer.Write(query); err != nil {
		t.Fatal(err)
	}
	bufs := [][]byte{make([]byte, device.ReadOffset+device.MaxPacket)}
	sizes := []int{0}
	if n, err := d.Read(0, bufs, sizes, make([]device.Meta, 1), device.ReadOffset); n != 1 || err != nil {
		t.Fatalf("Read = %d, %v", n, err)
	}
	if !bytes.Equal(bufs[0][device.ReadOffset:device.ReadOffset+sizes[0]], query) {
		t.Fatal("the tap changed what was read")
	}
	reply := netnstest.UDPPacket(server, client, []byte("r"))
	if n, err := d.Write([][][]byte{{reply[:28], reply[28:]}}, make([]device.Meta, 1)); n != 1 || err != nil {
		t.Fatalf("Write = %d, %v", n, err)
	}
	got := make([]byte, 2048)
	peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := peer.Read(got); err != nil || !bytes.Equal(got[:n], reply) {
		t.Fatalf("the peer read %x, %v; want the reply", got[:n], err)
	}
	// Moving a packet through the tap allocates nothing, on or off.
	meta := make([]device.Meta, 1)
	for _, on := range []bool{true, false} {
		if !on {
			w.Off()
		}
		allocs := testing.AllocsPerRun(50, func() {
			peer.Write(query)
			d.Read(0, bufs, sizes, meta, device.ReadOffset)
		})
		if allocs != 0 {
			t.Errorf("a read through the tap (recording %v) allocates %v times", on, allocs)
		}
	}
	if err := w.Off(); err != nil {
		t.Fatal(err)
	}
	if lines := tcpdump(t, path); len(lines) < 2 || !strings.Contains(lines[0], "198.18.0.5.5353 > 192.0.2.1.53") || !strings.Contains(lines[1], "192.0.2.1.53 > 198.18.0.5.5353") {
		t.Errorf("tcpdump read:\n%s", strings.Join(lines, "\n"))
	}
}

// TestSwitch: a Switch records only while on; turned on again it starts a
// new file.
func TestSwitch(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.pcapng")
	s := NewSwitch(Config{Path: path})
	pkt := netnstest.UDPPacket(client, server, []byte("x"))
	s.Record(In, pkt) // off: nothing, and no file
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("a file exists before On: %v", err)
	}
	if err := s.On(); err != nil || !s.Recording() {
		t.Fatalf("On: %v, recording %v", err, s.Recording())
	}
	s.Record(In, pkt)
	s.Record(Out, pkt)
	if err := s.Off(); err != nil || s.Recording() {
		t.Fatalf("Off: %v, recording %v", err, s.Recording())
	}
	s.Record(In, pkt) // off again
	if n := len(tcpdump(t, path)); n != 2 {
		t.Errorf("%d packets recorded, want the 2 sent while on", n)
	}
	if err := s.Off(); err != nil {
		t.Errorf("a second Off: %v", err)
	}
}
