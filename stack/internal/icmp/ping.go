// Package icmp answers the echo requests (ping) that enter the TUN: sent on
// for real with the host's unprivileged ping sockets where they are
// allowed and wanted, answered by the stack itself otherwise.
package icmp

import (
	"context"
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

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// Echo requests in direct mode are sent on for real with unprivileged ICMP
// ("ping") sockets, so the client sees the true round-trip time and a dead
// host stays silent. Where the host forbids ping sockets
// (net.ipv4.ping_group_range), echo requests get no reply at all, with one
// warning that says how to allow them: a reply made up here would tell the
// client that a dead host is up, 0.25 ms away.

const (
	pingIdle     = 30 * time.Second
	maxPingFlows = 1024 // the default of Config.Max
	icmpEchoLen  = 8    // type, code, checksum, identifier, sequence
	headroom     = packet.Headroom
	maxPacket    = 1 << 16
)

// Writer carries packets built outside gVisor to the client: the stack's
// link endpoint.
type Writer interface {
	WriteRaw(pkt []byte)
	MTU() uint32
}

// Config configures a Pinger.
type Config struct {
	Writer Writer
	// Forward sends echo requests on with ping sockets, and drops them
	// where the host does not allow ping sockets; false answers every one
	// at once (through a proxy, which carries no ICMP).
	Forward bool
	// Control, if not nil, is called with each ping socket before it is
	// bound, as net.Dialer.Control is.
	Control func(network, address string, c syscall.RawConn) error
	// Refuse, if not nil, names destinations no ping socket may send to
	// (netstackd's own addresses): their echo requests are answered here.
	Refuse func(netip.Addr) bool
	// Max caps the ping sockets open at once; 0 means 1024.
	Max        int
	Log        *slog.Logger
	NextFlowID func() uint64
}

var bufs = sync.Pool{New: func() any { b := make([]byte, headroom+maxPacket); return &b }}

type pingKey struct {
	client, dst netip.Addr
	id          uint16
}

// Pinger answers echo requests. With Config.Forward it holds one ping
// socket per (client, destination, identifier).
type Pinger struct {
	cfg        Config
	ctx        context.Context // ends the flows' goroutines
	cancel     context.CancelFunc
	disabled   atomic.Bool // forwarding is off
	notAllowed atomic.Bool // the host refuses ping sockets: drop echo requests

	mu     sync.Mutex
	flows  map[pingKey]*pingFlow
	closed bool
	wg     sync.WaitGroup

	warnFDs ratelog.Limiter
}

type pingFlow struct {
	t    *Pinger
	key  pingKey
	conn net.PacketConn
	last atomic.Int64
	log  *slog.Logger
}

// New makes a Pinger.
func New(cfg Config) *Pinger {
	if cfg.Max <= 0 {
		cfg.Max = maxPingFlows
	}
	t := &Pinger{cfg: cfg, flows: make(map[pingKey]*pingFlow)}
	t.ctx, t.cancel = context.WithCancel(context.Background())
	t.disabled.Store(!cfg.Forward)
	return t
}

// Echo takes an echo request from src to dst (msg is its ICMP message,
// checked by packet.ParseEcho) and reports whether it took it: forwarded,
// or answered. It runs on a device dispatcher and does not block.
func (t *Pinger) Echo(src, dst netip.Addr, msg []byte) bool {
	if t.forward(src, dst, msg) {
		return true
	}
	return t.answer(src, dst, msg)
}

// forward sends an echo request on; it reports whether it took the packet.
func (t *Pinger) forward(src, dst netip.Addr, msg []byte) bool {
	if t.disabled.Load() || t.cfg.Refuse != nil && t.cfg.Refuse(dst) {
		return false
	}
	if t.notAllowed.Load() {
		return true // dropped: see the warning below
	}
	key := pingKey{client: src, dst: dst, id: header.ICMPv4(msg).Ident()}
	f, err := t.lookup(key)
	if err != nil {
		if errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EPROTONOSUPPORT) {
			if !t.notAllowed.Swap(true) {
				t.cfg.Log.Warn("ping sockets are not allowed for netstackd's group: echo requests get no reply; to forward them, include the group in net.ipv4.ping_group_range (sysctl -w net.ipv4.ping_group_range=\"0 2147483647\")", "gid", os.Getegid(), "err", err)
			}
			return true
		}
		if ratelog.IsFDExhaustion(err) {
			t.warnFDs.Warn(t.cfg.Log, "out of file descriptors: echo request dropped", "src", src, "dst", dst, "err", err)
		} else {
			t.cfg.Log.Debug("ping socket", "err", err)
		}
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

func (t *Pinger) lookup(key pingKey) (*pingFlow, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		return nil, nil
	}
	if f, ok := t.flows[key]; ok {
		return f, nil
	}
	if len(t.flows) >= t.cfg.Max {
		return nil, errors.New("too many ping flows")
	}
	network := "udp4"
	if key.dst.Is6() {
		network = "udp6"
	}
	conn, err := listenPing(network, t.cfg.Control)
	if err != nil {
		return nil, err
	}
	f := &pingFlow{t: t, key: key, conn: conn,
		log: t.cfg.Log.With("flow", t.cfg.NextFlowID(), "proto", "icmp", "src", key.client, "dst", key.dst)}
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

// Close ends every forwarded flow and waits for their goroutines.
func (t *Pinger) Close() {
	t.mu.Lock()
	t.closed = true
	t.cancel()
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
	buf := make([]byte, headroom+maxPacket)
	for {
		_ = f.conn.SetReadDeadline(time.Unix(0, f.last.Load()).Add(pingIdle))
		if f.t.ctx.Err() != nil {
			return
		}
		n, from, err := f.conn.ReadFrom(buf[headroom:])
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) && f.t.ctx.Err() == nil &&
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

// reply turns the echo reply at buf[headroom:][:n] into a packet from the
// destination to the client, with the client's own identifier restored.
func (f *pingFlow) reply(buf []byte, n int) {
	msg := buf[headroom : headroom+n]
	hl := packet.IPHeaderLen(f.key.client)
	if f.key.client.Is4() && hl+n > 0xffff {
		return // more than IPv4 carries; longer than the MTU leaves as fragments (WriteRaw)
	}
	pkt := buf[headroom-hl : headroom+n]
	if f.key.client.Is4() {
		ic := header.ICMPv4(msg)
		if ic.Type() != header.ICMPv4EchoReply {
			return
		}
		ic.SetIdent(f.key.id)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(msg, 0))
		packet.PutIPHeader(pkt, f.key.dst, f.key.client, header.ICMPv4ProtocolNumber, n)
	} else {
		ic := header.ICMPv6(msg)
		if ic.Type() != header.ICMPv6EchoReply {
			return
		}
		ic.SetIdent(f.key.id)
		ic.SetChecksum(0)
		ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{
			Header: ic, Src: packet.TCPIPAddr(f.key.dst), Dst: packet.TCPIPAddr(f.key.client),
		}))
		packet.PutIPHeader(pkt, f.key.dst, f.key.client, header.ICMPv6ProtocolNumber, n)
	}
	f.t.cfg.Writer.WriteRaw(pkt)
}

