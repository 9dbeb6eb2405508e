package tundev

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"unicode"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
)

const (
	// DefaultName is the interface name used when Config.Name is "".
	DefaultName = "netstack0"
	// DefaultMTU is the MTU used when Config.MTU (or FromFile's mtu) is 0.
	DefaultMTU = 1500
	// DefaultTxQueueLen replaces the kernel's 500: a burst of datagrams
	// from a client (a UDP sender at 1 Gb/s) overflowed 500 while the
	// reader was busy with the batch before; at 2000 none was dropped in
	// the UDP bench, and 5000 or 10000 gained nothing more.
	DefaultTxQueueLen = 2000

	// minMTU and maxMTU are the TUN driver's limits (ETH_MIN_MTU and
	// MAX_MTU in drivers/net/tun.c).
	minMTU = 68
	maxMTU = 65535
	// minMTU6 is IPv6's minimum link MTU (RFC 8200 section 5); below it the
	// kernel disables IPv6 on the interface and refuses IPv6 addresses.
	minMTU6 = 1280
)

// Config says which TUN interface Create opens and how it configures it.
// The zero value asks for "netstack0" in the current namespace, MTU 1500,
// no addresses and no routes.
type Config struct {
	// Name is the interface name; "" means DefaultName. A name that
	// contains "%d" lets the kernel pick the number (Device.Name tells).
	// If a persistent TUN of that name exists, Create attaches to it.
	Name string
	// NetnsPath is the network namespace to create and configure the
	// interface in, as a file such as /run/netns/NAME or /proc/PID/ns/net;
	// "" means the current namespace. The calling threads stay where they
	// are. In another namespace, Create also sets its loopback up.
	NetnsPath string
	// MTU is the interface MTU; 0 means DefaultMTU.
	MTU int
	// Addrs are the addresses to add to the interface, with their prefix
	// lengths (198.18.0.1/15). IPv6 addresses skip duplicate address
	// detection, so they are usable at once.
	Addrs []netip.Prefix
	// Routes are the destinations to route through the interface, added by
	// Up after the link is up; nil means none. Host bits must be zero.
	Routes []netip.Prefix
	// TxQueueLen is how many packets the kernel queues for us to read
	// before it drops; 0 means DefaultTxQueueLen. Set only on an interface
	// Create creates.
	TxQueueLen int
	// NoOffload opens the device without IFF_VNET_HDR: every read and
	// write then moves one MTU-sized packet. By default the device carries
	// a virtio_net_hdr in front of each packet and TCP segments of up to
	// 64 KiB (see Offloads and Capabilities).
	NoOffload bool
	// Queues is how many queues the device has; 0 or 1 means one, the
	// classic single-queue TUN. With more, the interface is a multi-queue
	// TUN (IFF_MULTI_QUEUE) opened Queues times: the kernel spreads flows
	// over the queues, and each can be read by a goroutine of its own
	// (Read takes the queue). At most MaxQueues.
	Queues int
	// Logger receives configuration events; nil means discard.
	Logger *slog.Logger
}

// Device is an open TUN interface. Read and Write move IP packets and
// may be called concurrently with each other and with Close.
type Device struct {
	// queues holds one open fd per queue, at least one.
	queues []*queue

	name  string
	mtu   int
	netns string // Config.NetnsPath, for logs
	log   *slog.Logger

	vnet     bool     // every packet carries a virtio_net_hdr
	offloads Offloads // what the kernel agreed to, with vnet

	droppedFrames atomic.Uint64 // frames whose vnet header made no sense

	events   chan device.Event
	evMu     sync.Mutex // guards evClosed and sending on events
	evClosed bool
	// stopWatch ends the link watcher (watch_linux.go) of a device that
	// Create made; nil for others. watcher waits for it.
	stopWatch func()
	watcher   sync.WaitGroup

	mu     sync.Mutex // guards link, isUp and closed
	link   *link      // nil for FromFile devices
	isUp   bool
	routes []netip.Prefix
	closed bool

	closeOnce sync.Once
	closeErr  error
}

