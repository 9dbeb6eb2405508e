package udpnat

import (
	"encoding/binary"
	"net/netip"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Batched datagram I/O on an upstream UDP socket: sendmmsg(2) and
// recvmmsg(2) called directly. golang.org/x/net's ipv4/ipv6 ReadBatch and
// WriteBatch do the same, but their ReadBatch allocates a net.UDPAddr for
// every datagram received and their WriteBatch waits in the poller when the
// socket's buffer is full; here the headers, vectors and addresses live in
// buffers reused from one batch to the next, and every call is
// MSG_DONTWAIT, so that the device reader never waits on an upstream.

// mmsghdr is struct mmsghdr of <sys/socket.h>: a msghdr and the number of
// bytes the call moved for it. Go pads it as C does (to 64 bytes on 64-bit
// platforms).
type mmsghdr struct {
	hdr unix.Msghdr
	n   uint32
}

// rawSockaddr holds a struct sockaddr_in or sockaddr_in6.
type rawSockaddr [unix.SizeofSockaddrInet6]byte

// sendmmsg sends hs on the socket fd in one call. It returns how many were
// sent; errno is set only when none was.
func sendmmsg(fd uintptr, hs []mmsghdr, flags int) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_SENDMMSG, fd, uintptr(unsafe.Pointer(&hs[0])), uintptr(len(hs)), uintptr(flags), 0, 0)
	return int(n), errno
}

// recvmmsg receives up to len(hs) datagrams on the socket fd in one call.
// It returns how many it received; errno is set only when none was, and an
// error met after the first datagram is reported by the next call.
func recvmmsg(fd uintptr, hs []mmsghdr, flags int) (int, unix.Errno) {
	n, _, errno := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&hs[0])), uintptr(len(hs)), uintptr(flags), 0, 0)
	return int(n), errno
}

// setBuffer points h at one buffer, with room for an address in name.
func (h *mmsghdr) setBuffer(iov *unix.Iovec, b []byte, name *rawSockaddr, namelen uint32) {
	iov.Base = unsafe.SliceData(b)
	iov.SetLen(len(b))
	h.hdr.Name = &name[0]
	h.hdr.Namelen = namelen
	h.hdr.Iov = iov
	h.hdr.SetIovlen(1)
	h.hdr.Control = nil
	h.hdr.SetControllen(0)
	h.hdr.Flags = 0
	h.n = 0
}

// putSockaddr writes ap into sa as an address of the socket's family
// (unix.AF_INET or unix.AF_INET6, where an IPv4 address is v4-mapped) and
// returns its length; 0 means the family cannot reach ap.
func putSockaddr(sa *rawSockaddr, family int, ap netip.AddrPort) uint32 {
	addr := ap.Addr()
	*sa = rawSockaddr{}
	binary.NativeEndian.PutUint16(sa[0:2], uint16(family))
	binary.BigEndian.PutUint16(sa[2:4], ap.Port())
	switch {
	case family == unix.AF_INET && addr.Is4():
		a := addr.As4()
		copy(sa[4:8], a[:])
		return unix.SizeofSockaddrInet4
	case family == unix.AF_INET6 && addr.IsValid():
		a := addr.As16()
		copy(sa[8:24], a[:])
		return unix.SizeofSockaddrInet6
	}
	return 0
}

// sockaddrAddrPort reads the address the kernel put in sa (namelen bytes),
// v4-mapped addresses unmapped.
func sockaddrAddrPort(sa *rawSockaddr, namelen uint32) netip.AddrPort {
	port := binary.BigEndian.Uint16(sa[2:4])
	switch binary.NativeEndian.Uint16(sa[0:2]) {
	case unix.AF_INET:
		if namelen >= unix.SizeofSockaddrInet4 {
			return netip.AddrPortFrom(netip.AddrFrom4([4]byte(sa[4:8])), port)
		}
	case unix.AF_INET6:
		if namelen >= unix.SizeofSockaddrInet6 {
			return netip.AddrPortFrom(netip.AddrFrom16([16]byte(sa[8:24])).Unmap(), port)
		}
	}
	return netip.AddrPort{}
}
