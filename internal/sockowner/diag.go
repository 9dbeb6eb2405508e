package sockowner

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"golang.org/x/sys/unix"
)

// Sizes of the sock_diag messages, from linux/netlink.h and
// linux/inet_diag.h: a netlink header, then an inet_diag_req_v2 (4 bytes
// and an inet_diag_sockid) going out, an inet_diag_msg (4 bytes, the
// sockid, then expires, rqueue, wqueue, uid, inode) coming back.
const (
	nlmsgHdrLen  = 16
	sockIDLen    = 48
	diagReqLen   = 4 + 4 + sockIDLen
	diagMsgLen   = 4 + sockIDLen + 5*4
	requestLen   = nlmsgHdrLen + diagReqLen
	replyBufSize = 8 << 10 // one inet_diag_msg and its few attributes
	nlmsgErrLen  = 4       // the errno that starts an NLMSG_ERROR payload
)

// sockDiagByFamily is SOCK_DIAG_BY_FAMILY (linux/sock_diag.h).
const sockDiagByFamily = 20

// allStates asks for a socket in any TCP state: a client's socket is still
// SYN_SENT when its SYN reaches the TUN.
const allStates = 0xffffffff

// netlinkWait bounds the wait for the kernel's answer when the caller's
// context sets no earlier deadline. The kernel answers an exact lookup
// while handling the send (sock_diag runs in the sender's context), so the
// reply is queued before write returns; the bound is for the unexpected.
const netlinkWait = 50 * time.Millisecond

// diagSocket is what sock_diag reported about one socket.
type diagSocket struct {
	local, remote netip.AddrPort
	uid           uint32
	inode         uint32
}

// diagConn is one NETLINK_SOCK_DIAG socket, connected to the kernel. It is
// not safe for concurrent use: requests and answers share one queue, which
// Finder guards with its mutex.
type diagConn struct {
	fd  int
	seq uint32
	req [requestLen]byte
	buf []byte
	pfd [1]unix.PollFd
}

func newDiagConn() (*diagConn, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("open sock_diag netlink socket: %w", err)
	}
	// Connected to the kernel (port 0), so plain read and write do, with no
	// address to allocate per call.
	if err := unix.Connect(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("connect sock_diag netlink socket: %w", err)
	}
	c := &diagConn{fd: fd, buf: make([]byte, replyBufSize)}
	c.pfd[0] = unix.PollFd{Fd: int32(fd), Events: unix.POLLIN}
	return c, nil
}

func (c *diagConn) close() error { return unix.Close(c.fd) }

// query asks the kernel for the one socket a packet from remote to local
// would reach (UDP) or the connection local–remote (TCP), the same
// lookups the kernel does on receive. local and remote are of one family,
// unmapped. It returns errNoSocket when the kernel knows none.
func (c *diagConn) query(proto uint8, local, remote netip.AddrPort, deadline time.Time) (diagSocket, error) {
	c.seq++
	c.fillRequest(proto, local, remote)
	if _, err := unix.Write(c.fd, c.req[:]); err != nil {
		return diagSocket{}, fmt.Errorf("send sock_diag request: %w", err)
	}
	for {
		ms := time.Until(deadline).Milliseconds()
		if ms <= 0 {
			ms = 1 // the reply is normally queued already: look once
		}
		n, err := unix.Poll(c.pfd[:], int(ms))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return diagSocket{}, fmt.Errorf("wait for sock_diag reply: %w", err)
		}
		if n == 0 {
			return diagSocket{}, fmt.Errorf("wait for sock_diag reply: %w", errTimeout)
		}
		n, err = unix.Read(c.fd, c.buf)
		if err == unix.EINTR || err == unix.EAGAIN {
			continue
		}
		if err != nil {
			return diagSocket{}, fmt.Errorf("read sock_diag reply: %w", err)
		}
		s, mine, err := c.parse(c.buf[:n])
		if mine {
			return s, err
		}
		// A reply to an earlier request that gave up waiting: skip it.
	}
}