// answer replies to an echo request itself, from the address the client
// pinged: through a proxy, or where ping sockets are not allowed. gVisor
// would answer only for addresses it owns (it skips the temporary addresses
// of promiscuous mode), so the stack does it for every destination.
func (t *Pinger) answer(src, dst netip.Addr, msg []byte) bool {
	n := len(msg)
	hl := packet.IPHeaderLen(src)
	if hl+n > int(t.cfg.Writer.MTU()) {
		return false
	}
	bp := bufs.Get().(*[]byte)
	defer bufs.Put(bp)
	out := (*bp)[:hl+n]
	reply := out[hl:]
	copy(reply, msg)
	if src.Is4() {
		ic := header.ICMPv4(reply)
		ic.SetType(header.ICMPv4EchoReply)
		ic.SetChecksum(0)
		ic.SetChecksum(^checksum.Checksum(reply, 0))
		packet.PutIPHeader(out, dst, src, header.ICMPv4ProtocolNumber, n)
	} else {
		ic := header.ICMPv6(reply)
		ic.SetType(header.ICMPv6EchoReply)
		ic.SetChecksum(0)
		ic.SetChecksum(header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: ic, Src: packet.TCPIPAddr(dst), Dst: packet.TCPIPAddr(src)}))
		packet.PutIPHeader(out, dst, src, header.ICMPv6ProtocolNumber, n)
	}
	t.cfg.Writer.WriteRaw(out)
	return true
}
