package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"github.com/netstackd/netstackd/proxy/socks5"
)

// ErrAssociationEnded means the SOCKS5 server closed the control connection
// of a UDP association, which ends the association (RFC 1928 §7).
var ErrAssociationEnded = errors.New("socks5 server ended the UDP association")

// maxDatagram is the largest UDP payload: what one read can return.
const maxDatagram = 65535

var datagramBufs = sync.Pool{New: func() any { b := make([]byte, maxDatagram); return &b }}

// ListenPacket opens a UDP association through the server with UDP
// ASSOCIATE (RFC 1928 §§4, 7) and returns it as a *SOCKS5Association.
// network is "udp", "udp4" or "udp6" and address must be "": the relay, not
// the client, picks the address datagrams leave from.
//
// The control connection is dialed through Forward and authenticated as
// CONNECT's is, under the same deadlines. The UDP socket that talks to the
// relay comes from Forward's own ListenPacket when it has one (Direct does,
// so its Control applies), else from Direct{}. The request carries the
// all-zero address, as RFC 1928 §4 has a client do when it does not know
// the address the server will see its datagrams come from (behind NAT it
// cannot); dante then takes the source of the first datagram as the
// client's. A server that answers "command not supported" (microsocks does)
// gets an error that says it does not carry UDP. ctx bounds the opening
// only; the association lasts until Close or the server ends it.
func (s SOCKS5) ListenPacket(ctx context.Context, network, address string) (net.PacketConn, error) {
	a, err := s.associate(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("udp associate via socks5 %s: %w", s.Server, err)
	}
	return a, nil
}

func (s SOCKS5) associate(ctx context.Context, network, address string) (*SOCKS5Association, error) {
	if err := checkPacketNetwork(network); err != nil {
		return nil, err
	}
	if address != "" {
		return nil, fmt.Errorf("local address %q: the relay picks the address, want \"\"", address)
	}
	if s.Username == "" && s.Password != "" {
		return nil, errors.New("password set without a username")
	}
	var listener PacketListener = Direct{}
	if pl, ok := s.Forward.(PacketListener); ok {
		listener = pl
	}
	pc, err := listener.ListenPacket(ctx, network, "")
	if err != nil {
		return nil, err
	}
	var reply socks5.Reply
	unknown := socks5.AddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), 0))
	c, err := dialHandshake(ctx, s.Forward, s.Server, s.HandshakeTimeout, func(c net.Conn) error {
		var err error
		reply, err = s.handshake(c, socks5.CommandUDPAssociate, unknown)
		return err
	})
	if err != nil {
		pc.Close()
		if re, ok := errors.AsType[*socks5.ReplyError](err); ok && re.Code == socks5.ReplyCommandNotSupported {
			return nil, fmt.Errorf("the proxy does not support UDP ASSOCIATE: %w", err)
		}
		return nil, err
	}
	relay, err := relayAddr(ctx, reply.Addr, c)
	if err != nil {
		pc.Close()
		c.Close()
		return nil, err
	}
	a := &SOCKS5Association{
		server:    s.Server,
		ctrl:      c,
		pc:        pc,
		relay:     relay,
		relayAddr: net.UDPAddrFromAddrPort(relay),
	}
	a.wg.Go(a.watchControl)
	return a, nil
}

// relayAddr returns where to send datagrams: BND.ADDR, BND.PORT of the
// reply. An unspecified BND.ADDR (a server bound to the wildcard says
// 0.0.0.0) means the address the control connection reached.
func relayAddr(ctx context.Context, bnd socks5.Addr, ctrl net.Conn) (netip.AddrPort, error) {
	if bnd.Port == 0 {
		return netip.AddrPort{}, fmt.Errorf("server gave relay address %v, with no port", bnd)
	}
	ip := bnd.IP.Unmap()
	switch {
	case bnd.IsName():
		ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", bnd.Name)
		if err == nil && len(ips) == 0 {
			err = &net.DNSError{Err: "no suitable address", Name: bnd.Name, IsNotFound: true}
		}
		if err != nil {
			return netip.AddrPort{}, fmt.Errorf("resolve relay address: %w", err)
		}
		ip = ips[0].Unmap()
	case ip.IsUnspecified():
		ta, ok := ctrl.RemoteAddr().(*net.TCPAddr)
		if !ok {
			return netip.AddrPort{}, fmt.Errorf("server gave relay address %v and its own address is unknown", bnd)
		}
		ip = ta.AddrPort().Addr().Unmap()
	}
	return netip.AddrPortFrom(ip, bnd.Port), nil
}

// SOCKS5Association is one UDP association: a net.PacketConn whose WriteTo
// sends each datagram to the relay behind a SOCKS5 UDP header and whose
// ReadFrom takes the header off what the relay sends back. It is safe for
// concurrent use.
//
// It ends when the server closes the control connection (then ReadFrom and
// WriteTo fail with ErrAssociationEnded) or when Close is called. Deadlines
// apply to the UDP socket.
type SOCKS5Association struct {
	server    string
	ctrl      net.Conn
	pc        net.PacketConn
	relay     netip.AddrPort
	relayAddr *net.UDPAddr

	fragments atomic.Uint64
	// ended holds why the control connection closed, once it has and
	// unless Close closed it.
	ended     atomic.Pointer[error]
	closing   atomic.Bool
	closeOnce sync.Once
	closePC   sync.Once
	wg        sync.WaitGroup // watchControl
}