// Create opens the TUN interface cfg describes, creating it or attaching to
// a persistent one, and configures its MTU and addresses. The link stays
// down until Up. On error, everything done so far is undone.
func Create(cfg Config) (_ *Device, err error) {
	if err := cfg.normalize(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	where := "the current netns"
	ns := noNetns
	if cfg.NetnsPath != "" {
		where = "netns " + cfg.NetnsPath
		if ns, err = openNetns(cfg.NetnsPath); err != nil {
			return nil, err
		}
		defer unix.Close(ns)
	}

	// The TUN must be opened by a thread inside the namespace; the netlink
	// socket opened beside it keeps working there from any thread.
	var fds []int
	var name string
	var created bool
	var h *netlink.Handle
	vnet := !cfg.NoOffload
	closeFDs := func() {
		// Closing the last fd deletes the interface if we created it.
		for _, fd := range fds {
			unix.Close(fd)
		}
	}
	err = runInNetns(ns, func() error {
		var err error
		if fds, name, created, err = openTUNQueues(cfg.Name, vnet, cfg.Queues); err != nil {
			return err
		}
		h, err = newHandle(noNetns)
		return err
	})
	if err != nil {
		closeFDs()
		return nil, fmt.Errorf("create tun %q in %s: %w", cfg.Name, where, err)
	}
	// Non-blocking before os.NewFile, so that the file is registered with
	// the poller: a Read then parks in the runtime instead of a syscall,
	// and Close wakes it with os.ErrClosed.
	for _, fd := range fds {
		if err := unix.SetNonblock(fd, true); err != nil {
			closeFDs()
			h.Close()
			return nil, fmt.Errorf("create tun %q in %s: set non-blocking: %w", name, where, err)
		}
	}
	var offloads Offloads
	if vnet {
		var oerr error
		if offloads, oerr = setQueueOffloads(fds); oerr != nil {
			log.Warn("tun offloads reduced: every packet costs a read or write", "tun", name, "offloads", offloads, "err", oerr)
		}
	}
	d, err := newDevice(fds, name, cfg.MTU, vnet, offloads)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("create tun %q in %s: %w", name, where, err)
	}
	d.netns, d.log, d.routes = cfg.NetnsPath, log, slices.Clone(cfg.Routes)
	l, err := newLink(h, name, where, created, log)
	if err != nil {
		d.closeQueues()
		return nil, err
	}
	d.link = l
	defer func() {
		if err != nil {
			err = errors.Join(err, d.Close())
		}
	}()
	if err := l.setMTU(cfg.MTU); err != nil {
		return nil, err
	}
	if err := l.setTxQueueLen(cfg.TxQueueLen); err != nil {
		return nil, err
	}
	for _, p := range cfg.Addrs {
		if err := l.addAddr(p); err != nil {
			return nil, err
		}
	}
	if ns != noNetns {
		if err := bringUpLoopback(l.h); err != nil {
			return nil, fmt.Errorf("in %s: %w", where, err)
		}
	}
	if err := d.watchLink(ns, l.nl.Attrs().Index, cfg.MTU); err != nil {
		return nil, err
	}
	verb := "tun attached"
	if created {
		verb = "tun created"
	}
	log.Info(verb, "tun", name, "netns", cfg.NetnsPath, "mtu", cfg.MTU, "addrs", fmt.Sprint(cfg.Addrs), "offloads", offloads, "queues", len(d.queues))
	return d, nil
}

