package tundev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// MaxQueues bounds Config.Queues. A queue costs a descriptor, a reader
// goroutine and its buffers (16 reads of up to 64 KiB: 1 MiB), and helps
// only while there is a CPU to run its reader; 16 is past the CPUs of the
// machines netstackd serves, and far below the kernel's own limit of 256
// (MAX_TAP_QUEUES in include/linux/if_tap.h).
const MaxQueues = 16

// openTUNQueues opens the interface name with n queues: one fd, exactly as
// openTUN does, when n is 1; otherwise n fds of a multi-queue TUN. It must
// run on a thread inside the interface's namespace. On error, every fd it
// opened is closed again.
func openTUNQueues(name string, vnet bool, n int) (fds []int, ifname string, created bool, err error) {
	if n <= 1 {
		fd, ifname, created, err := openTUN(name, vnet)
		if err != nil {
			return nil, "", false, err
		}
		return []int{fd}, ifname, created, nil
	}
	defer func() {
		if err != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
			fds = nil
		}
	}()
	flags := uint16(tunFlags | unix.IFF_MULTI_QUEUE)
	if vnet {
		flags |= unix.IFF_VNET_HDR
	}
	// IFF_TUN_EXCL makes TUNSETIFF fail with EBUSY when the name is taken,
	// which tells a new interface from an existing one without a racy
	// look-up. The IFF_PERSIST test openTUN relies on does not work here:
	// a multi-queue TUN that another process holds open lets us attach
	// too, and is not ours to delete.
	fd, err := setIff(name, flags|unix.IFF_TUN_EXCL)
	created = err == nil
	if errors.Is(err, unix.EBUSY) {
		fd, err = setIff(name, flags)
	}
	if err != nil {
		return nil, "", false, fmt.Errorf("queue 0 of %d: %w", n, mqError(err))
	}
	fds = append(fds, fd.fd)
	ifname = fd.name
	// The other queues attach to the interface by the name the kernel
	// gave it (name may hold a "%d").
	for i := 1; i < n; i++ {
		q, err := setIff(ifname, flags)
		if err != nil {
			return fds, "", false, fmt.Errorf("queue %d of %d: %w", i, n, mqError(err))
		}
		fds = append(fds, q.fd)
	}
	return fds, ifname, created, nil
}

// iffFD is an fd of /dev/net/tun bound to an interface.
type iffFD struct {
	fd   int
	name string
}

// setIff opens /dev/net/tun and binds it with TUNSETIFF to name, with
// flags; it returns the blocking fd and the interface's name.
func setIff(name string, flags uint16) (iffFD, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return iffFD{-1, ""}, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return iffFD{-1, ""}, err
	}
	ifr.SetUint16(flags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		return iffFD{-1, ""}, fmt.Errorf("TUNSETIFF: %w", err)
	}
	return iffFD{fd, ifr.Name()}, nil
}

// mqError explains what TUNSETIFF's errors mean for a multi-queue open
// (tun_set_iff and tun_attach in drivers/net/tun.c).
func mqError(err error) error {
	switch {
	case errors.Is(err, unix.EINVAL):
		return fmt.Errorf("%w (an interface of that name exists and is not a multi-queue TUN, or was opened with other flags; use one queue or another name)", err)
	case errors.Is(err, unix.E2BIG):
		return fmt.Errorf("%w (the interface has all the queues it can take)", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w (attaching to a TUN needs CAP_NET_ADMIN or to be its owner)", err)
	}
	return err
}

// setQueueOffloads asks for the same offloads on every queue's fd. The
// offloads belong to the interface, so the answers agree in practice;
// should one differ, the device claims only what all of them granted.
func setQueueOffloads(fds []int) (Offloads, error) {
	var got Offloads
	var errs []error
	for i, fd := range fds {
		o, err := setOffloads(fd)
		if err != nil {
			errs = append(errs, err)
		}
		if i == 0 {
			got = o
		} else {
			got &= o
		}
	}
	return got, errors.Join(errs...)
}
