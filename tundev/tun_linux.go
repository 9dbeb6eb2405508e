package tundev

import (
	"errors"
	"fmt"
	"strings"

	"golang.org/x/sys/unix"
)

// tunFlags are the flags we ask TUNSETIFF for: a layer-3 device (IFF_TUN)
// whose reads and writes are IP packets without the 4-byte struct tun_pi in
// front (IFF_NO_PI). With offloads, IFF_VNET_HDR is added and each packet
// carries a struct virtio_net_hdr in front instead.
const tunFlags = unix.IFF_TUN | unix.IFF_NO_PI

// openTUN opens /dev/net/tun and binds it to the interface name, creating
// the interface if none has that name. It must run on a thread inside the
// namespace the interface belongs to. It returns the blocking fd, the
// interface's real name (the kernel expands a "%d" in name) and whether we
// created the interface or attached to a persistent one.
func openTUN(name string, vnet bool) (fd int, ifname string, created bool, err error) {
	fd, err = unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, "", false, fmt.Errorf("open /dev/net/tun: %w", err)
	}
	ifr, err := unix.NewIfreq(name)
	if err != nil {
		unix.Close(fd)
		return -1, "", false, err
	}
	flags := uint16(tunFlags)
	if vnet {
		flags |= unix.IFF_VNET_HDR
	}
	ifr.SetUint16(flags)
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
	_, have, err := tunGetIff(fd)
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
	return fd, ifr.Name(), have&unix.IFF_PERSIST == 0, nil
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
// we read and write (IFF_TUN, IFF_NO_PI, with or without a vnet header), or
// a socket that keeps packet boundaries (SOCK_SEQPACKET or SOCK_DGRAM, as
// tests and gVisor's fdbased tests use). It returns the TUN's interface
// name, or "" for a socket, and whether packets carry a vnet header.
func checkPacketFD(fd int) (name string, vnet bool, err error) {
	name, flags, tunErr := tunGetIff(fd)
	if tunErr == nil {
		if flags&tunFlags != tunFlags || flags&unix.IFF_TAP != 0 {
			return "", false, fmt.Errorf("tun %s: want flags IFF_TUN|IFF_NO_PI, have %#x", name, flags)
		}
		return name, flags&unix.IFF_VNET_HDR != 0, nil
	}
	typ, err := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	if err != nil {
		return "", false, fmt.Errorf("neither a TUN fd (%w) nor a socket", tunErr)
	}
	if typ != unix.SOCK_SEQPACKET && typ != unix.SOCK_DGRAM {
		return "", false, fmt.Errorf("socket of type %d does not keep packet boundaries", typ)
	}
	return "", false, nil
}

// VnetHdrLen is the size of the struct virtio_net_hdr
// (include/uapi/linux/virtio_net.h) in front of every packet of a device
// with offloads. It is the kernel's default; we never change it with
// TUNSETVNETHDRSZ, because the 12-byte form only adds num_buffers, which a
// TUN does not use.
const VnetHdrLen = 10

// Offloads are what a device with a vnet header lets the kernel hand over
// in one packet, and accepts from us.
type Offloads uint8

const (
	// OffloadCsum: packets may carry a partial checksum (NEEDS_CSUM), to
	// be completed over csum_start..end.
	OffloadCsum Offloads = 1 << iota
	// OffloadTSO: TCP segments up to 64 KiB, over IPv4 and IPv6, cut into
	// gso_size pieces by whoever delivers them to a socket.
	OffloadTSO
	// OffloadUSO: the same for UDP datagrams of one flow (kernel 6.2).
	OffloadUSO
)

func (o Offloads) String() string {
	if o == 0 {
		return "none"
	}
	var s []string
	if o&OffloadCsum != 0 {
		s = append(s, "csum")
	}
	if o&OffloadTSO != 0 {
		s = append(s, "tso4", "tso6")
	}
	if o&OffloadUSO != 0 {
		s = append(s, "uso4", "uso6")
	}
	return strings.Join(s, ",")
}

// setOffloads asks the kernel for TCP and UDP segmentation offload,
// falling back to TCP alone (kernels before 6.2 have no USO), to checksum
// offload alone, and then to none, and reports what it got.
func setOffloads(fd int) (Offloads, error) {
	const tso = unix.TUN_F_CSUM | unix.TUN_F_TSO4 | unix.TUN_F_TSO6
	tries := []struct {
		flags int
		got   Offloads
	}{
		{tso | unix.TUN_F_USO4 | unix.TUN_F_USO6, OffloadCsum | OffloadTSO | OffloadUSO},
		{tso, OffloadCsum | OffloadTSO},
		{unix.TUN_F_CSUM, OffloadCsum},
	}
	var errs []error
	for _, t := range tries {
		err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, t.flags)
		if err == nil {
			return t.got, errors.Join(errs...)
		}
		errs = append(errs, fmt.Errorf("TUNSETOFFLOAD %#x: %w", t.flags, err))
	}
	return 0, errors.Join(errs...)
}
