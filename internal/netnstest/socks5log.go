package netnstest

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// SOCKS5 address types (RFC 1928 §5).
const (
	ATYPIPv4   = 1
	ATYPDomain = 3
	ATYPIPv6   = 4
)

// SOCKS5Request is one CONNECT request a LoggingSOCKS5 server received.
type SOCKS5Request struct {
	ATYP byte   // ATYPIPv4, ATYPDomain or ATYPIPv6
	Host string // the name, or the address in text form
	Port uint16
}

func (r SOCKS5Request) String() string {
	return fmt.Sprintf("atyp %d %s", r.ATYP, net.JoinHostPort(r.Host, strconv.Itoa(int(r.Port))))
}

// LoggingSOCKS5 is a minimal no-auth SOCKS5 server (CONNECT only) in the
// server namespace that records every request as the client sent it. It
// resolves names only from the table it was given, never through a
// resolver, so a name it does not know is answered "host unreachable"; it
// dials from the server namespace.
type LoggingSOCKS5 struct {
	ns    Netns
	hosts map[string]netip.Addr
	ln    net.Listener
	wg    sync.WaitGroup

	mu     sync.Mutex
	closed bool
	reqs   []SOCKS5Request
	conns  map[net.Conn]struct{}
}

// StartLoggingSOCKS5 listens at at in the server namespace and serves until
// t's cleanup, which closes the listener and every connection and waits for
// the server goroutines. hosts maps the names the server may resolve.
func (tp *Topology) StartLoggingSOCKS5(t testing.TB, at netip.AddrPort, hosts map[string]netip.Addr) *LoggingSOCKS5 {
	t.Helper()
	ln, err := tp.Server.Listen("tcp", at.String())
	if err != nil {
		t.Fatal(err)
	}
	s := &LoggingSOCKS5{ns: tp.Server, hosts: hosts, ln: ln, conns: make(map[net.Conn]struct{})}
	t.Cleanup(s.close)
	s.wg.Go(s.acceptLoop)
	return s
}

// Requests returns the requests received so far, in order.
func (s *LoggingSOCKS5) Requests() []SOCKS5Request {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]SOCKS5Request(nil), s.reqs...)
}

func (s *LoggingSOCKS5) acceptLoop() {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		if !s.track(c) {
			c.Close()
			return
		}
		s.wg.Add(1) // tracked, so before close's Wait
		go func() {
			defer s.wg.Done()
			defer s.untrack(c)
			c.SetDeadline(time.Now().Add(serverConnTimeout))
			s.serve(c)
		}()
	}
}

func (s *LoggingSOCKS5) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *LoggingSOCKS5) untrack(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// Reply codes (RFC 1928 §6).
const (
	repSucceeded       = 0
	repFailure         = 1
	repHostUnreachable = 4
	repRefused         = 5
	repCmdNotSupported = 7
	repATYPUnsupported = 8
)

// serve handles one client: greeting, request, then the relay.
func (s *LoggingSOCKS5) serve(c net.Conn) {
	hdr := make([]byte, 2)
	if _, err := io.ReadFull(c, hdr); err != nil || hdr[0] != 5 {
		return
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil {
		return
	}
	if !slices.Contains(methods, 0) {
		c.Write([]byte{5, 0xff})
		return
	}
	if _, err := c.Write([]byte{5, 0}); err != nil {
		return
	}
	req := make([]byte, 4)
	if _, err := io.ReadFull(c, req); err != nil || req[0] != 5 {
		return
	}
	r := SOCKS5Request{ATYP: req[3]}
	switch r.ATYP {
	case ATYPIPv4, ATYPIPv6:
		b := make([]byte, map[byte]int{ATYPIPv4: 4, ATYPIPv6: 16}[r.ATYP])
		if _, err := io.ReadFull(c, b); err != nil {
			return
		}
		ip, _ := netip.AddrFromSlice(b)
		r.Host = ip.String()
	case ATYPDomain:
		var n [1]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return
		}
		b := make([]byte, n[0])
		if _, err := io.ReadFull(c, b); err != nil {
			return
		}
		r.Host = string(b)
	default:
		socks5Reply(c, repATYPUnsupported)
		return
	}
	var port [2]byte
	if _, err := io.ReadFull(c, port[:]); err != nil {
		return
	}
	r.Port = binary.BigEndian.Uint16(port[:])
	s.mu.Lock()
	s.reqs = append(s.reqs, r)
	s.mu.Unlock()
	if req[1] != 1 { // CONNECT
		socks5Reply(c, repCmdNotSupported)
		return
	}

	ip, err := netip.ParseAddr(r.Host)
	if r.ATYP == ATYPDomain {
		var ok bool
		ip, ok = s.hosts[r.Host]
		if !ok {
			socks5Reply(c, repHostUnreachable)
			return
		}
	} else if err != nil {
		socks5Reply(c, repFailure)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	up, err := s.ns.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, r.Port).String())
	cancel()
	if err != nil {
		code := byte(repFailure)
		switch {
		case errors.Is(err, syscall.ECONNREFUSED):
			code = repRefused
		case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.ENETUNREACH):
			code = repHostUnreachable
		}
		socks5Reply(c, code)
		return
	}
	if !s.track(up) {
		up.Close()
		return
	}
	defer s.untrack(up)
	up.SetDeadline(time.Now().Add(serverConnTimeout))
	if err := socks5Reply(c, repSucceeded); err != nil {
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { socksCopier(up, c) })
	socksCopier(c, up)
	wg.Wait()
}

// socksCopier copies src to dst and passes the EOF on as a half-close.
func socksCopier(dst, src net.Conn) {
	io.Copy(dst, src)
	if cw, ok := dst.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
}

// socks5Reply sends a reply with BND 0.0.0.0:0.
func socks5Reply(c net.Conn, code byte) error {
	_, err := c.Write([]byte{5, code, 0, ATYPIPv4, 0, 0, 0, 0, 0, 0})
	return err
}

func (s *LoggingSOCKS5) close() {
	s.mu.Lock()
	s.closed = true
	s.ln.Close()
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.wg.Wait()
}
