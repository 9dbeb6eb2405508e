package tundev

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// tunFlags are the flags we ask TUNSETIFF for: a layer-3 device (IFF_TUN)
// whose reads and writes are bare IP packets, without the 4-byte
// struct tun_pi in front (IFF_NO_PI). IFF_VNET_HDR would go here.
const tunFlags = unix.IFF_TUN | unix.IFF_NO_PI

// openTUN opens /dev/net/tun and binds it to the interface name, creating
// the interface if none has that name. It must run on a thread inside the
// namespace the interface belongs to. It returns the blocking fd, the
// interface's real name (the kernel expands a "%d" in name) and whether we
// created the interface or attached to a persistent one.
func openTUN(name string) (fd int, ifname string, created bool, err error) {
	fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", false, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, "", false, err
	}
	ifr.SetUint16(tunFlags)
	if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
		unix.Close(fd)
		switch {
		case errors.Is(err, unix.EBUSY):
			err = fmt.Errorf("%w (another process has it open)", err)
		case errors.Is(err, unix.EINVAL):
			err = fmt.Errorf("%w (an interface of that name exists and is not a TUN, or is a multi-queue TUN)", err)
		}
		return -1, "", false, err
	}
	_, flags, err := tunGetIff(fd)
	if err != nil {
		unix.Close(fd)
		return -1, "", false, err
	}
	// TUNSETIFF creates the interface or attaches to an existing one
	// without saying which. An existing TUN that no fd holds can only be a
	// persistent one (the kernel unregisters a non-persistent TUN when its
	// last fd detaches, tun_detach), and one that an fd holds gives EBUSY
	// above, so IFF_PERSIST tells the two cases apart without a racy
	// look-up beforehand.
	return fd, ifr.Name(), flags&unix.IFF_PERSIST == 0, nil
}

// tunGetIff returns the name and flags of the TUN interface fd is attached
// to, and the error of TUNGETIFF otherwise (ENOTTY or EINVAL for other
// files, EBADFD for a TUN fd attached to nothing).
func tunGetIff(fd int) (string, uint16, error) {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return "", 0, err
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return "", 0, fmt.Errorf("TUNGETIFF: %w", err)
	}
	return ifr.Name(), ifr.Uint16(), nil
}

// checkPacketFD says whether fd is usable as a device: a TUN fd in the mode
// we read and write (IFF_TUN, IFF_NO_PI, no vnet header), or a socket that
// keeps packet boundaries (SOCK_SEQPACKET or SOCK_DGRAM, as tests and
// gVisor's fdbased tests use). It returns the TUN's interface name, or ""
// for a socket.
func checkPacketFD(fd int) (string, error) {
	name, flags, tunErr := tunGetIff(fd)
	if tunErr == nil {
		if flags&tunFlags != tunFlags || flags&unix.IFF_TAP != 0 {
			return "", fmt.Errorf("tun %s: want flags IFF_TUN|IFF_NO_PI, have %#x", name, flags)
		}
		if flags&unix.IFF_VNET_HDR != 0 {
			return "", fmt.Errorf("tun %s: IFF_VNET_HDR is not supported yet", name)
		}
		return name, nil
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return "", fmt.Errorf("neither a TUN fd (%w) nor a socket", tunErr)
	}
	if typ != unix.SOCK_SEQPACKET && typ != unix.SOCK_DGRAM {
		return "", fmt.Errorf("socket of type %d does not keep packet boundaries", typ)
	}
	return "", nil
}
