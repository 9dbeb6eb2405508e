package tundev_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

// Every test here works inside a throwaway namespace: nothing touches the
// host's interfaces, addresses or routes.

var (
	addr4  = netip.MustParsePrefix("198.18.0.1/15")
	addr6  = netip.MustParsePrefix("fd00:1898::1/64")
	route4 = netip.MustParsePrefix("0.0.0.0/0")
	route6 = netip.MustParsePrefix("::/0")
)

// waitTimeout bounds every wait for the kernel: a packet, a wake-up.
const waitTimeout = 10 * time.Second

// tunName is unique to this test binary, so that looking for it in the
// host namespace cannot find somebody else's interface.
var tunName = fmt.Sprintf("tdv%d", os.Getpid()%1_000_000)

func TestCreateInNetns(t *testing.T) {
	netnstest.RequireRoot(t)
	_, nsPath := netnstest.NewBareNetns(t, "tundev")
	dev, err := tundev.Create(tundev.Config{
		Name:      tunName,
		NetnsPath: nsPath,
		MTU:       1400,
		Addrs:     []netip.Prefix{addr4, addr6},
		Routes:    []netip.Prefix{route4, route6},
		Logger:    testLogger(t),
	})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	if dev.Name() != tunName || dev.MTU() != 1400 || dev.BatchSize() != 16 {
		t.Errorf("Name, MTU, BatchSize = %q, %d, %d; want %q, 1400, 16", dev.Name(), dev.MTU(), dev.BatchSize(), tunName)
	}

	h := netnstest.NetlinkHandle(t, nsPath)
	link, err := h.LinkByName(tunName)
	if err != nil {
		t.Fatalf("link %s not in the namespace: %v", tunName, err)
	}
	if _, err := netnstest.NetlinkHandle(t, "").LinkByName(tunName); err == nil {
		t.Errorf("link %s also exists in the caller's namespace", tunName)
	}
	if ok, err := tundev.LinkExists(tunName, ""); ok || err != nil {
		t.Errorf("LinkExists(%s, current) = %v, %v; want false, nil", tunName, ok, err)
	}
	if ok, err := tundev.LinkExists(tunName, nsPath); !ok || err != nil {
		t.Errorf("LinkExists(%s, netns) = %v, %v; want true, nil", tunName, ok, err)
	}
	if tt, ok := link.(*netlink.Tuntap); !ok || tt.Mode != netlink.TUNTAP_MODE_TUN {
		t.Errorf("link is %T %+v, want a TUN", link, link)
	}
	if mtu := link.Attrs().MTU; mtu != 1400 {
		t.Errorf("link MTU = %d, want 1400", mtu)
	}
	if link.Attrs().Flags&net.FlagUp != 0 {
		t.Errorf("link is up before Up")
	}
	if lo, err := h.LinkByName("lo"); err != nil || lo.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("lo in the namespace is not up (err %v)", err)
	}
	checkAddrs(t, h, link, []netip.Prefix{addr4, addr6}, nil)
	checkRoutes(t, h, link, nil, []netip.Prefix{route4, route6})

	if err := dev.Up(); err != nil {
		t.Fatalf("Up: %v", err)
	}
	if err := dev.Up(); err != nil {
		t.Errorf("second Up: %v", err)
	}
	link, err = h.LinkByIndex(link.Attrs().Index)
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("link is not up after Up")
	}
	if q := link.Attrs().TxQLen; q != tundev.DefaultTxQueueLen {
		t.Errorf("txqueuelen = %d, want %d", q, tundev.DefaultTxQueueLen)
	}
	checkAddrs(t, h, link, []netip.Prefix{addr4, addr6}, nil) // not tentative once up either
	checkRoutes(t, h, link, []netip.Prefix{route4, route6}, nil)

	if dev.VnetHdrLen() != tundev.VnetHdrLen || !dev.TSO() || !dev.USO() || dev.Offloads().String() != "csum,tso4,tso6,uso4,uso6" {
		t.Errorf("VnetHdrLen, TSO, USO, Offloads = %d, %v, %v, %s; want %d, true, true, csum,tso4,tso6,uso4,uso6 (kernel ≥ 6.2)",
			dev.VnetHdrLen(), dev.TSO(), dev.USO(), dev.Offloads(), tundev.VnetHdrLen)
	}
	r := startReader(t, dev)
	for _, tc := range []struct {
		name          string
		local, remote netip.AddrPort
	}{
		{"ipv4", netip.MustParseAddrPort("198.18.0.1:0"), netip.MustParseAddrPort("198.18.0.5:5353")},
		{"ipv6", netip.MustParseAddrPort("[fd00:1898::1]:0"), netip.MustParseAddrPort("[fd00:1898::5]:5353")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn := listenUDP(t, nsPath, tc.local)
			local := conn.LocalAddr().(*net.UDPAddr).AddrPort()
			local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())

			// Out of the namespace: the kernel routes to the TUN, Read gets it.
			if _, err := conn.WriteToUDPAddrPort([]byte("ping"), tc.remote); err != nil {
				t.Fatalf("send to %s in the namespace: %v", tc.remote, err)
			}
			r.waitUDP(t, local, tc.remote, []byte("ping"))

			// Into the namespace: Write reaches the socket.
			pkt := netnstest.UDPPacket(tc.remote, local, []byte("pong"))
			if n, err := writePackets(dev, pkt); n != 1 || err != nil {
				t.Fatalf("Write = %d, %v; want 1, nil", n, err)
			}
			conn.SetReadDeadline(time.Now().Add(waitTimeout))
			got := make([]byte, 64)
			n, from, err := conn.ReadFromUDPAddrPort(got)
			if err != nil {
				t.Fatalf("receive in the namespace: %v", err)
			}
			if from.Addr().Unmap() != tc.remote.Addr() || from.Port() != tc.remote.Port() || string(got[:n]) != "pong" {
				t.Errorf("received %q from %s, want %q from %s", got[:n], from, "pong", tc.remote)
			}
		})
	}

	// The reader is (or soon will be) blocked in Read: Close must wake it.
	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := r.wait(t); !errors.Is(err, os.ErrClosed) {
		t.Errorf("Read blocked across Close returned %v, want os.ErrClosed", err)
	}
	if ok, err := tundev.LinkExists(tunName, nsPath); ok || err != nil {
		t.Errorf("after Close, LinkExists = %v, %v; want false, nil", ok, err)
	}
	if err := dev.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

