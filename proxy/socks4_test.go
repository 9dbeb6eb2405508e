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

	"github.com/netstackd/netstackd/proxy/socks4"
)

// TestSOCKS4Dante runs CONNECT through the real dante, which speaks SOCKS4
// on its SOCKS5 port but has no SOCKS4A: a name gets code 91 (dante tries
// to connect to 0.0.0.1).
func TestSOCKS4Dante(t *testing.T) {
	server := startDante(t).addr
	port := strconv.Itoa(startEcho(t))
	refused := "127.0.0.1:" + strconv.Itoa(freePort(t))

	c, err := SOCKS4{Server: server, UserID: "bob"}.DialContext(t.Context(), "tcp", "127.0.0.1:"+port)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, ok := c.(socket); !ok {
		t.Fatalf("conn is %T, want a socket (CloseWrite, SetLinger, SyscallConn)", c)
	}
	roundTrip(t, c, "hello through dante's socks4")

	for _, address := range []string{refused, "localhost:" + port} {
		c, err := SOCKS4{Server: server}.DialContext(t.Context(), "tcp", address)
		if err == nil {
			c.Close()
			t.Fatalf("dial %s succeeded", address)
		}
		want := "dial " + address + " via socks4 " + server + ": request rejected or failed (reply code 91)"
		if err.Error() != want || !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("err = %q, want %q and ECONNREFUSED", err, want)
		}
	}
}

// TestSOCKS4aSSH runs SOCKS4A through OpenSSH's dynamic forwarding, which
// resolves the name on the server side.
func TestSOCKS4aSSH(t *testing.T) {
	server := startSSHSOCKS(t)
	ln4 := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, ln4, echo)
	port := strconv.Itoa(ln4.Addr().(*net.TCPAddr).Port)
	for _, address := range []string{"localhost:" + port, "127.0.0.1:" + port} {
		c, err := SOCKS4{Server: server, UserID: "ignored"}.DialContext(t.Context(), "tcp", address)
		if err != nil {
			t.Fatal(err)
		}
		roundTrip(t, c, "hello through ssh -D to "+address)
		c.Close()
	}
}

