package stack

import (
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// Echo requests in direct mode are sent on for real with unprivileged ICMP
// ("ping") sockets, so the client sees the true round-trip time and a dead
// host stays silent. Where the host forbids ping sockets
// (net.ipv4.ping_group_range), the forwarder turns itself off and gVisor
// answers every echo request itself.

const (
	pingIdle     = 30 * time.Second
	maxPingFlows = 1024
	icmpEchoLen  = 8 // type, code, checksum, identifier, sequence
)

type pingKey struct {
	client, dst netip.Addr
	id          uint16
}

// pingTable holds one ping socket per (client, destination, identifier).
type pingTable struct {
	st       *Stack
	disabled atomic.Bool

	mu     sync.Mutex
	flows  map[pingKey]*pingFlow
	closed bool
	wg     sync.WaitGroup
}

type pingFlow struct {
	t    *pingTable
	key  pingKey
	conn net.PacketConn
	last atomic.Int64
	log  *slog.Logger
}

func newPingTable(st *Stack) *pingTable {
	return &pingTable{st: st, flows: make(map[pingKey]*pingFlow)}
}

// parseEcho recognises an ICMP or ICMPv6 echo request in a whole IP packet
// and returns its addresses and ICMP message. Anything else, including
// fragments and IPv6 packets with extension headers, is left to gVisor.
func parseEcho(pkt []byte) (src, dst netip.Addr, msg []byte, ok bool) {
	switch header.IPVersion(pkt) {
	case header.IPv4Version:
		ip := header.IPv4(pkt)
		if !ip.IsValid(len(pkt)) || ip.Protocol() != uint8(header.ICMPv4ProtocolNumber) ||
			ip.More() || ip.FragmentOffset() != 0 {
			return
		}
		msg = ip.Payload()
		if len(msg) < icmpEchoLen || header.ICMPv4(msg).Type() != header.ICMPv4Echo || checksum.Checksum(msg, 0) != 0xffff {
			return
		}
		src, dst = netip.AddrFrom4(ip.SourceAddress().As4()), netip.AddrFrom4(ip.DestinationAddress().As4())
	case header.IPv6Version:
		ip := header.IPv6(pkt)
		if !ip.IsValid(len(pkt)) || ip.TransportProtocol() != header.ICMPv6ProtocolNumber {
			return
		}
		msg = ip.Payload()
		if len(msg) < icmpEchoLen || header.ICMPv6(msg).Type() != header.ICMPv6EchoRequest {
			return
		}
		src, dst = netip.AddrFrom16(ip.SourceAddress().As16()), netip.AddrFrom16(ip.DestinationAddress().As16())
		// ICMPv6Checksum skips the checksum field and returns what it
		// should hold.
		if header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: msg, Src: tcpipAddr(src), Dst: tcpipAddr(dst)}) != header.ICMPv6(msg).Checksum() {
			return
		}
	default:
		return
	}
	if !dst.IsGlobalUnicast() || dst.IsLinkLocalUnicast() {
		return // link-local and multicast are for the stack's own link
	}
	return src, dst, msg, true
}

// handle sends an echo request (already parsed) on; it reports whether it took
// the packet. It runs on the device reader and does not block.
func (t *pingTable) handle(src, dst netip.Addr, msg []byte) bool {
	if t.disabled.Load() {
		return false
	}
	key := pingKey{client: src, dst: dst, id: header.ICMPv4(msg).Ident()}
	f, err := t.lookup(key)
	if err != nil {
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EPROTONOSUPPORT) {
			if !t.disabled.Swap(true) {
				t.st.log.Info("ping sockets not allowed here (net.ipv4.ping_group_range): echo requests are answered by the stack", "err", err)
			}
			return false
		}
		t.st.log.Debug("ping socket", "err", err)
		return true
	}
	if f == nil {
		return true // shutting down
	}
	f.last.Store(time.Now().UnixNano())
	// The kernel sets the identifier (the socket's port) and the checksum.
	if _, err := f.conn.WriteTo(msg, &net.UDPAddr{IP: dst.AsSlice()}); err != nil {
		f.log.Debug("ping send failed", "err", err)
	}
	return true
}

func (t *pingTable) lookup(key pingKey) (*pingFlow, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, nil
	}
	if f, ok := t.flows[key]; ok {
		return f, nil
	}
	if len(t.flows) >= maxPingFlows {
		return nil, errors.New("too many ping flows")
	}
	network := "udp4"
	if key.dst.Is6() {
		network = "udp6"
	}
	conn, err := listenPing(network, t.st.cfg.PingControl)
	if err != nil {
		return nil, err
	}
	f := &pingFlow{t: t, key: key, conn: conn,
		log: t.st.log.With("flow", t.st.flowSeq.Add(1), "proto", "icmp", "src", key.client, "dst", key.dst)}
	f.last.Store(time.Now().UnixNano())
	t.flows[key] = f
	t.wg.Go(f.receive)
	return f, nil
}