func TestCreateDefaults(t *testing.T) {
	netnstest.RequireRoot(t)
	_, nsPath := netnstest.NewBareNetns(t, "tundev")
	dev, err := tundev.Create(tundev.Config{NetnsPath: nsPath})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer dev.Close()
	if dev.Name() != tundev.DefaultName || dev.MTU() != tundev.DefaultMTU {
		t.Errorf("Name, MTU = %q, %d; want %q, %d", dev.Name(), dev.MTU(), tundev.DefaultName, tundev.DefaultMTU)
	}
	link, err := netnstest.NetlinkHandle(t, nsPath).LinkByName(tundev.DefaultName)
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().MTU != tundev.DefaultMTU {
		t.Errorf("link MTU = %d, want %d", link.Attrs().MTU, tundev.DefaultMTU)
	}
	if err := dev.Up(); err != nil {
		t.Errorf("Up with no routes: %v", err)
	}
}

// TestAttachPersistent attaches to a device made with `ip tuntap add`: Close
// must leave it, minus what Create and Up added.
func TestAttachPersistent(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, nsPath := netnstest.NewBareNetns(t, "tundev")
	netnstest.IP(t, "-n", ns, "tuntap", "add", "dev", tunName, "mode", "tun")
	// Left by an earlier run: accepted, and left in place by Close.
	netnstest.IP(t, "-n", ns, "addr", "add", addr4.String(), "dev", tunName)

	dev, err := tundev.Create(tundev.Config{
		Name:      tunName,
		NetnsPath: nsPath,
		MTU:       1420,
		Addrs:     []netip.Prefix{addr4, addr6},
		Routes:    []netip.Prefix{route4, route6},
		Logger:    testLogger(t),
	})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	if err := dev.Up(); err != nil {
		t.Fatalf("Up: %v", err)
	}
	h := netnstest.NetlinkHandle(t, nsPath)
	link, err := h.LinkByName(tunName)
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().MTU != 1420 || link.Attrs().Flags&net.FlagUp == 0 {
		t.Errorf("attached link: MTU %d, flags %v; want 1420, up", link.Attrs().MTU, link.Attrs().Flags)
	}
	checkAddrs(t, h, link, []netip.Prefix{addr4, addr6}, nil)
	checkRoutes(t, h, link, []netip.Prefix{route4, route6}, nil)

	// One fd at a time on a single-queue TUN.
	if dev2, err := tundev.Create(tundev.Config{Name: tunName, NetnsPath: nsPath}); err == nil {
		dev2.Close()
		t.Error("second Create on an attached device succeeded")
	} else if !errors.Is(err, unix.EBUSY) {
		t.Errorf("second Create on an attached device = %v, want EBUSY", err)
	}

	if err := dev.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	link, err = h.LinkByName(tunName)
	if err != nil {
		t.Fatalf("persistent device gone after Close: %v", err)
	}
	if link.Attrs().MTU != 1500 || link.Attrs().Flags&net.FlagUp != 0 {
		t.Errorf("after Close: MTU %d, flags %v; want 1500 and down, as found", link.Attrs().MTU, link.Attrs().Flags)
	}
	checkAddrs(t, h, link, []netip.Prefix{addr4}, []netip.Prefix{addr6})
	checkRoutes(t, h, link, nil, []netip.Prefix{route4, route6})
}

