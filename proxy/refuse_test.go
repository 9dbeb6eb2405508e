package proxy

import (
	"errors"
	"net"
	"net/netip"
	"strconv"
	"testing"
	"time"
)

func TestRefusePrefixes(t *testing.T) {
	own := []netip.Prefix{
		netip.MustParsePrefix("198.18.0.1/15"), // host bits set, as --addr gives it
		netip.MustParsePrefix("fd00:1898::1/64"),
		netip.MustParsePrefix("198.18.0.2/32"),
	}
	refuse := RefusePrefixes(append(own, LoopbackPrefixes()...)...)
	tests := []struct {
		addr string
		want bool
	}{
		{"127.0.0.1", true},
		{"127.255.255.254", true},
		{"::1", true},
		{"0.0.0.0", true},
		{"::", true},
		// Issue 19: v4-mapped forms reach the IPv4 address they carry.
		{"::ffff:127.0.0.1", true},
		{"::ffff:7f00:2", true},
		{"::ffff:198.19.0.7", true},
		{"::ffff:0.0.0.0", true},
		{"198.18.0.0", true},
		{"198.19.255.255", true},
		{"fd00:1898::5", true},
		{"fe80::1%eth0", false},
		{"fd00:1898::5%tun0", true},
		{"198.20.0.1", false},
		{"198.17.255.255", false},
		{"128.0.0.1", false},
		{"10.0.0.1", false},
		{"::2", false},
		{"::ffff:10.0.0.1", false},
		{"fd00:1899::1", false},
		// ::127.0.0.1 (IPv4-compatible, deprecated) is not loopback to Linux.
		{"::7f00:1", false},
		{"64:ff9b::7f00:1", false},
	}
	for _, tt := range tests {
		t.Run(tt.addr, func(t *testing.T) {
			if got := refuse(netip.MustParseAddr(tt.addr)); got != tt.want {
				t.Errorf("refuse(%s) = %v, want %v", tt.addr, got, tt.want)
			}
		})
	}
	if RefusePrefixes()(netip.MustParseAddr("127.0.0.1")) {
		t.Error("an empty list refuses 127.0.0.1")
	}
	if RefusePrefixes(netip.Prefix{})(netip.Addr{}) {
		t.Error("the zero prefix refuses the zero address")
	}
}

func TestRefuseControl(t *testing.T) {
	control := RefuseControl(RefusePrefixes(LoopbackPrefixes()...))
	tests := []struct {
		address string
		refused bool
	}{
		{"127.0.0.1:80", true},
		{"[::ffff:127.0.0.1]:80", true},
		{"[::1]:443", true},
		{"10.1.2.3:80", false},
		{"[fe80::1%lo]:80", false},
		{"not-an-address", false},
	}
	for _, tt := range tests {
		err := control("tcp", tt.address, nil)
		if got := errors.Is(err, ErrRefusedDestination); got != tt.refused {
			t.Errorf("control(%q) = %v, want refused %v", tt.address, err, tt.refused)
		}
	}
}

// acceptFrom accepts one conn on ln and checks that it came from local, the
// address of a conn dialed after every refused one: a refused dial that had
// sent a SYN would have been queued, and accepted, first.
func acceptFrom(t *testing.T, ln net.Listener, local net.Addr) {
	t.Helper()
	ln.(*net.TCPListener).SetDeadline(time.Now().Add(5 * time.Second))
	c, err := ln.Accept()
	if err != nil {
		t.Fatalf("accept: %v", err)
	}
	defer c.Close()
	if c.RemoteAddr().String() != local.String() {
		t.Fatalf("accepted a conn from %v first, want the allowed one from %v: a refused dial connected", c.RemoteAddr(), local)
	}
}

func TestDirectRefuse(t *testing.T) {
	ln := listen(t, "tcp4", "127.0.0.1:0")
	port := strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
	d := Direct{Refuse: RefusePrefixes(LoopbackPrefixes()...)}
	for _, address := range []string{
		"127.0.0.1:" + port,
		"[::ffff:127.0.0.1]:" + port,
		// A name is checked once resolved: localhost is in /etc/hosts.
		"localhost:" + port,
	} {
		c, err := d.DialContext(t.Context(), "tcp", address)
		if err == nil {
			c.Close()
			t.Fatalf("dial %s succeeded, want it refused", address)
		}
		if !errors.Is(err, ErrRefusedDestination) {
			t.Fatalf("dial %s: err = %v, want ErrRefusedDestination", address, err)
		}
	}
	allowed, err := Direct{}.DialContext(t.Context(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer allowed.Close()
	acceptFrom(t, ln, allowed.LocalAddr())

	// Other addresses pass the check.
	other := Direct{Refuse: RefusePrefixes(netip.MustParsePrefix("198.18.0.0/15"))}
	c, err := other.DialContext(t.Context(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatalf("dial with an unrelated refuse list: %v", err)
	}
	c.Close()
}

func TestDirectListenPacketRefuse(t *testing.T) {
	srv, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	port := srv.LocalAddr().(*net.UDPAddr).Port
	p := strconv.Itoa(port)
	pc, err := Direct{Refuse: RefusePrefixes(LoopbackPrefixes()...)}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	for _, dst := range []net.Addr{
		&net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port},
		&net.UDPAddr{IP: net.ParseIP("::ffff:127.0.0.1"), Port: port},
		hostPortAddr("127.0.0.1:" + p),
		hostPortAddr("[::ffff:127.0.0.1]:" + p),
		hostPortAddr("localhost:" + p),
	} {
		if _, err := pc.WriteTo([]byte("refused"), dst); !errors.Is(err, ErrRefusedDestination) {
			t.Fatalf("WriteTo %v: err = %v, want ErrRefusedDestination", dst, err)
		}
	}
	// A datagram sent after them is the first to arrive: none of them
	// left.
	plain, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	if _, err := plain.WriteTo([]byte("allowed"), srv.LocalAddr()); err != nil {
		t.Fatal(err)
	}
	srv.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 64)
	n, _, err := srv.ReadFrom(buf)
	if err != nil || string(buf[:n]) != "allowed" {
		t.Fatalf("first datagram = %q, %v; want \"allowed\"", buf[:n], err)
	}
}
