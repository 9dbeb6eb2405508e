package stack

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (*net.TCPConn, *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	a, err := net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b, err := ln.AcceptTCP()
	if err != nil {
		t.Fatal(err)
	}
	return a, b
}

func TestServeInbound(t *testing.T) {
	gw := netip.MustParseAddr("198.18.0.2")
	p := newPeer(t, Config{Gateway4: gw})
	// A server behind the TUN: on the client stack.
	ln, err := gonet.ListenTCP(p.client, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1}), Port: 8000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peerSeen := make(chan net.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		peerSeen <- c.RemoteAddr()
		io.Copy(c, c)
		c.(*gonet.TCPConn).CloseWrite()
	}()

	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8000"))

	msg := bytes.Repeat([]byte("published "), 5000)
	go func() {
		outside.Write(msg)
		outside.CloseWrite()
	}()
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(outside)
	if err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if !bytes.Equal(got, msg) {
		t.Fatalf("echo of %d bytes came back as %d", len(msg), len(got))
	}
	if a := (<-peerSeen).(*net.TCPAddr).AddrPort().Addr(); a != gw {
		t.Errorf("server saw the connection from %v, want the gateway %v", a, gw)
	}
}

func TestServeInboundRefused(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2")})
	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8001")) // nothing listens
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.ReadAll(outside)
	if err == nil {
		t.Fatal("got EOF, want a reset for a port nobody listens on")
	}
}