// TestSOCKS4DanteHalfClose checks what dante does with a FIN through
// SOCKS4 and SOCKS5: it passes it on and keeps the other direction open,
// so data the target sends after seeing EOF still arrives.
func TestSOCKS4DanteHalfClose(t *testing.T) {
	server := startDante(t).addr
	target := startServer(t, func(c net.Conn) {
		io.Copy(io.Discard, c) // until the FIN
		io.WriteString(c, "sent after the FIN")
		c.(socket).CloseWrite()
	})
	for _, d := range []Dialer{SOCKS4{Server: server}, SOCKS5{Server: server}} {
		c, err := d.DialContext(t.Context(), "tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.(socket).CloseWrite(); err != nil {
			t.Fatalf("CloseWrite: %v", err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got, err := io.ReadAll(c)
		c.Close()
		if err != nil || string(got) != "sent after the FIN" {
			t.Errorf("%v: after CloseWrite read %q, %v; want the target's reply, then EOF", d, got, err)
		}
	}
}

// readSOCKS4Request reads one SOCKS4 or SOCKS4A request.
func readSOCKS4Request(c net.Conn) (socks4.Request, error) {
	var buf []byte
	b := make([]byte, 1)
	for {
		if _, err := io.ReadFull(c, b); err != nil {
			return socks4.Request{}, err
		}
		buf = append(buf, b[0])
		req, _, err := socks4.ParseRequest(buf)
		if !errors.Is(err, socks4.ErrTruncated) {
			return req, err
		}
	}
}

// TestSOCKS4Request checks what the dialer puts on the wire, and that the
// target's first bytes, sent right behind the reply, stay in the conn.
func TestSOCKS4Request(t *testing.T) {
	tests := []struct {
		name    string
		network string
		address string
		userID  string
		want    socks4.Request
	}{
		{name: "ipv4", network: "tcp", address: "192.0.2.1:80", want: socks4.Request{Command: socks4.CommandConnect, IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "ipv4-mapped", network: "tcp4", address: "[::ffff:192.0.2.1]:80", want: socks4.Request{Command: socks4.CommandConnect, IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "user id", network: "tcp", address: "192.0.2.1:80", userID: "bob", want: socks4.Request{Command: socks4.CommandConnect, IP: netip.MustParseAddr("192.0.2.1"), Port: 80, UserID: "bob"}},
		{name: "name goes as socks4a", network: "tcp6", address: "example.com:443", want: socks4.Request{Command: socks4.CommandConnect, Name: "example.com", Port: 443}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requests := make(chan socks4.Request, 1)
			server := startServer(t, func(c net.Conn) {
				req, err := readSOCKS4Request(c)
				if err != nil {
					return
				}
				requests <- req
				c.Write(append(socks4.AppendReply(nil, socks4.Reply{Code: socks4.ReplyGranted}), "banner"...))
				io.Copy(io.Discard, c)
			})
			c, err := SOCKS4{Server: server, UserID: tt.userID}.DialContext(t.Context(), tt.network, tt.address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if req := <-requests; req != tt.want {
				t.Errorf("request = %+v, want %+v", req, tt.want)
			}
			got := make([]byte, len("banner"))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "banner" {
				t.Errorf("first bytes after the reply = %q, %v; want %q", got, err, "banner")
			}
		})
	}
}

// TestSOCKS4ServerMisbehaves checks the errors for bad replies, and that
// the conn to the server is closed exactly once.
func TestSOCKS4ServerMisbehaves(t *testing.T) {
	replyWith := func(answer []byte) func(net.Conn) {
		return func(c net.Conn) {
			if _, err := readSOCKS4Request(c); err != nil {
				return
			}
			c.Write(answer)
		}
	}
	tests := []struct {
		name    string
		answer  []byte
		wantErr error
		errText string
	}{
		{name: "rejected", answer: []byte{0, 91, 0, 0, 0, 0, 0, 0}, wantErr: syscall.ECONNREFUSED, errText: "request rejected or failed (reply code 91)"},
		{name: "identd", answer: []byte{0, 92, 0, 0, 0, 0, 0, 0}, errText: "cannot reach identd on the client (reply code 92)"},
		{name: "socks5 server", answer: []byte{0x05, 0xFF}, wantErr: io.ErrUnexpectedEOF, errText: "read reply: unexpected EOF"},
		{name: "http server", answer: []byte("HTTP/1.1 400 Bad Request\r\n\r\n"), errText: "read reply: reply version 0x48, want 0x00"},
		{name: "closes at once", answer: nil, wantErr: io.EOF, errText: "read reply: EOF"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var forward closeCounter
			server := startServer(t, replyWith(tt.answer))
			c, err := SOCKS4{Server: server, Forward: &forward}.DialContext(t.Context(), "tcp", "192.0.2.1:80")
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "dial 192.0.2.1:80 via socks4 "+server+": ") || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("err = %q, want it to contain %q", err, tt.errText)
			}
			if n := forward.closes.Load(); n != 1 {
				t.Errorf("conn to the server closed %d times, want once", n)
			}
		})
	}
}

// TestSOCKS4BadInput checks that requests SOCKS4 cannot carry fail before
// the server is dialed.
func TestSOCKS4BadInput(t *testing.T) {
	tests := []struct {
		name    string
		userID  string
		network string
		address string
		errText string
	}{
		{name: "ipv6", network: "tcp", address: "[2001:db8::1]:80", errText: "SOCKS4 has no IPv6: cannot reach 2001:db8::1"},
		{name: "ipv4 for tcp6", network: "tcp6", address: "192.0.2.1:80", errText: "no suitable address"},
		{name: "udp", network: "udp", address: "192.0.2.1:53", errText: "unknown network udp"},
		{name: "socks4a marker", network: "tcp", address: "0.0.0.1:80", errText: "means a SOCKS4A name follows"},
		{name: "nul in user id", userID: "a\x00", network: "tcp", address: "192.0.2.1:80", errText: "user ID holds a NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := SOCKS4{Server: "192.0.2.2:1080", UserID: tt.userID, Forward: failDialer{t}}
			_, err := d.DialContext(t.Context(), tt.network, tt.address)
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("err = %v, want one containing %q", err, tt.errText)
			}
		})
	}
}

// TestSOCKS4SilentServer checks that HandshakeTimeout bounds the wait for a
// reply.
func TestSOCKS4SilentServer(t *testing.T) {
	server := startServer(t, func(c net.Conn) { io.Copy(io.Discard, c) })
	start := time.Now()
	c, err := SOCKS4{Server: server, HandshakeTimeout: 200 * time.Millisecond}.DialContext(t.Context(), "tcp", "192.0.2.1:80")
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("err = %v after %v, want a timeout after about 200ms", err, time.Since(start))
	}
}

func TestSOCKS4String(t *testing.T) {
	for d, want := range map[SOCKS4]string{
		{Server: "127.0.0.1:1080"}:                "socks4://127.0.0.1:1080",
		{Server: "[::1]:1080", UserID: "a@b"}:     "socks4://a%40b@[::1]:1080",
		{Server: "proxy.lan:1080", UserID: "bob"}: "socks4://bob@proxy.lan:1080",
	} {
		if got := d.String(); got != want {
			t.Errorf("String() = %q, want %q", got, want)
		}
	}
}