// TestCreateUndo checks that a failed Create leaves nothing behind: a
// created interface is deleted, an attached one is put back as found. The
// kernel refuses a multicast address, after the first address is added.
func TestCreateUndo(t *testing.T) {
	netnstest.RequireRoot(t)
	bad := netip.MustParsePrefix("ff02::1/64")
	cfg := func(nsPath string) tundev.Config {
		return tundev.Config{Name: tunName, NetnsPath: nsPath, MTU: 1400, Addrs: []netip.Prefix{addr4, bad}}
	}

	t.Run("created", func(t *testing.T) {
		_, nsPath := netnstest.NewBareNetns(t, "tundev")
		dev, err := tundev.Create(cfg(nsPath))
		if err == nil {
			dev.Close()
			t.Fatal("Create succeeded")
		}
		if want := "add address ff02::1/64 to " + tunName; !strings.Contains(err.Error(), want) {
			t.Errorf("Create error = %q, want it to contain %q", err, want)
		}
		if ok, err := tundev.LinkExists(tunName, nsPath); ok || err != nil {
			t.Errorf("after a failed Create, LinkExists = %v, %v; want false, nil", ok, err)
		}
	})

	t.Run("attached", func(t *testing.T) {
		ns, nsPath := netnstest.NewBareNetns(t, "tundev")
		netnstest.IP(t, "-n", ns, "tuntap", "add", "dev", tunName, "mode", "tun")
		dev, err := tundev.Create(cfg(nsPath))
		if err == nil {
			dev.Close()
			t.Fatal("Create succeeded")
		}
		h := netnstest.NetlinkHandle(t, nsPath)
		link, err := h.LinkByName(tunName)
		if err != nil {
			t.Fatalf("persistent device gone after a failed Create: %v", err)
		}
		if link.Attrs().MTU != 1500 {
			t.Errorf("MTU after a failed Create = %d, want 1500 as found", link.Attrs().MTU)
		}
		checkAddrs(t, h, link, nil, []netip.Prefix{addr4})
		// Nothing holds the device: it can be attached again.
		dev, err = tundev.Create(tundev.Config{Name: tunName, NetnsPath: nsPath})
		if err != nil {
			t.Fatalf("attach after a failed Create: %v", err)
		}
		dev.Close()
	})
}

// TestUpRouteConflict: a default route through another interface makes Up
// fail clearly, and Up takes back what it did.
func TestUpRouteConflict(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, nsPath := netnstest.NewBareNetns(t, "tundev")
	netnstest.IP(t, "-n", ns, "link", "add", "va", "type", "veth", "peer", "name", "vb")
	netnstest.IP(t, "-n", ns, "link", "set", "va", "up")
	netnstest.IP(t, "-n", ns, "route", "add", "default", "dev", "va")

	dev, err := tundev.Create(tundev.Config{
		Name:      tunName,
		NetnsPath: nsPath,
		Addrs:     []netip.Prefix{addr4, addr6},
		Routes:    []netip.Prefix{route6, route4}, // ::/0 is added, then undone
	})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer dev.Close()
	err = dev.Up()
	if want := "add route 0.0.0.0/0 via " + tunName; err == nil || !strings.Contains(err.Error(), want) {
		t.Fatalf("Up = %v, want an error containing %q", err, want)
	}
	if !errors.Is(err, unix.EEXIST) {
		t.Errorf("Up = %v, want EEXIST", err)
	}
	h := netnstest.NetlinkHandle(t, nsPath)
	link, err := h.LinkByName(tunName)
	if err != nil {
		t.Fatal(err)
	}
	if link.Attrs().Flags&net.FlagUp != 0 {
		t.Error("link still up after a failed Up")
	}
	checkRoutes(t, h, link, nil, []netip.Prefix{route4, route6})
}

