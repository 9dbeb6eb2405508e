package proxy

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/proxy/socks5"
)

// TestSOCKS5UDPDante echoes 1,000 datagrams of 1 to 1,400 bytes through a
// UDP ASSOCIATE of the real dante, to an IP and to a name, and checks each
// comes back whole from the echo server's address, at least 99.9% of them
// on the first send.
func TestSOCKS5UDPDante(t *testing.T) {
	dante := startDante(t)
	port := echoOnLoopbacks(t)
	tests := []struct {
		name  string
		dst   net.Addr
		count int
	}{
		{name: "ipv4 literal", dst: &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}, count: 1000},
		{name: "domain name", dst: hostPortAddr("localhost:" + strconv.Itoa(port)), count: 200},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pc, err := SOCKS5{Server: dante.addr}.ListenPacket(t.Context(), "udp", "")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			resent := 0
			for i := range tt.count {
				size := 1 + i*1399/(tt.count-1)
				msg := make([]byte, size)
				for j := range msg {
					msg[j] = byte(i + j)
				}
				from, sends := packetRoundTrips(t, pc, tt.dst, msg)
				resent += sends - 1
				ua, ok := from.(*net.UDPAddr)
				if !ok || ua.Port != port || !ua.AddrPort().Addr().Unmap().IsLoopback() {
					t.Fatalf("datagram %d came back from %v (%T), want loopback port %d", i, from, from, port)
				}
			}
			if resent*1000 > tt.count {
				t.Errorf("%d of %d datagrams had to be sent again", resent, tt.count)
			}
			if n := pc.(*SOCKS5Association).FragmentsDropped(); n != 0 {
				t.Errorf("dante sent %d fragments", n)
			}
		})
	}
}

// TestSOCKS5UDPDanteControlDrop checks that the association ends when the
// server goes: ReadFrom, blocked with no deadline near, returns
// ErrAssociationEnded once dante's processes have closed the control
// connection.
func TestSOCKS5UDPDanteControlDrop(t *testing.T) {
	dante := startDante(t)
	echoAddr := startUDPEcho(t, "127.0.0.1", 0)
	pc, err := SOCKS5{Server: dante.addr}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	packetRoundTrip(t, pc, echoAddr, []byte("before"))

	readErr := make(chan error, 1)
	go func() {
		pc.SetReadDeadline(time.Now().Add(time.Minute))
		_, _, err := pc.ReadFrom(make([]byte, 100))
		readErr <- err
	}()
	dante.stop()
	select {
	case err := <-readErr:
		if !errors.Is(err, ErrAssociationEnded) {
			t.Errorf("ReadFrom = %v, want ErrAssociationEnded", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("ReadFrom still blocked 10s after dante stopped")
	}
	if _, err := pc.WriteTo([]byte("after"), echoAddr); !errors.Is(err, ErrAssociationEnded) {
		t.Errorf("WriteTo after the end = %v, want ErrAssociationEnded", err)
	}
}

// TestSOCKS5UDPMicrosocks checks the error from a server without UDP
// ASSOCIATE: microsocks 1.0.3 answers "command not supported".
func TestSOCKS5UDPMicrosocks(t *testing.T) {
	server := startMicrosocks(t, "", "")
	pc, err := SOCKS5{Server: server}.ListenPacket(t.Context(), "udp", "")
	if err == nil {
		pc.Close()
		t.Fatal("UDP ASSOCIATE through microsocks succeeded")
	}
	want := "udp associate via socks5 " + server + ": the proxy does not support UDP ASSOCIATE: command not supported (reply code 7)"
	if err.Error() != want {
		t.Errorf("err = %q, want %q", err, want)
	}
	if re, ok := errors.AsType[*socks5.ReplyError](err); !ok || re.Code != socks5.ReplyCommandNotSupported {
		t.Errorf("err = %v, want a *socks5.ReplyError with code 7", err)
	}
}

// scriptedRelay is a minimal SOCKS5 server for UDP ASSOCIATE: it answers
// with BND.ADDR 0.0.0.0 and its relay's port, hands each datagram a client
// sends to answer, and ends the association when the client closes the
// control connection.
func scriptedRelay(t *testing.T, answer func(relay *net.UDPConn, client net.Addr, h socks5.UDPHeader, data []byte)) string {
	t.Helper()
	return startServer(t, func(c net.Conn) {
		req, err := acceptNoAuth(c)
		if err != nil || req.Command != socks5.CommandUDPAssociate {
			return
		}
		relay, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
		if err != nil {
			return
		}
		defer relay.Close()
		bnd := netip.AddrPortFrom(netip.IPv4Unspecified(), uint16(relay.LocalAddr().(*net.UDPAddr).Port))
		b, _ := socks5.AppendReply(nil, socks5.Reply{Addr: socks5.AddrFromAddrPort(bnd)})
		if _, err := c.Write(b); err != nil {
			return
		}
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 65535)
			for {
				n, from, err := relay.ReadFrom(buf)
				if err != nil {
					return
				}
				h, hlen, err := socks5.ParseUDPHeader(buf[:n])
				if err != nil {
					t.Errorf("relay got a bad datagram %x: %v", buf[:n], err)
					continue
				}
				answer(relay, from, h, buf[hlen:n])
			}
		}()
		io.Copy(io.Discard, c)
		relay.Close()
		<-done
	})
}

