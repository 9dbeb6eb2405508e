package main

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/tundev"
)

// tunHint adds to an error from creating or opening the TUN what the user
// can do about it: the kernel's "permission denied" and "operation not
// permitted" say neither which of the two checks failed nor how to pass it.
// runMode is true in run's child, which has every capability in a user
// namespace of its own, so only the device node's mode can stop it.
func tunHint(err error, runMode bool) error {
	if err == nil {
		return nil
	}
	msg := err.Error()
	switch {
	case errors.Is(err, tundev.ErrAddrInUse):
		return fmt.Errorf("%w (another netstackd? give this one other --addr, --dns-addr and --fake-ip-range)", err)
	case errors.Is(err, unix.EACCES) && strings.Contains(msg, "/dev/net/tun"):
		hint := "/dev/net/tun does not let this user open it"
		if fi, serr := os.Stat("/dev/net/tun"); serr == nil {
			hint = fmt.Sprintf("/dev/net/tun has mode %04o", fi.Mode().Perm())
		}
		return fmt.Errorf("%w: %s; distributions ship it as 0666 (chmod 0666 /dev/net/tun as root), or run netstackd as root", err, hint)
	case errors.Is(err, unix.EPERM) && !runMode:
		return fmt.Errorf("%w: creating and configuring a TUN needs CAP_NET_ADMIN: run netstackd as root (or with that capability), or use `netstackd run`, which needs no root", err)
	case errors.Is(err, unix.EPERM):
		return fmt.Errorf("%w: this system does not let unprivileged users create a TUN in a user namespace of their own (check kernel.unprivileged_userns_clone and any AppArmor or SELinux policy on user namespaces)", err)
	}
	return err
}