// listenPing opens an unprivileged ICMP ("ping") socket bound to the
// unspecified address, as golang.org/x/net/icmp's ListenPacket does for
// "udp4" and "udp6", but hands it to control (if not nil) before binding, as
// net.ListenConfig would. The conn is the *net.UDPConn the standard library makes of a
// datagram socket: ReadFrom reports the peer as an *net.UDPAddr.
func listenPing(network string, control func(network, address string, c syscall.RawConn) error) (net.PacketConn, error) {
	family, proto := syscall.AF_INET, syscall.IPPROTO_ICMP
	sa := syscall.Sockaddr(&syscall.SockaddrInet4{})
	if network == "udp6" {
		family, proto = syscall.AF_INET6, syscall.IPPROTO_ICMPV6
		sa = &syscall.SockaddrInet6{}
	}
	fd, err := syscall.Socket(family, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC|syscall.SOCK_NONBLOCK, proto)
	if err != nil {
		return nil, os.NewSyscallError("socket", err)
	}
	f := os.NewFile(uintptr(fd), "ping")
	defer f.Close() // FilePacketConn holds a duplicate
	if control != nil {
		rc, err := f.SyscallConn()
		if err != nil {
			return nil, err
		}
		if err := control(network, "", rc); err != nil {
			return nil, err
		}
	}
	if err := syscall.Bind(fd, sa); err != nil {
		return nil, os.NewSyscallError("bind", err)
	}
	return net.FilePacketConn(f)
}

func (t *pingTable) close() {
	t.mu.Lock()
	t.closed = true
	for _, f := range t.flows {
		_ = f.conn.SetReadDeadline(time.Unix(1, 0))
	}
	t.mu.Unlock()
	t.wg.Wait()
}

// receive carries echo replies back to the client until the flow idles out.
func (f *pingFlow) receive() {
	defer func() {
		f.t.mu.Lock()
		delete(f.t.flows, f.key)
		f.t.mu.Unlock()
		f.conn.Close()
	}()
	buf := make([]byte, udpHeadroom+maxPacket)
	for {
		_ = f.conn.SetReadDeadline(time.Unix(0, f.last.Load()).Add(pingIdle))
		if f.t.st.ctx.Err() != nil {
			return
		}
		n, from, err := f.conn.ReadFrom(buf[udpHeadroom:])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && f.t.st.ctx.Err() == nil &&
				time.Since(time.Unix(0, f.last.Load())) < pingIdle {
				continue
			}
			return
		}
		ua, ok := from.(*net.UDPAddr)
		if !ok || n < icmpEchoLen {
			continue
		}
		if a, _ := netip.AddrFromSlice(ua.IP); a.Unmap() != f.key.dst {
			continue
		}
		f.reply(buf, n)
	}
}

// reply turns the echo reply at buf[udpHeadroom:][:n] into a packet from the
// destination to the client, with the client's own identifier restored.
func (f *pingFlow) reply(buf []byte, n int) {
	msg := buf[udpHeadroom : udpHeadroom+n]
	hl := ipHeaderLen(f.key.client)
	if hl+n > int(f.t.st.link.mtu) {
		return
	}
	pkt := buf[udpHeadroom-hl : udpHeadroom+n]
	if f.key.client.Is4() {
		ic := header.ICMPv4(msg)
		if ic.Type() != header.ICMPv4EchoReply {
			return
		}
		ic.SetIdent(f.key.id)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(msg, 0))
		putIPHeader(pkt, f.key.dst, f.key.client, header.ICMPv4ProtocolNumber, n)
	} else {
		ic := header.ICMPv6(msg)
		if ic.Type() != header.ICMPv6EchoReply {
			return
		}
		ic.SetIdent(f.key.id)
		ic.SetChecksum(0)
		ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: ic, Src: tcpipAddr(f.key.dst), Dst: tcpipAddr(f.key.client),
		}))
		putIPHeader(pkt, f.key.dst, f.key.client, header.ICMPv6ProtocolNumber, n)
	}
	f.t.st.link.writeRaw(pkt)
}

// answerEcho replies to an echo request itself, from the address the client
// pinged: through a proxy, or where ping sockets are not allowed. gVisor
// would answer only for addresses it owns (it skips the temporary addresses
// of promiscuous mode), so the stack does it for every destination.
func (st *Stack) answerEcho(src, dst netip.Addr, msg []byte) bool {
	n := len(msg)
	hl := ipHeaderLen(src)
	if hl+n > int(st.link.mtu) {
		return false
	}
	bp := udpBufs.Get().(*[]byte)
	defer udpBufs.Put(bp)
	out := (*bp)[:hl+n]
	reply := out[hl:]
	copy(reply, msg)
	if src.Is4() {
		ic := header.ICMPv4(reply)
		ic.SetType(header.ICMPv4EchoReply)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(reply, 0))
		putIPHeader(out, dst, src, header.ICMPv4ProtocolNumber, n)
	} else {
		ic := header.ICMPv6(reply)
		ic.SetType(header.ICMPv6EchoReply)
		ic.SetChecksum(0)
		ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: tcpipAddr(dst), Dst: tcpipAddr(src)}))
		putIPHeader(out, dst, src, header.ICMPv6ProtocolNumber, n)
	}
	st.link.writeRaw(out)
	return true
}
