package tundev

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// Accessors for the external tests: what the device negotiated, in the
// terms the tests check it in.

func (d *Device) VnetHdrLen() int { return d.hdrLen() }
func (d *Device) TSO() bool       { return d.Capabilities().TSO }
func (d *Device) USO() bool       { return d.Capabilities().USO }
func (d *Device) NumQueues() int  { return d.Queues() }

// FlowQueue is the queue Write picks for pkt on a device of n queues.
func FlowQueue(pkt []byte, n int) int { return flowQueueOf(pkt, n) }

// InNetns runs fn on an OS thread that has joined the network namespace at
// netnsPath ("" runs fn in the current namespace). Sockets and TUN fds that
// fn opens belong to that namespace for their whole life, and may be used
// from any goroutine once InNetns returns. Goroutines that fn starts do not
// inherit the namespace. Other threads of the process are not affected.
func InNetns(netnsPath string, fn func() error) error {
	if netnsPath == "" {
		return fn()
	}
	ns, err := openNetns(netnsPath)
	if err != nil {
		return err
	}
	defer unix.Close(ns)
	return runInNetns(ns, fn)
}

// LinkExists reports whether an interface called name exists in the network
// namespace at netnsPath ("" for the current one).
func LinkExists(name, netnsPath string) (bool, error) {
	ns := noNetns
	if netnsPath != "" {
		var err error
		if ns, err = openNetns(netnsPath); err != nil {
			return false, err
		}
		defer unix.Close(ns)
	}
	h, err := newHandle(ns)
	if err != nil {
		return false, err
	}
	defer h.Close()
	_, err = h.LinkByName(name)
	if err == nil {
		return true, nil
	}
	if isNotFound(err) {
		return false, nil
	}
	return false, fmt.Errorf("look up link %q: %w", name, err)
}