// fillRequest writes a non-dump SOCK_DIAG_BY_FAMILY request into c.req.
// Without NLM_F_DUMP the kernel does an exact lookup (inet_diag_cmd_exact),
// which reads the addresses; a dump would walk the whole table.
func (c *diagConn) fillRequest(proto uint8, local, remote netip.AddrPort) {
	b := c.req[:]
	clear(b)
	ne := binary.NativeEndian
	ne.PutUint32(b[0:], requestLen)
	ne.PutUint16(b[4:], sockDiagByFamily)
	ne.PutUint16(b[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(b[8:], c.seq)
	r := b[nlmsgHdrLen:]
	r[0] = unix.AF_INET
	if local.Addr().Is6() {
		r[0] = unix.AF_INET6
	}
	r[1] = proto
	ne.PutUint32(r[4:], allStates)
	// TCP looks the connection up as (src, dst) = (local, remote). UDP's
	// dump_one passes (src, dst) to the receive lookup as the packet's
	// (source, destination), so the socket's own side goes in dst: "src and
	// dst are swapped for historical reasons" (net/ipv4/udp_diag.c).
	src, dst := local, remote
	if proto == unix.IPPROTO_UDP {
		src, dst = remote, local
	}
	putSockID(r[8:], src, dst)
	// idiag_if 0: no interface; cookie INET_DIAG_NOCOOKIE: any socket.
	ne.PutUint32(r[8+36:], 0)
	ne.PutUint32(r[8+40:], ^uint32(0))
	ne.PutUint32(r[8+44:], ^uint32(0))
}

// putSockID writes the ports and addresses of an inet_diag_sockid: ports in
// network order, then two 16-byte address fields (IPv4 in the first four).
func putSockID(b []byte, src, dst netip.AddrPort) {
	binary.BigEndian.PutUint16(b[0:], src.Port())
	binary.BigEndian.PutUint16(b[2:], dst.Port())
	putAddr(b[4:20], src.Addr())
	putAddr(b[20:36], dst.Addr())
}

func putAddr(b []byte, a netip.Addr) {
	if a.Is4() {
		a4 := a.As4()
		copy(b, a4[:])
		return
	}
	a16 := a.As16()
	copy(b, a16[:])
}

// parse reads the first message of one datagram from the kernel. mine is
// false for a message answering another request.
func (c *diagConn) parse(b []byte) (s diagSocket, mine bool, err error) {
	if len(b) < nlmsgHdrLen {
		return s, true, fmt.Errorf("sock_diag reply of %d bytes: %w", len(b), errShort)
	}
	ne := binary.NativeEndian
	mlen := int(ne.Uint32(b[0:]))
	typ := ne.Uint16(b[4:])
	if ne.Uint32(b[8:]) != c.seq {
		return s, false, nil
	}
	if mlen < nlmsgHdrLen || mlen > len(b) {
		return s, true, fmt.Errorf("sock_diag reply length %d of %d bytes: %w", mlen, len(b), errShort)
	}
	body := b[nlmsgHdrLen:mlen]
	switch typ {
	case unix.NLMSG_ERROR:
		if len(body) < nlmsgErrLen {
			return s, true, fmt.Errorf("sock_diag error reply: %w", errShort)
		}
		errno := unix.Errno(-int32(ne.Uint32(body)))
		if errno == unix.ENOENT {
			return s, true, errNoSocket
		}
		return s, true, fmt.Errorf("sock_diag lookup: %w", errno)
	case sockDiagByFamily:
	default:
		return s, true, fmt.Errorf("sock_diag reply of type %d", typ)
	}
	if len(body) < diagMsgLen {
		return s, true, fmt.Errorf("inet_diag_msg of %d bytes: %w", len(body), errShort)
	}
	fam := body[0]
	id := body[4:]
	src := sockAddr(fam, id[4:20], binary.BigEndian.Uint16(id[0:]))
	dst := sockAddr(fam, id[20:36], binary.BigEndian.Uint16(id[2:]))
	tail := body[4+sockIDLen:]
	return diagSocket{
		local:  src,
		remote: dst,
		uid:    ne.Uint32(tail[12:]),
		inode:  ne.Uint32(tail[16:]),
	}, true, nil
}

// sockAddr reads an address of family fam, unmapping the ::ffff:a.b.c.d
// form an IPv6 socket reports for its IPv4 traffic.
func sockAddr(fam uint8, b []byte, port uint16) netip.AddrPort {
	var a netip.Addr
	if fam == unix.AF_INET {
		a = netip.AddrFrom4([4]byte(b[:4]))
	} else {
		a = netip.AddrFrom16([16]byte(b[:16])).Unmap()
	}
	return netip.AddrPortFrom(a, port)
}
