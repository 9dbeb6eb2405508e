package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The TUN is opened here, not with the product's tundev, so that this
// module does not depend on the one it measures: a floor that moved with
// every change to tundev would be no floor. It is what tundev.Create does
// with NoOffload, one queue, and nothing to undo but closing the fd.
const (
	// mtu is the TUN's MTU, as bench.sh gives every path.
	mtu = 1500
	// txQueueLen is the kernel's queue of packets for us to read: 2000,
	// as netstackd sets, so that both lose a burst alike.
	txQueueLen = 2000
	// readBatch is the most packets one read takes, as netstackd reads.
	readBatch = 16
)

// tun is a TUN interface of one queue without a virtio_net_hdr: every read
// and write is one whole IP packet. It owns the only fd of the interface,
// so closing it deletes the interface, and its addresses and routes with
// it.
type tun struct {
	name string
	file *os.File
	raw  syscall.RawConn

	// batch is the read in progress, and readQueued the method value
	// RawConn.Read calls, made once so that reading allocates nothing.
	// read is not called concurrently with itself.
	batch      readBatchState
	readQueued func(fd uintptr) bool
}

type readBatchState struct {
	bufs  [][]byte
	sizes []int
	count int
}

// openTUN creates the TUN interface name in the network namespace at
// netnsPath ("" for ours), adds addrs to it, sets it and the namespace's
// loopback up, and routes routes into it. On error nothing is left behind.
func openTUN(netnsPath, name string, addrs, routes []netip.Prefix) (_ *tun, err error) {
	where := "netns " + netnsPath
	if netnsPath == "" {
		where = "the current netns"
	}
	fd := -1
	var h *netlink.Handle
	// The TUN must be opened by a thread inside the namespace; the
	// netlink socket opened beside it acts there from any thread.
	err = inNetns(netnsPath, func() error {
		var err error
		if fd, err = tunOpen(name); err != nil {
			return err
		}
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("open rtnetlink: %w", err)
		}
		return nil
	})
	if err != nil {
		if fd >= 0 {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("create tun %q in %s: %w", name, where, err)
	}
	defer h.Close()
	// Non-blocking before os.NewFile, so that the file is registered with
	// the poller: a read then parks in the runtime, and Close wakes it
	// with os.ErrClosed.
	if err := unix.SetNonblock(fd, true); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("create tun %q in %s: set non-blocking: %w", name, where, err)
	}
	t := &tun{name: name, file: os.NewFile(uintptr(fd), "tun "+name)}
	if t.raw, err = t.file.SyscallConn(); err != nil {
		t.file.Close()
		return nil, fmt.Errorf("create tun %q in %s: %w", name, where, err)
	}
	t.readQueued = t.readQueuedFD
	if err := configure(h, name, addrs, routes); err != nil {
		t.file.Close()
		return nil, fmt.Errorf("configure tun %q in %s: %w", name, where, err)
	}
	return t, nil
}

// inNetns runs fn on a thread that has joined the network namespace at path
// ("" runs fn here). The thread never goes back: its goroutine ends still
// locked to it, so the runtime ends the thread too, and no other goroutine
// ever runs in the namespace.
func inNetns(path string, fn func() error) error {
	if path == "" {
		return fn()
	}
	ns, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open netns: %w", err)
	}
	defer unix.Close(ns)
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- fn()
	}()
	return <-errc
}

// tunOpen opens /dev/net/tun and creates the interface name on it, a
// layer-3 device (IFF_TUN) whose packets have no struct tun_pi in front
// (IFF_NO_PI). It returns the blocking fd.
func tunOpen(name string) (int, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("TUNSETIFF: %w", err)
	}
	return fd, nil
}

// configure sets the MTU and queue length of the link name, adds addrs, sets
// lo and the link up, then adds routes: routes appearing means the device
// is ready, which is what bench.sh waits for.
func configure(h *netlink.Handle, name string, addrs, routes []netip.Prefix) error {
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("look up link: %w", err)
	}
	if err := h.LinkSetMTU(l, mtu); err != nil {
		return fmt.Errorf("set mtu %d: %w", mtu, err)
	}
	if err := h.LinkSetTxQLen(l, txQueueLen); err != nil {
		return fmt.Errorf("set txqueuelen %d: %w", txQueueLen, err)
	}
	for _, p := range addrs {
		a := &netlink.Addr{IPNet: ipNet(p)}
		if p.Addr().Is6() {
			// No duplicate address detection: usable at once.
			a.Flags = unix.IFA_F_NODAD
		}
		if err := h.AddrAdd(l, a); err != nil {
			return fmt.Errorf("add address %s: %w", p, err)
		}
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("look up lo: %w", err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("set link up: %w", err)
	}
	for _, p := range routes {
		r := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: ipNet(p)}
		if p.Addr().Is4() {
			// What `ip route add PREFIX dev NAME` sets for IPv4.
			r.Scope = netlink.SCOPE_LINK
		}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("add route %s: %w", p, err)
		}
	}
	return nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// read reads packets into bufs[i] and their lengths into sizes[i], and
// returns how many it read: it blocks until one arrives, then takes what
// else is already queued, up to len(bufs), without waiting again. After
// Close it returns an error matching os.ErrClosed.
func (t *tun) read(bufs [][]byte, sizes []int) (int, error) {
	n, err := t.file.Read(bufs[0])
	if err != nil {
		return 0, err
	}
	sizes[0] = n
	if len(bufs) == 1 {
		return 1, nil
	}
	// EAGAIN ends the batch; any other error is left for the next read.
	t.batch = readBatchState{bufs: bufs, sizes: sizes, count: 1}
	_ = t.raw.Read(t.readQueued)
	count := t.batch.count
	t.batch = readBatchState{}
	return count, nil
}

func (t *tun) readQueuedFD(fd uintptr) bool {
	b := &t.batch
	for b.count < len(b.bufs) {
		n, err := unix.Read(int(fd), b.bufs[b.count])
		if err != nil || n <= 0 {
			break
		}
		b.sizes[b.count] = n
		b.count++
	}
	return true
}

// write writes pkt as one packet.
func (t *tun) write(pkt []byte) error {
	if _, err := t.file.Write(pkt); err != nil {
		if errors.Is(err, unix.EBADFD) {
			return fmt.Errorf("%w (the interface was deleted)", err)
		}
		return err
	}
	return nil
}

// Close closes the fd, which deletes the interface, and wakes a blocked
// read.
func (t *tun) Close() error { return t.file.Close() }