// TestLinkDeleted: deleting the interface under an open device ends Read
// with an error that says so, and Close still succeeds.
func TestLinkDeleted(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, nsPath := netnstest.NewBareNetns(t, "tundev")
	dev, err := tundev.Create(tundev.Config{Name: tunName, NetnsPath: nsPath})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer dev.Close()
	r := startReader(t, dev)
	netnstest.IP(t, "-n", ns, "link", "del", tunName)
	err = r.wait(t)
	if !errors.Is(err, unix.EBADFD) || errors.Is(err, os.ErrClosed) {
		t.Errorf("Read after the link was deleted = %v, want EBADFD and not os.ErrClosed", err)
	}
	if err := dev.Close(); err != nil {
		t.Errorf("Close after the link was deleted = %v, want nil", err)
	}
}

// reader reads packets from a Device on its own goroutine until Read fails.
type reader struct {
	pkts chan []byte
	done chan struct{}
	err  error
}

func startReader(t *testing.T, dev *tundev.Device) *reader {
	r := &reader{pkts: make(chan []byte, 64), done: make(chan struct{})}
	var wg sync.WaitGroup
	wg.Go(func() {
		defer close(r.done)
		bufs := [][]byte{make([]byte, device.ReadOffset+device.MaxPacket)}
		sizes := []int{0}
		for {
			n, err := readPackets(dev, 0, bufs, sizes)
			if err != nil {
				r.err = err
				return
			}
			for i := range n {
				select {
				case r.pkts <- bytes.Clone(packetAt(bufs, sizes, i)):
				default: // the test is not looking; the kernel's own chatter
				}
			}
		}
	})
	t.Cleanup(func() {
		dev.Close()
		wg.Wait()
	})
	return r
}

// waitUDP waits for the UDP datagram src→dst carrying payload, skipping
// the rest (IPv6 router solicitations, MLD reports).
func (r *reader) waitUDP(t *testing.T, src, dst netip.AddrPort, payload []byte) {
	t.Helper()
	timeout := time.After(waitTimeout)
	for {
		select {
		case pkt := <-r.pkts:
			s, d, p, ok := netnstest.ParseUDP(pkt)
			if ok && s == src && d == dst && bytes.Equal(p, payload) {
				return
			}
		case <-r.done:
			t.Fatalf("Read failed before the datagram %s→%s arrived: %v", src, dst, r.err)
		case <-timeout:
			t.Fatalf("no datagram %s→%s read from the device within %v", src, dst, waitTimeout)
		}
	}
}

// wait waits for the reader to stop and returns Read's error.
func (r *reader) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(waitTimeout):
		t.Fatalf("Read still blocked after %v", waitTimeout)
		return nil
	}
}

