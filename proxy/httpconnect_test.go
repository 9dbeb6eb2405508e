package proxy

import (
	"bufio"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// bannerEcho greets each client with a line, then echoes.
func bannerEcho(c net.Conn) {
	if _, err := io.WriteString(c, "banner\n"); err != nil {
		return
	}
	echo(c)
}

func TestHTTPConnectTinyproxy(t *testing.T) {
	open := startTinyproxy(t, "", "")
	auth := startTinyproxy(t, "bob", "s3cret")
	port := strconv.Itoa(startEcho(t))
	tests := []struct {
		name     string
		server   string
		user     string
		password string
		address  string
	}{
		{name: "ipv4 literal", server: open, address: "127.0.0.1:" + port},
		{name: "domain name", server: open, address: "localhost:" + port},
		{name: "basic auth", server: auth, user: "bob", password: "s3cret", address: "127.0.0.1:" + port},
		{name: "credentials offered to an open proxy", server: open, user: "bob", password: "x", address: "127.0.0.1:" + port},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "domain name" && hasIPv6Loopback() {
				// tinyproxy tries each address of the name in turn.
				if ln6, err := net.Listen("tcp6", "[::1]:"+port); err == nil {
					serve(t, ln6, echo)
				}
			}
			d := HTTPConnect{Server: tt.server, Username: tt.user, Password: tt.password}
			c, err := d.DialContext(t.Context(), "tcp", tt.address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, ok := c.(socket); !ok {
				t.Fatalf("conn is %T, want a socket (CloseWrite, SetLinger, SyscallConn)", c)
			}
			roundTrip(t, c, "hello through tinyproxy, "+tt.name)
		})
	}
}

// TestHTTPConnectTinyproxyBanner checks that what the target sends at once
// survives: tinyproxy 1.11.1 passes it on right behind its response head,
// often in the same segment.
func TestHTTPConnectTinyproxyBanner(t *testing.T) {
	server := startTinyproxy(t, "", "")
	target := startServer(t, bannerEcho)
	for i := range 20 {
		c, err := HTTPConnect{Server: server}.DialContext(t.Context(), "tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		got := make([]byte, len("banner\n"))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != "banner\n" {
			t.Fatalf("dial %d: first bytes %q, %v; want the banner", i, got, err)
		}
		roundTrip(t, c, "after the banner")
		c.Close()
	}
}

func TestHTTPConnectTinyproxyErrors(t *testing.T) {
	auth := startTinyproxy(t, "bob", "s3cret")
	open := startTinyproxy(t, "", "")
	port := strconv.Itoa(startEcho(t))
	refused := "127.0.0.1:" + strconv.Itoa(freePort(t))
	tests := []struct {
		name     string
		server   string
		user     string
		password string
		address  string
		wantErr  error
		errText  string
	}{
		{
			name: "no credentials", server: auth, address: "127.0.0.1:" + port,
			errText: `proxy authentication required (407 Proxy Authentication Required; proxy asks for Basic realm="Tinyproxy") (sent no credentials; does the proxy need a username?)`,
		},
		{
			// tinyproxy answers wrong credentials with 401, not 407.
			name: "wrong password", server: auth, user: "bob", password: "guess", address: "127.0.0.1:" + port,
			errText: `proxy refused the credentials (401 Unauthorized) (as "bob")`,
		},
		{
			// tinyproxy answers a refused connect with 500 Unable to connect.
			name: "refused target", server: open, address: refused,
			wantErr: syscall.ECONNREFUSED, errText: "proxy answered 500 Unable to connect",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := HTTPConnect{Server: tt.server, Username: tt.user, Password: tt.password}
			c, err := d.DialContext(t.Context(), "tcp", tt.address)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			want := "dial " + tt.address + " via http " + tt.server + ": " + tt.errText
			if err.Error() != want {
				t.Errorf("err = %q\nwant  %q", err, want)
			}
		})
	}
}