// normalize fills in defaults and rejects what the kernel would reject less
// clearly, before anything is created.
func (c *Config) normalize() error {
	if c.Name == "" {
		c.Name = DefaultName
	}
	if err := checkName(c.Name); err != nil {
		return err
	}
	if c.MTU == 0 {
		c.MTU = DefaultMTU
	}
	if c.TxQueueLen == 0 {
		c.TxQueueLen = DefaultTxQueueLen
	}
	if c.Queues == 0 {
		c.Queues = 1
	}
	if c.Queues < 1 || c.Queues > MaxQueues {
		return fmt.Errorf("queues %d out of range [1, %d]", c.Queues, MaxQueues)
	}
	if c.TxQueueLen < 0 {
		return fmt.Errorf("txqueuelen %d: want a positive count", c.TxQueueLen)
	}
	if c.MTU < minMTU || c.MTU > maxMTU {
		return fmt.Errorf("mtu %d out of range [%d, %d]", c.MTU, minMTU, maxMTU)
	}
	v6 := false
	for _, p := range c.Addrs {
		if !p.IsValid() || p.Addr().Is4In6() {
			return fmt.Errorf("address %s: not an IPv4 or IPv6 prefix", p)
		}
		v6 = v6 || p.Addr().Is6()
	}
	for _, p := range c.Routes {
		if !p.IsValid() || p.Addr().Is4In6() {
			return fmt.Errorf("route %s: not an IPv4 or IPv6 prefix", p)
		}
		if p != p.Masked() {
			return fmt.Errorf("route %s: host bits set (did you mean %s?)", p, p.Masked())
		}
		v6 = v6 || p.Addr().Is6()
	}
	if v6 && c.MTU < minMTU6 {
		return fmt.Errorf("mtu %d is below %d, the least IPv6 allows, but IPv6 addresses or routes are configured", c.MTU, minMTU6)
	}
	return nil
}

// checkName applies the kernel's dev_valid_name (net/core/dev.c).
func checkName(name string) error {
	if len(name) >= unix.IFNAMSIZ {
		return fmt.Errorf("interface name %q longer than %d bytes", name, unix.IFNAMSIZ-1)
	}
	if name == "." || name == ".." || strings.ContainsFunc(name, func(r rune) bool {
		return r == '/' || r == ':' || unicode.IsSpace(r)
	}) {
		return fmt.Errorf("invalid interface name %q", name)
	}
	return nil
}

// FromFile makes a Device of an already configured TUN fd, such as one a
// parent process created and passed down. Up then does nothing and Close
// only closes the fd: configuring and removing the interface stay with
// whoever made it. mtu 0 means DefaultMTU.
//
// f must be a TUN fd in IFF_TUN|IFF_NO_PI mode, or a socket that keeps
// packet boundaries (SOCK_SEQPACKET, SOCK_DGRAM), which tests use in place
// of a TUN. A TUN opened with IFF_VNET_HDR keeps it, and FromFile asks for
// the same offloads Create does (Offloads tells what it got). The device
// has one queue (one descriptor of a multi-queue TUN is one of its queues).
// On success the Device owns the descriptor and f is closed; on error f is
// left as it was.
func FromFile(f *os.File, mtu int) (*Device, error) {
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < minMTU || mtu > maxMTU {
		return nil, fmt.Errorf("mtu %d out of range [%d, %d]", mtu, minMTU, maxMTU)
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("device from %s: %w", f.Name(), err)
	}
	var name string
	var fd int
	var vnet bool
	var offloads Offloads
	cerr := rc.Control(func(sysfd uintptr) {
		if name, vnet, err = checkPacketFD(int(sysfd)); err != nil {
			return
		}
		if vnet {
			// A TUN that cannot take offloads still works with a
			// header that says "none": Offloads reports it.
			offloads, _ = setOffloads(int(sysfd))
		}
		// A duplicate made non-blocking becomes poller-owned in
		// os.NewFile, whether or not f was: a file created from a
		// blocking fd would leave Read stuck in read(2) past Close.
		if fd, err = unix.FcntlInt(sysfd, unix.F_DUPFD_CLOEXEC, 0); err != nil {
			return
		}
		if err = unix.SetNonblock(fd, true); err != nil {
			unix.Close(fd)
		}
	})
	if err = errors.Join(cerr, err); err != nil {
		return nil, fmt.Errorf("device from %s: %w", f.Name(), err)
	}
	if name == "" {
		name = f.Name()
	}
	d, err := newDevice([]int{fd}, name, mtu, vnet, offloads)
	if err != nil {
		return nil, fmt.Errorf("device from %s: %w", f.Name(), err)
	}
	f.Close()
	return d, nil
}