// listenUDP opens a UDP socket bound to addr inside the namespace.
func listenUDP(t *testing.T, nsPath string, addr netip.AddrPort) *net.UDPConn {
	t.Helper()
	var conn *net.UDPConn
	err := tundev.InNetns(nsPath, func() error {
		var err error
		conn, err = net.ListenUDP("udp", net.UDPAddrFromAddrPort(addr))
		return err
	})
	if err != nil {
		t.Fatalf("listen on %s in the namespace: %v", addr, err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// checkAddrs checks that link has the addresses in present, none of them
// tentative or failed, and none in absent.
func checkAddrs(t *testing.T, h *netlink.Handle, link netlink.Link, present, absent []netip.Prefix) {
	t.Helper()
	list, err := h.AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		t.Fatalf("list addresses: %v", err)
	}
	have := map[netip.Prefix]int{}
	for _, a := range list {
		ip, _ := netip.AddrFromSlice(a.IP)
		ones, _ := a.Mask.Size()
		have[netip.PrefixFrom(ip.Unmap(), ones)] = a.Flags
	}
	for _, p := range present {
		flags, ok := have[p]
		switch {
		case !ok:
			t.Errorf("address %s missing from %s (have %v)", p, link.Attrs().Name, list)
		case flags&(unix.IFA_F_TENTATIVE|unix.IFA_F_DADFAILED) != 0:
			t.Errorf("address %s is tentative or failed DAD (flags %#x)", p, flags)
		}
	}
	for _, p := range absent {
		if _, ok := have[p]; ok {
			t.Errorf("address %s still on %s", p, link.Attrs().Name)
		}
	}
}

// checkRoutes checks which destinations the main table routes through link.
func checkRoutes(t *testing.T, h *netlink.Handle, link netlink.Link, present, absent []netip.Prefix) {
	t.Helper()
	have := map[netip.Prefix]bool{}
	for _, family := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		list, err := h.RouteListFiltered(family, &netlink.Route{LinkIndex: link.Attrs().Index}, netlink.RT_FILTER_OIF)
		if err != nil {
			t.Fatalf("list routes: %v", err)
		}
		for _, r := range list {
			if r.Dst == nil {
				continue
			}
			ip, _ := netip.AddrFromSlice(r.Dst.IP)
			ones, _ := r.Dst.Mask.Size()
			have[netip.PrefixFrom(ip.Unmap(), ones)] = true
		}
	}
	for _, p := range present {
		if !have[p] {
			t.Errorf("no route to %s via %s", p, link.Attrs().Name)
		}
	}
	for _, p := range absent {
		if have[p] {
			t.Errorf("route to %s via %s still there", p, link.Attrs().Name)
		}
	}
}

// TestNoOffload: without offloads the fd carries bare packets, and a device
// made from that fd (as --tun-fd gets it) sees the same.
func TestNoOffload(t *testing.T) {
	netnstest.RequireRoot(t)
	_, nsPath := netnstest.NewBareNetns(t, "tundev")
	dev, err := tundev.Create(tundev.Config{NetnsPath: nsPath, NoOffload: true})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer dev.Close()
	if dev.VnetHdrLen() != 0 || dev.TSO() || dev.Offloads() != 0 {
		t.Errorf("VnetHdrLen, TSO, Offloads = %d, %v, %s; want 0, false, none", dev.VnetHdrLen(), dev.TSO(), dev.Offloads())
	}
	f, err := dev.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	dup, err := tundev.FromFile(f, 0)
	if err != nil {
		f.Close()
		t.Fatalf("FromFile: %v", err)
	}
	defer dup.Close()
	if dup.VnetHdrLen() != 0 {
		t.Errorf("FromFile of a device without offloads: VnetHdrLen = %d, want 0", dup.VnetHdrLen())
	}

	withVnet, err := tundev.Create(tundev.Config{Name: "tdvnet0", NetnsPath: nsPath})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	defer withVnet.Close()
	f, err = withVnet.DupFile()
	if err != nil {
		t.Fatal(err)
	}
	dup2, err := tundev.FromFile(f, 0)
	if err != nil {
		f.Close()
		t.Fatalf("FromFile: %v", err)
	}
	defer dup2.Close()
	if dup2.VnetHdrLen() != tundev.VnetHdrLen || !dup2.TSO() {
		t.Errorf("FromFile of a device with offloads: VnetHdrLen, TSO = %d, %v; want %d, true", dup2.VnetHdrLen(), dup2.TSO(), tundev.VnetHdrLen)
	}
}

// TestCreateRefusesAddressInUse: a second TUN in the namespace whose subnet
// overlaps the first one's is refused, naming the holder, and leaves no
// interface behind; a subnet of its own is accepted. Issue 15: two
// instances with the defaults both took 198.18.0.1/15 without a word.
func TestCreateRefusesAddressInUse(t *testing.T) {
	netnstest.RequireRoot(t)
	_, nsPath := netnstest.NewBareNetns(t, "tundev")
	first, err := tundev.Create(tundev.Config{Name: "nsdfirst", NetnsPath: nsPath,
		Addrs: []netip.Prefix{netip.MustParsePrefix("198.18.0.1/15"), netip.MustParsePrefix("fd00:1898::1/64")}})
	if err != nil {
		t.Fatalf("Create first: %v", err)
	}
	defer first.Close()
	for _, tc := range []struct {
		addr string
		ok   bool
	}{
		{"198.18.0.1/15", false},
		{"198.19.7.1/24", false}, // inside the first one's /15
		{"fd00:1898::2/64", false},
		{"198.20.0.1/15", true},
		{"fd00:1899::1/64", true},
	} {
		second, err := tundev.Create(tundev.Config{Name: "nsdsecond", NetnsPath: nsPath, Addrs: []netip.Prefix{netip.MustParsePrefix(tc.addr)}})
		if tc.ok {
			if err != nil {
				t.Errorf("%s: %v, want it accepted", tc.addr, err)
				continue
			}
			second.Close()
			continue
		}
		if err == nil {
			second.Close()
			t.Errorf("%s: accepted beside nsdfirst's addresses", tc.addr)
			continue
		}
		if !errors.Is(err, tundev.ErrAddrInUse) || !strings.Contains(err.Error(), "nsdfirst") {
			t.Errorf("%s: error %q, want ErrAddrInUse naming nsdfirst", tc.addr, err)
		}
		if _, lerr := netnstest.NetlinkHandle(t, nsPath).LinkByName("nsdsecond"); lerr == nil {
			t.Errorf("%s: the refused TUN was left behind", tc.addr)
		}
	}
}
