package udpnat

import (
	"errors"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/header"

	"github.com/netstackd/netstackd/stack/internal/packet"
)

// A direct UDP association learns of ICMP errors (port unreachable, say)
// for its datagrams through the socket's error queue (IP_RECVERR, set in
// openKernelSocket), and passes them on to the client as the same ICMP error
// from the destination, so a client's connected socket fails at once as it
// would on a kernel path.

func isICMPError(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH)
}

// relayICMPErrors drains the socket's error queue and sends the client a
// port-unreachable for each port-unreachable the upstream socket received.
func (a *udpAssoc) relayICMPErrors() {
	_ = a.rc.Control(func(fd uintptr) { a.relayICMPErrorsFD(fd) })
}

// relayICMPErrorsFD is relayICMPErrors on the socket's descriptor, for a
// caller already in RawConn.Control or Read. It returns how many errors it
// took from the queue.
func (a *udpAssoc) relayICMPErrorsFD(fd uintptr) int {
	var buf [64]byte
	var oob [512]byte
	n := 0
	for range 16 {
		_, oobn, _, sa, err := unix.Recvmsg(int(fd), buf[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
		if err != nil {
			break
		}
		n++
		if portUnreachable(oob[:oobn]) {
			a.sendPortUnreachable(sockaddrToAddrPort(sa))
		}
	}
	return n
}

// portUnreachable reports whether the control messages carry an extended
// error for an ICMP or ICMPv6 port unreachable.
func portUnreachable(oob []byte) bool {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return false
	}
	for _, m := range msgs {
		if len(m.Data) < int(unsafe.Sizeof(unix.SockExtendedErr{})) {
			continue
		}
		ee := (*unix.SockExtendedErr)(unsafe.Pointer(&m.Data[0]))
		isRecvErr := m.Header.Level == unix.SOL_IP && m.Header.Type == unix.IP_RECVERR ||
			m.Header.Level == unix.SOL_IPV6 && m.Header.Type == unix.IPV6_RECVERR
		// A dual-stack socket reports an ICMPv4 error for an IPv4 datagram
		// at the IPv6 level, with the ICMPv4 origin: the origin decides.
		switch {
		case isRecvErr && ee.Origin == unix.SO_EE_ORIGIN_ICMP && ee.Type == 3 && ee.Code == 3:
			return true
		case isRecvErr && ee.Origin == unix.SO_EE_ORIGIN_ICMP6 && ee.Type == 1 && ee.Code == 4:
			return true
		}
	}
	return false
}

// sendPortUnreachable tells the client that dst (as the upstream socket saw
// it) has no listener, quoting the headers of a datagram it sent there.
func (a *udpAssoc) sendPortUnreachable(dst netip.AddrPort) {
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if !a.fakes.empty() {
		if fake, ok := a.fakes.replySource(nil, dst.Port()); ok {
			dst = fake
		}
	}
	if !dst.IsValid() || dst.Addr().Is4() != a.client.Addr().Is4() {
		return
	}
	var quote [packet.IPv6HeaderLen + packet.UDPHeaderLen]byte
	hl := packet.PutIPHeader(quote[:], a.client.Addr(), dst.Addr(), header.UDPProtocolNumber, packet.UDPHeaderLen)
	header.UDP(quote[hl:]).Encode(&header.UDPFields{SrcPort: a.client.Port(), DstPort: dst.Port(), Length: packet.UDPHeaderLen})
	bp := udpBufs.Get().(*[]byte)
	defer udpBufs.Put(bp)
	a.t.cfg.Writer.WriteRaw(packet.BuildPortUnreachable(*bp, dst.Addr(), a.client.Addr(), quote[:hl+packet.UDPHeaderLen]))
}