// newDevice wraps non-blocking TUN (or packet socket) fds, one per queue,
// which it owns from then on: on error they are closed.
func newDevice(fds []int, name string, mtu int, vnet bool, offloads Offloads) (*Device, error) {
	d := &Device{
		name:     name,
		mtu:      mtu,
		log:      slog.New(slog.DiscardHandler),
		vnet:     vnet,
		offloads: offloads,
		events:   make(chan device.Event, 4),
	}
	var errs []error
	for i, fd := range fds {
		fname := "tun " + name
		if len(fds) > 1 {
			fname = fmt.Sprintf("tun %s queue %d", name, i)
		}
		q, err := newQueue(fd, fname)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		d.queues = append(d.queues, q)
	}
	if err := errors.Join(errs...); err != nil {
		d.closeQueues()
		return nil, err
	}
	return d, nil
}

// closeQueues closes every queue's fd; the first error is kept.
func (d *Device) closeQueues() error {
	var errs []error
	for _, q := range d.queues {
		if err := q.file.Close(); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Up sets the link up and then adds Config.Routes, so a caller that sees the
// routes knows the device is ready. If a route cannot be added, Up removes
// those it added and sets the link down again. Calling Up again does
// nothing; for a device from FromFile, Up does nothing.
func (d *Device) Up() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return fmt.Errorf("set %s up: %w", d.name, os.ErrClosed)
	}
	if d.link == nil || d.isUp {
		return nil
	}
	if err := d.link.up(d.routes); err != nil {
		return err
	}
	d.isUp = true
	d.log.Info("tun up", "tun", d.name, "netns", d.netns, "routes", fmt.Sprint(d.routes))
	return nil
}

// Offloads is what the kernel agreed to hand over and accept in one packet.
func (d *Device) Offloads() Offloads { return d.offloads }

// MTU is the MTU the device was configured with.
func (d *Device) MTU() int { return d.mtu }

// Name is the interface name.
func (d *Device) Name() string { return d.name }

// Close closes the fd of every queue, which wakes a blocked Read with
// os.ErrClosed, then
// deletes the interface if Create created it, or else removes the routes
// and addresses it added and restores the MTU and link state. It works
// whatever namespace the interface is in. Later calls return the first
// call's result.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		if d.stopWatch != nil {
			// Before the interface is deleted below: that is ours,
			// not an event.
			d.stopWatch()
			d.watcher.Wait()
		}
		errs := []error{d.closeQueues()}
		d.closeEvents()
		d.mu.Lock()
		d.closed = true
		if d.link != nil {
			errs = append(errs, d.link.undo())
			d.link = nil
		}
		d.mu.Unlock()
		d.closeErr = errors.Join(errs...)
		d.log.Info("tun closed", "tun", d.name, "netns", d.netns)
	})
	return d.closeErr
}

// DupFile returns a duplicate of the device's descriptor, for handing the
// TUN to another process (SCM_RIGHTS). The caller owns the duplicate; the
// interface lives as long as any descriptor for it is open. A multi-queue
// device has no single descriptor to hand over, and DupFile refuses it.
func (d *Device) DupFile() (*os.File, error) {
	if len(d.queues) > 1 {
		return nil, fmt.Errorf("dup %s: a device of %d queues has as many descriptors; open it with one queue to hand it over", d.name, len(d.queues))
	}
	rc, err := d.queues[0].file.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("dup %s: %w", d.name, err)
	}
	var fd int
	cerr := rc.Control(func(sysfd uintptr) {
		fd, err = unix.FcntlInt(sysfd, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err = errors.Join(cerr, err); err != nil {
		return nil, fmt.Errorf("dup %s: %w", d.name, err)
	}
	return os.NewFile(uintptr(fd), "tun "+d.name), nil
}