// TestHTTPConnectTinyproxyHalfClose records what tinyproxy 1.11.1 does
// with a FIN from the client: it passes it on, then closes the tunnel both
// ways at once, so what the target sends after seeing EOF is lost.
func TestHTTPConnectTinyproxyHalfClose(t *testing.T) {
	server := startTinyproxy(t, "", "")
	targetEOF := make(chan struct{})
	target := startServer(t, func(c net.Conn) {
		io.Copy(io.Discard, c) // until the FIN
		close(targetEOF)
		time.Sleep(100 * time.Millisecond)
		io.WriteString(c, "sent after the FIN")
		c.(socket).CloseWrite()
	})
	c, err := HTTPConnect{Server: server}.DialContext(t.Context(), "tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.(socket).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	select {
	case <-targetEOF:
	case <-time.After(5 * time.Second):
		t.Fatal("target did not see EOF after CloseWrite")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || len(got) != 0 {
		t.Errorf("after CloseWrite read %q, %v; want EOF and nothing (tinyproxy closes both ways)", got, err)
	}
}

// TestHTTPConnectRequest checks the request on the wire, and that bytes
// written in the same segment as the response head stay in the conn.
func TestHTTPConnectRequest(t *testing.T) {
	tests := []struct {
		name     string
		network  string
		address  string
		user     string
		password string
		target   string
		auth     string
	}{
		{name: "ipv4", network: "tcp", address: "192.0.2.1:443", target: "192.0.2.1:443"},
		{name: "ipv6", network: "tcp6", address: "[2001:db8::1]:443", target: "[2001:db8::1]:443"},
		{name: "ipv4-mapped", network: "tcp", address: "[::ffff:192.0.2.1]:443", target: "192.0.2.1:443"},
		{name: "name", network: "tcp4", address: "example.com:443", target: "example.com:443"},
		{name: "basic auth", network: "tcp", address: "example.com:443", user: "bob", password: "pw:x", target: "example.com:443", auth: "Basic Ym9iOnB3Ong="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requests := make(chan *http.Request, 1)
			server := startServer(t, func(c net.Conn) {
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				requests <- req
				io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\nbanner")
				io.Copy(io.Discard, c)
			})
			d := HTTPConnect{Server: server, Username: tt.user, Password: tt.password}
			c, err := d.DialContext(t.Context(), tt.network, tt.address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			req := <-requests
			if req.Method != "CONNECT" || req.RequestURI != tt.target || req.Host != tt.target || req.Proto != "HTTP/1.1" {
				t.Errorf("request %s %s %s, Host %s; want CONNECT %s HTTP/1.1", req.Method, req.RequestURI, req.Proto, req.Host, tt.target)
			}
			if got := req.Header.Get("Proxy-Authorization"); got != tt.auth {
				t.Errorf("Proxy-Authorization = %q, want %q", got, tt.auth)
			}
			got := make([]byte, len("banner"))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "banner" {
				t.Errorf("first bytes after the head = %q, %v; want %q", got, err, "banner")
			}
		})
	}
}

// TestHTTPConnectServerMisbehaves checks the errors for responses that do
// not open a tunnel, and that the conn to the server is closed once.
func TestHTTPConnectServerMisbehaves(t *testing.T) {
	answer := func(resp string) func(net.Conn) {
		return func(c net.Conn) {
			if _, err := http.ReadRequest(bufio.NewReader(c)); err != nil {
				return
			}
			io.WriteString(c, resp)
		}
	}
	tests := []struct {
		name    string
		resp    string
		wantErr error
		errText string
	}{
		{name: "bad gateway", resp: "HTTP/1.1 502 Bad Gateway\r\n\r\n", wantErr: syscall.ECONNREFUSED, errText: "proxy answered 502 Bad Gateway"},
		{name: "squid refused", resp: "HTTP/1.1 503 Service Unavailable\r\nX-Squid-Error: ERR_CONNECT_FAIL 111\r\n\r\n", wantErr: syscall.ECONNREFUSED, errText: "proxy answered 503 Service Unavailable"},
		{name: "gateway timeout", resp: "HTTP/1.1 504 Gateway Timeout\r\n\r\n", wantErr: syscall.ECONNREFUSED, errText: "proxy answered 504 Gateway Timeout"},
		{name: "forbidden", resp: "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", errText: "proxy answered 403 Forbidden"},
		{name: "socks5 server", resp: "\x05\xff", errText: `read response: response starts "\x05", want "HTTP/"`},
		{name: "closes mid head", resp: "HTTP/1.1 200 OK\r\n", wantErr: io.ErrUnexpectedEOF, errText: "read response: unexpected EOF"},
		{name: "closes at once", resp: "", wantErr: io.EOF, errText: "read response: EOF"},
		{name: "head too long", resp: "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", 9000), errText: "response head longer than 8192 bytes"},
		{name: "malformed status", resp: "HTTP/1.1 OK\r\n\r\n", errText: "malformed status code"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var forward closeCounter
			server := startServer(t, answer(tt.resp))
			c, err := HTTPConnect{Server: server, Forward: &forward}.DialContext(t.Context(), "tcp", "192.0.2.1:443")
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			if !strings.HasPrefix(err.Error(), "dial 192.0.2.1:443 via http "+server+": ") || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("err = %q, want it to contain %q", err, tt.errText)
			}
			if n := forward.closes.Load(); n != 1 {
				t.Errorf("conn to the server closed %d times, want once", n)
			}
		})
	}
}