func datagram(h socks5.UDPHeader, data string) []byte {
	b, _ := socks5.AppendUDPHeader(nil, h)
	return append(b, data...)
}

// TestSOCKS5UDPScripted checks what reaches ReadFrom: only whole datagrams
// from the relay, with the source the relay names, and what WriteTo sends.
func TestSOCKS5UDPScripted(t *testing.T) {
	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	named := socks5.Addr{Name: "echo.example", Port: 7}
	server := scriptedRelay(t, func(relay *net.UDPConn, client net.Addr, h socks5.UDPHeader, data []byte) {
		// A stranger, a fragment and a datagram with no valid header
		// are dropped; the answer after them comes through.
		stranger.WriteTo(datagram(socks5.UDPHeader{Addr: h.Addr}, "from a stranger"), client)
		relay.WriteTo(datagram(socks5.UDPHeader{Frag: 1, Addr: h.Addr}, "fragment"), client)
		relay.WriteTo([]byte{0, 0}, client)
		src := h.Addr
		if h.Addr.Port == 7 {
			src = named
		}
		relay.WriteTo(datagram(socks5.UDPHeader{Addr: src}, "re: "+string(data)), client)
	})
	pc, err := SOCKS5{Server: server}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	tests := []struct {
		name     string
		dst      net.Addr
		wantFrom string
	}{
		{name: "udp addr", dst: &net.UDPAddr{IP: net.IPv4(192, 0, 2, 1), Port: 53}, wantFrom: "192.0.2.1:53"},
		{name: "ipv4-mapped goes as ipv4", dst: &net.UDPAddr{IP: net.ParseIP("::ffff:192.0.2.1"), Port: 53}, wantFrom: "192.0.2.1:53"},
		{name: "ipv6", dst: hostPortAddr("[2001:db8::1]:53"), wantFrom: "[2001:db8::1]:53"},
		{name: "name", dst: hostPortAddr("echo.example:7"), wantFrom: "echo.example:7"},
	}
	buf := make([]byte, 100)
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if n, err := pc.WriteTo([]byte(tt.name), tt.dst); err != nil || n != len(tt.name) {
				t.Fatalf("WriteTo = %d, %v", n, err)
			}
			pc.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, from, err := pc.ReadFrom(buf)
			if err != nil || string(buf[:n]) != "re: "+tt.name || from.String() != tt.wantFrom {
				t.Fatalf("ReadFrom = %q from %v, %v; want %q from %s", buf[:n], from, err, "re: "+tt.name, tt.wantFrom)
			}
			if _, isUDP := from.(*net.UDPAddr); isUDP == (tt.wantFrom == "echo.example:7") {
				t.Errorf("source is a %T", from)
			}
			if got := pc.(*SOCKS5Association).FragmentsDropped(); got != uint64(i+1) {
				t.Errorf("FragmentsDropped = %d, want %d", got, i+1)
			}
		})
	}
	t.Run("short buffer truncates", func(t *testing.T) {
		pc.WriteTo([]byte("truncate me"), hostPortAddr("192.0.2.1:9"))
		small := make([]byte, 4)
		pc.SetReadDeadline(time.Now().Add(5 * time.Second))
		if n, _, err := pc.ReadFrom(small); err != nil || string(small[:n]) != "re: " {
			t.Fatalf("ReadFrom = %q, %v", small[:n], err)
		}
	})
	t.Run("unsendable", func(t *testing.T) {
		for _, dst := range []net.Addr{nil, hostPortAddr("[fe80::1%lo]:53"), hostPortAddr(strings.Repeat("a", 256) + ":53"), hostPortAddr("x")} {
			if _, err := pc.WriteTo([]byte("x"), dst); err == nil {
				t.Errorf("WriteTo %v succeeded", dst)
			}
		}
		if _, err := pc.WriteTo(make([]byte, 65535), hostPortAddr("192.0.2.1:9")); err == nil || !strings.Contains(err.Error(), "exceeds 65535") {
			t.Errorf("WriteTo of 64 KiB = %v, want an error for the size", err)
		}
	})
}