// watchControl reads the control connection until it closes, discarding
// anything the server sends, then closes the UDP socket so that a blocked
// ReadFrom returns.
func (a *SOCKS5Association) watchControl() {
	_, err := io.Copy(io.Discard, a.ctrl)
	if err == nil {
		err = io.EOF
	}
	if !a.closing.Load() {
		a.ended.Store(&err)
	}
	a.closeUDP()
}

func (a *SOCKS5Association) closeUDP() {
	a.closePC.Do(func() { a.pc.Close() })
}

// Close ends the association: it closes the control connection and the UDP
// socket and waits for the goroutine that watched the control connection.
// Calls after the first do nothing.
func (a *SOCKS5Association) Close() error {
	a.closeOnce.Do(func() {
		a.closing.Store(true)
		a.ctrl.Close()
		a.closeUDP()
		a.wg.Wait()
	})
	return nil
}

// FragmentsDropped counts the datagrams dropped for a non-zero FRAG: this
// client does not reassemble (RFC 1928 §7 lets it drop them).
func (a *SOCKS5Association) FragmentsDropped() uint64 { return a.fragments.Load() }

// ReadFrom reads the next datagram from the relay into b and returns the
// far end it came from: an *net.UDPAddr, or for a relay that names the
// source a net.Addr whose String is "name:port". It skips datagrams that
// do not come from the relay, that have no valid header or that are
// fragments. As with a UDP socket, data beyond len(b) is lost.
func (a *SOCKS5Association) ReadFrom(b []byte) (int, net.Addr, error) {
	bp := datagramBufs.Get().(*[]byte)
	defer datagramBufs.Put(bp)
	buf := *bp
	for {
		n, from, err := a.pc.ReadFrom(buf)
		if err != nil {
			return 0, nil, a.opError("read", nil, err)
		}
		if !a.fromRelay(from) {
			continue
		}
		h, hlen, err := socks5.ParseUDPHeader(buf[:n])
		if err != nil {
			continue
		}
		if h.Frag != 0 {
			a.fragments.Add(1)
			continue
		}
		if ap, ok := h.Addr.AddrPort(); ok {
			return copy(b, buf[hlen:n]), net.UDPAddrFromAddrPort(ap), nil
		}
		return copy(b, buf[hlen:n]), hostPortAddr(h.Addr.String()), nil
	}
}

func (a *SOCKS5Association) fromRelay(from net.Addr) bool {
	if ua, ok := from.(*net.UDPAddr); ok {
		ap := ua.AddrPort()
		return ap.Addr().Unmap() == a.relay.Addr() && ap.Port() == a.relay.Port()
	}
	return from != nil && from.String() == a.relay.String()
}

// WriteTo sends b to addr through the relay: an *net.UDPAddr, or any
// net.Addr whose String is "host:port", a domain name sent unresolved.
func (a *SOCKS5Association) WriteTo(b []byte, addr net.Addr) (int, error) {
	dst, err := udpDestination(addr)
	if err != nil {
		return 0, a.opError("write", addr, err)
	}
	bp := datagramBufs.Get().(*[]byte)
	defer datagramBufs.Put(bp)
	buf, err := socks5.AppendUDPHeader((*bp)[:0], socks5.UDPHeader{Addr: dst})
	if err != nil {
		return 0, a.opError("write", addr, err)
	}
	if len(buf)+len(b) > cap(buf) {
		return 0, a.opError("write", addr, fmt.Errorf("datagram of %d bytes and a %d-byte header exceeds %d", len(b), len(buf), maxDatagram))
	}
	if _, err := a.pc.WriteTo(append(buf, b...), a.relayAddr); err != nil {
		return 0, a.opError("write", addr, err)
	}
	return len(b), nil
}

// udpDestination turns a WriteTo address into a SOCKS address.
func udpDestination(addr net.Addr) (socks5.Addr, error) {
	switch addr := addr.(type) {
	case nil:
		return socks5.Addr{}, errors.New("missing address")
	case *net.UDPAddr:
		ap := addr.AddrPort()
		if !ap.Addr().IsValid() {
			return socks5.Addr{}, fmt.Errorf("invalid address %v", addr)
		}
		return socks5.AddrFromAddrPort(netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())), nil
	}
	return socks5.ParseAddr(addr.String())
}

// opError describes a failed read or write: with ErrAssociationEnded when
// the server closed the control connection, else as the socket did.
func (a *SOCKS5Association) opError(op string, addr net.Addr, err error) error {
	if cause := a.ended.Load(); cause != nil && !a.closing.Load() {
		err = fmt.Errorf("%w (control connection to %s: %w)", ErrAssociationEnded, a.server, *cause)
	} else if _, ok := errors.AsType[*net.OpError](err); ok {
		return err
	}
	return &net.OpError{Op: op, Net: "udp", Source: a.pc.LocalAddr(), Addr: addr, Err: err}
}

// LocalAddr returns the local address of the UDP socket.
func (a *SOCKS5Association) LocalAddr() net.Addr { return a.pc.LocalAddr() }

// SetDeadline sets the read and write deadlines of the UDP socket.
func (a *SOCKS5Association) SetDeadline(t time.Time) error { return a.pc.SetDeadline(t) }

// SetReadDeadline sets the read deadline of the UDP socket.
func (a *SOCKS5Association) SetReadDeadline(t time.Time) error { return a.pc.SetReadDeadline(t) }

// SetWriteDeadline sets the write deadline of the UDP socket.
func (a *SOCKS5Association) SetWriteDeadline(t time.Time) error { return a.pc.SetWriteDeadline(t) }

// hostPortAddr is a UDP address given as "name:port".
type hostPortAddr string

func (h hostPortAddr) Network() string { return "udp" }
func (h hostPortAddr) String() string  { return string(h) }