func TestHTTPConnectBadInput(t *testing.T) {
	tests := []struct {
		name    string
		dialer  HTTPConnect
		network string
		address string
		errText string
	}{
		{name: "udp", network: "udp", address: "192.0.2.1:53", errText: "unknown network udp"},
		{name: "header injection", network: "tcp", address: "a\r\nX-Evil:80", errText: `'\r' in host name`},
		{name: "password without username", dialer: HTTPConnect{Password: "x"}, network: "tcp", address: "192.0.2.1:80", errText: "password set without a username"},
		{name: "colon in username", dialer: HTTPConnect{Username: "a:b"}, network: "tcp", address: "192.0.2.1:80", errText: `username holds a ":"`},
		{name: "ipv6 for tcp4", network: "tcp4", address: "[2001:db8::1]:80", errText: "no suitable address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.dialer
			d.Server = "192.0.2.2:3128"
			d.Forward = failDialer{t}
			_, err := d.DialContext(t.Context(), tt.network, tt.address)
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("err = %q, want one containing %q", err, tt.errText)
			}
		})
	}
}

// TestHTTPConnectSilentServer checks that HandshakeTimeout bounds the wait
// for the response head, also when it stops mid-line.
func TestHTTPConnectSilentServer(t *testing.T) {
	server := startServer(t, func(c net.Conn) {
		io.WriteString(c, "HTTP/1.1 200")
		io.Copy(io.Discard, c)
	})
	start := time.Now()
	c, err := HTTPConnect{Server: server, HandshakeTimeout: 200 * time.Millisecond}.DialContext(t.Context(), "tcp", "192.0.2.1:80")
	if err == nil {
		c.Close()
		t.Fatal("dial succeeded")
	}
	if !errors.Is(err, os.ErrDeadlineExceeded) || time.Since(start) > 2*time.Second {
		t.Errorf("err = %v after %v, want a timeout after about 200ms", err, time.Since(start))
	}
}

func TestHTTPConnectString(t *testing.T) {
	d := HTTPConnect{Server: "[::1]:3128", Username: "a@b", Password: "hunter2"}
	const want = "http://a%40b@[::1]:3128"
	if got := d.String(); got != want {
		t.Errorf("String() = %q, want %q", got, want)
	}
	if got := d.LogValue().String(); got != want {
		t.Errorf("LogValue() = %q, want %q", got, want)
	}
}
