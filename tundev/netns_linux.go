package tundev

import (
	"errors"
	"fmt"
	"runtime"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// noNetns stands for "the caller's own namespace" where a namespace fd is
// expected.
const noNetns = -1

// openNetns opens the network namespace file at path (a bind mount such as
// /run/netns/NAME, or /proc/PID/ns/net) and checks that it is one. The
// caller closes the returned fd.
func openNetns(path string) (int, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return noNetns, fmt.Errorf("open netns %s: %w", path, err)
	}
	// NS_GET_NSTYPE (Linux 4.11, ioctl_ns(2)) tells a namespace file from
	// any other file, and a network namespace from the other kinds.
	kind, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		unix.Close(fd)
		return noNetns, fmt.Errorf("open netns %s: not a namespace file: %w", path, err)
	}
	if kind != unix.CLONE_NEWNET {
		unix.Close(fd)
		return noNetns, fmt.Errorf("open netns %s: not a network namespace", path)
	}
	return fd, nil
}

// runInNetns runs fn on a new goroutine locked to its thread, which joins
// the namespace ns while fn runs, and waits for it. With noNetns, fn runs on
// the caller's goroutine.
func runInNetns(ns int, fn func() error) error {
	if ns == noNetns {
		return fn()
	}
	errc := make(chan error, 1)
	go func() { errc <- netnsThread(ns, fn) }()
	return <-errc
}

// netnsThread is the body of the goroutine that runInNetns starts. If it
// cannot return its thread to the original namespace it leaves the thread
// locked: the runtime then ends the thread with the goroutine, instead of
// handing a thread in the wrong namespace to other goroutines.
func netnsThread(ns int, fn func() error) (err error) {
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open current netns: %w", err)
	}
	defer unix.Close(orig)
	if err := unix.Setns(ns, unix.CLONE_NEWNET); err != nil {
		// setns(2) failed, so the thread has not moved.
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns: %w", err)
	}
	defer func() {
		if berr := unix.Setns(orig, unix.CLONE_NEWNET); berr != nil {
			err = errors.Join(err, fmt.Errorf("return to original netns (thread discarded): %w", berr))
			return
		}
		runtime.UnlockOSThread()
	}()
	return fn()
}

// newHandle opens an rtnetlink handle whose socket lives in namespace ns
// (noNetns: the current one). Every request made through it acts there, from
// whichever thread makes it. We open the socket on our own namespace thread
// rather than with netlink.NewHandleAt, which unlocks its thread even when
// it failed to switch it back (nl.executeInNetns in netlink v1.3.1).
func newHandle(ns int) (*netlink.Handle, error) {
	var h *netlink.Handle
	err := runInNetns(ns, func() error {
		var err error
		h, err = netlink.NewHandle(unix.NETLINK_ROUTE)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("open rtnetlink: %w", err)
	}
	return h, nil
}