// TestSOCKS5UDPClose checks that Close wakes a blocked ReadFrom with a
// closed-conn error (not ErrAssociationEnded), closes the control
// connection, and may be called again.
func TestSOCKS5UDPClose(t *testing.T) {
	ctrlClosed := make(chan struct{})
	server := startServer(t, func(c net.Conn) {
		if _, err := acceptNoAuth(c); err != nil {
			return
		}
		b, _ := socks5.AppendReply(nil, socks5.Reply{Addr: socks5.AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:9"))})
		c.Write(b)
		io.Copy(io.Discard, c)
		close(ctrlClosed)
	})
	pc, err := SOCKS5{Server: server}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	readErr := make(chan error, 1)
	go func() {
		_, _, err := pc.ReadFrom(make([]byte, 10))
		readErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	if err := pc.Close(); err != nil {
		t.Errorf("Close = %v", err)
	}
	select {
	case err := <-readErr:
		if !errors.Is(err, net.ErrClosed) || errors.Is(err, ErrAssociationEnded) {
			t.Errorf("ReadFrom after Close = %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("ReadFrom still blocked after Close")
	}
	select {
	case <-ctrlClosed:
	case <-time.After(5 * time.Second):
		t.Error("control connection still open after Close")
	}
	if err := pc.Close(); err != nil {
		t.Errorf("second Close = %v", err)
	}
}

// TestSOCKS5UDPDeadline checks that deadlines reach the UDP socket.
func TestSOCKS5UDPDeadline(t *testing.T) {
	server := scriptedRelay(t, func(*net.UDPConn, net.Addr, socks5.UDPHeader, []byte) {})
	pc, err := SOCKS5{Server: server}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	start := time.Now()
	pc.SetDeadline(time.Now().Add(200 * time.Millisecond))
	_, _, err = pc.ReadFrom(make([]byte, 10))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("ReadFrom = %v, want a timeout", err)
	}
	if elapsed := time.Since(start); elapsed > 2*time.Second {
		t.Errorf("timed out after %v, want about 200ms", elapsed)
	}
}

// TestSOCKS5UDPForwardControl checks that the UDP socket comes from
// Forward's ListenPacket, so Direct's Control (SO_MARK, say) applies to it.
func TestSOCKS5UDPForwardControl(t *testing.T) {
	server := scriptedRelay(t, func(relay *net.UDPConn, client net.Addr, h socks5.UDPHeader, data []byte) {
		relay.WriteTo(datagram(h, string(data)), client)
	})
	var networks []string
	forward := Direct{Control: func(network, _ string, _ syscall.RawConn) error {
		networks = append(networks, network)
		return nil
	}}
	pc, err := SOCKS5{Server: server, Forward: forward}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	packetRoundTrip(t, pc, hostPortAddr("192.0.2.1:53"), []byte("marked"))
	if len(networks) != 2 || !strings.HasPrefix(networks[0], "udp") || !strings.HasPrefix(networks[1], "tcp") {
		t.Errorf("Control saw %q, want a UDP socket then the TCP connection", networks)
	}
}

func TestSOCKS5UDPBadInput(t *testing.T) {
	tests := []struct {
		name    string
		dialer  SOCKS5
		network string
		address string
		errText string
	}{
		{name: "tcp", network: "tcp", errText: "unknown network tcp"},
		{name: "local address", network: "udp", address: ":5353", errText: `local address ":5353": the relay picks the address`},
		{name: "password without username", dialer: SOCKS5{Password: "x"}, network: "udp", errText: "password set without a username"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.dialer
			d.Server = "192.0.2.2:1080"
			d.Forward = failDialer{t}
			pc, err := d.ListenPacket(t.Context(), tt.network, tt.address)
			if err == nil {
				pc.Close()
			}
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("err = %v, want one containing %q", err, tt.errText)
			}
		})
	}
}

// TestSOCKS5UDPServerErrors checks replies that cannot open an
// association, and that nothing is left open after them.
func TestSOCKS5UDPServerErrors(t *testing.T) {
	replyWith := func(r socks5.Reply) func(net.Conn) {
		return func(c net.Conn) {
			if _, err := acceptNoAuth(c); err != nil {
				return
			}
			b, _ := socks5.AppendReply(nil, r)
			c.Write(b)
			io.Copy(io.Discard, c)
		}
	}
	tests := []struct {
		name    string
		reply   socks5.Reply
		wantErr error
		errText string
	}{
		{name: "not allowed", reply: socks5.Reply{Code: socks5.ReplyNotAllowed, Addr: socks5.AddrFromAddrPort(netip.MustParseAddrPort("0.0.0.0:0"))}, errText: "not allowed by ruleset (reply code 2)"},
		{name: "no port", reply: socks5.Reply{Addr: socks5.AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:0"))}, errText: "relay address 127.0.0.1:0, with no port"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var forward closeCounter
			server := startServer(t, replyWith(tt.reply))
			pc, err := SOCKS5{Server: server, Forward: &forward}.ListenPacket(t.Context(), "udp", "")
			if err == nil {
				pc.Close()
				t.Fatal("ListenPacket succeeded")
			}
			if !strings.Contains(err.Error(), tt.errText) || strings.Contains(err.Error(), "does not support") {
				t.Errorf("err = %q, want it to contain %q", err, tt.errText)
			}
			if n := forward.closes.Load(); n != 1 {
				t.Errorf("control connection closed %d times, want once", n)
			}
		})
	}
}
