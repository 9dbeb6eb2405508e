package tundev

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
)

// errDeleted is why a device whose interface was deleted went down.
var errDeleted = errors.New("interface deleted")

// watchLink follows the interface's rtnetlink events in namespace ns (an
// open namespace fd, or noNetns): its deletion ends the device (EventDown),
// even before a read notices, and an MTU change is reported (EventMTU). The
// subscription is made before watchLink returns; the goroutine that reads it
// is the device's, stopped and waited for in Close.
func (d *Device) watchLink(ns, ifindex, mtu int) error {
	updates := make(chan netlink.LinkUpdate, 16)
	done := make(chan struct{})
	opts := netlink.LinkSubscribeOptions{
		ErrorCallback: func(err error) { d.log.Debug("tun link events", "tun", d.name, "err", err) },
	}
	if ns != noNetns {
		h := netns.NsHandle(ns)
		opts.Namespace = &h
	}
	if err := netlink.LinkSubscribeWithOptions(updates, done, opts); err != nil {
		return fmt.Errorf("watch tun %s: %w", d.name, err)
	}
	d.stopWatch = func() { close(done) }
	d.watcher.Go(func() {
		// The subscription closes updates once done is closed; until
		// then every update is read, or the library's reader would block.
		for u := range updates {
			if int(u.Index) != ifindex {
				continue
			}
			switch {
			case u.Header.Type == unix.RTM_DELLINK:
				d.down(errDeleted)
			case u.Attrs() != nil && u.Attrs().MTU != mtu && u.Attrs().MTU > 0:
				mtu = u.Attrs().MTU
				d.emit(device.Event{Kind: device.EventMTU, MTU: mtu})
			}
		}
	})
	return nil
}
