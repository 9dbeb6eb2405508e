package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/proxy/socks5"
)

func TestSOCKS5Microsocks(t *testing.T) {
	open := startMicrosocks(t, "", "")
	auth := startMicrosocks(t, "bob", "s3cret:@/")
	ln4 := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, ln4, echo)
	port := strconv.Itoa(ln4.Addr().(*net.TCPAddr).Port)
	// microsocks connects to the first address its resolver returns for
	// "localhost", which may be ::1: echo there on the same port too.
	ipv6 := hasIPv6Loopback()
	if ipv6 {
		if ln6, err := net.Listen("tcp6", "[::1]:"+port); err == nil {
			serve(t, ln6, echo)
		} else {
			t.Logf("no echo on [::1]:%s (%v): localhost must resolve to 127.0.0.1 first", port, err)
		}
	}
	tests := []struct {
		name     string
		server   string
		user     string
		password string
		address  string
		needIPv6 bool
	}{
		{name: "ipv4 literal", server: open, address: "127.0.0.1:" + port},
		{name: "domain name", server: open, address: "localhost:" + port},
		{name: "ipv6 literal", server: open, address: "[::1]:" + port, needIPv6: true},
		{name: "username and password", server: auth, user: "bob", password: "s3cret:@/", address: "127.0.0.1:" + port},
		{name: "credentials offered to an open server", server: open, user: "bob", password: "x", address: "127.0.0.1:" + port},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needIPv6 && !ipv6 {
				t.Skip("::1 is not configured")
			}
			d := SOCKS5{Server: tt.server, Username: tt.user, Password: tt.password}
			c, err := d.DialContext(t.Context(), "tcp", tt.address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, ok := c.(socket); !ok {
				t.Fatalf("conn is %T, want a socket (CloseWrite, SetLinger, SyscallConn)", c)
			}
			roundTrip(t, c, "hello through "+tt.name)
		})
	}
}

func TestSOCKS5MicrosocksErrors(t *testing.T) {
	open := startMicrosocks(t, "", "")
	auth := startMicrosocks(t, "bob", "secret")
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
			// microsocks answers {0x01, 0x02}: its "not allowed" reply
			// code as the RFC 1929 status.
			name: "wrong password", server: auth, user: "bob", password: "guess", address: "127.0.0.1:" + port,
			wantErr: socks5.ErrAuthFailed, errText: `authenticate as "bob": username/password rejected`,
		},
		{
			name: "no credentials for a server that wants them", server: auth, address: "127.0.0.1:" + port,
			wantErr: socks5.ErrNoAcceptableMethods, errText: "does the server need a username?",
		},
		{
			// microsocks maps the ECONNREFUSED of its connect to reply
			// code 5 (connection refused).
			name: "refused target", server: open, address: refused,
			wantErr: syscall.ECONNREFUSED, errText: "connection refused (reply code 5)",
		},
		{
			// microsocks sends general failure for a name it cannot
			// resolve; .invalid never resolves (RFC 6761 §6.4).
			name: "unresolvable name", server: open, address: "name.invalid:80",
			errText: "general failure (reply code 1)",
		},
		{
			name: "no server", server: refused, address: "127.0.0.1:" + port,
			wantErr: syscall.ECONNREFUSED, errText: "via socks5 " + refused + ": dial " + refused + " direct: ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := SOCKS5{Server: tt.server, Username: tt.user, Password: tt.password}
			c, err := d.DialContext(t.Context(), "tcp", tt.address)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			prefix := "dial " + tt.address + " via socks5 " + tt.server + ": "
			if !strings.HasPrefix(err.Error(), prefix) || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("err = %q, want %q...%q", err, prefix, tt.errText)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("err %q shows the password", err)
			}
		})
	}
}

// TestSOCKS5MicrosocksHalfClose checks that CloseWrite on the returned conn
// sends a FIN through microsocks to the target. microsocks (1.0.3) ends
// both directions at the first EOF, so the reverse direction is checked
// with halfCloseRelay in TestSOCKS5HalfClose.
func TestSOCKS5MicrosocksHalfClose(t *testing.T) {
	open := startMicrosocks(t, "", "")
	ln := listen(t, "tcp4", "127.0.0.1:0")
	targetEOF := make(chan error, 1)
	serve(t, ln, func(c net.Conn) {
		_, err := io.Copy(io.Discard, c)
		targetEOF <- err
	})
	c, err := SOCKS5{Server: open}.DialContext(t.Context(), "tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "request"); err != nil {
		t.Fatal(err)
	}
	if err := c.(socket).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	select {
	case err := <-targetEOF:
		if err != nil {
			t.Fatalf("target read ended with %v, want EOF", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("target did not see EOF after CloseWrite")
	}
}

// halfCloseRelay is a minimal SOCKS5 server (no authentication, CONNECT)
// that passes a FIN on with CloseWrite and keeps the other direction
// flowing, as netstackd's own relay does.
func halfCloseRelay(c net.Conn) {
	req, err := acceptNoAuth(c)
	if err != nil {
		return
	}
	up, err := net.Dial("tcp", req.Addr.String())
	if err != nil {
		writeReply(c, socks5.ReplyConnectionRefused)
		return
	}
	defer up.Close()
	if writeReply(c, socks5.ReplySucceeded) != nil {
		return
	}
	var wg sync.WaitGroup
	wg.Go(func() { pipe(up, c) })
	pipe(c, up)
	wg.Wait()
}

// pipe copies src to dst; at EOF it half-closes dst, on an error it closes
// both so that the opposite pipe ends too.
func pipe(dst, src net.Conn) {
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		src.Close()
		return
	}
	dst.(socket).CloseWrite()
}

// acceptNoAuth reads a greeting, selects no authentication and reads the
// request that follows.
func acceptNoAuth(c net.Conn) (socks5.Request, error) {
	head := make([]byte, 2)
	if _, err := io.ReadFull(c, head); err != nil {
		return socks5.Request{}, err
	}
	if _, err := io.ReadFull(c, make([]byte, head[1])); err != nil {
		return socks5.Request{}, err
	}
	if _, err := c.Write(socks5.AppendMethodSelection(nil, socks5.MethodNoAuth)); err != nil {
		return socks5.Request{}, err
	}
	return readRequest(c)
}

// readRequest reads exactly one request: VER, CMD, RSV, ATYP, then the rest
// of the address as its type says.
func readRequest(c net.Conn) (socks5.Request, error) {
	buf := make([]byte, 4, 262)
	if _, err := io.ReadFull(c, buf); err != nil {
		return socks5.Request{}, err
	}
	for {
		n, err := socks5.AddrLen(buf[3:])
		if err != nil {
			return socks5.Request{}, err
		}
		if 3+n <= len(buf) {
			break
		}
		have := len(buf)
		buf = buf[:3+n]
		if _, err := io.ReadFull(c, buf[have:]); err != nil {
			return socks5.Request{}, err
		}
	}
	req, _, err := socks5.ParseRequest(buf)
	return req, err
}

func writeReply(c net.Conn, code byte) error {
	b, _ := socks5.AppendReply(nil, socks5.Reply{Code: code, Addr: socks5.AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:1080"))})
	_, err := c.Write(b)
	return err
}

// startServer runs handle on each conn accepted on a loopback port and
// returns the address.
func startServer(t *testing.T, handle func(net.Conn)) string {
	t.Helper()
	ln := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, ln, handle)
	return ln.Addr().String()
}

func TestSOCKS5HalfClose(t *testing.T) {
	target := "127.0.0.1:" + strconv.Itoa(startEcho(t))
	server := startServer(t, halfCloseRelay)
	c, err := SOCKS5{Server: server}.DialContext(t.Context(), "tcp", target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	const msg = "sent before the FIN"
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	if err := c.(socket).CloseWrite(); err != nil {
		t.Fatalf("CloseWrite: %v", err)
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != msg {
		t.Fatalf("after CloseWrite read %q, %v; want %q, EOF", got, err, msg)
	}
}

// TestSOCKS5Request checks what the dialer puts on the wire: the address
// type follows the host, and bytes the target sends right behind the reply
// stay in the conn.
func TestSOCKS5Request(t *testing.T) {
	tests := []struct {
		name    string
		network string
		address string
		want    socks5.Addr
	}{
		{name: "ipv4", network: "tcp", address: "192.0.2.1:80", want: socks5.Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "ipv6", network: "tcp6", address: "[2001:db8::1]:443", want: socks5.Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 443}},
		{name: "ipv4-mapped goes as ipv4", network: "tcp4", address: "[::ffff:192.0.2.1]:80", want: socks5.Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "domain name", network: "tcp", address: "example.com:443", want: socks5.Addr{Name: "example.com", Port: 443}},
		{name: "domain name for tcp4", network: "tcp4", address: "example.com:443", want: socks5.Addr{Name: "example.com", Port: 443}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			requests := make(chan socks5.Request, 1)
			server := startServer(t, func(c net.Conn) {
				req, err := acceptNoAuth(c)
				if err != nil {
					return
				}
				requests <- req
				// A domain BND and the target's first bytes in one segment:
				// the dialer must stop reading at the end of the reply.
				b, _ := socks5.AppendReply(nil, socks5.Reply{Addr: socks5.Addr{Name: "bound.example", Port: 9}})
				c.Write(append(b, "banner"...))
				io.Copy(io.Discard, c)
			})
			c, err := SOCKS5{Server: server}.DialContext(t.Context(), tt.network, tt.address)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if req := <-requests; req != (socks5.Request{Command: socks5.CommandConnect, Addr: tt.want}) {
				t.Errorf("request = %+v, want CONNECT %v", req, tt.want)
			}
			got := make([]byte, len("banner"))
			c.SetReadDeadline(time.Now().Add(5 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != "banner" {
				t.Errorf("first bytes after the reply = %q, %v; want %q", got, err, "banner")
			}
		})
	}
}

// closeCounter is a Forward dialer that counts how often the conns it hands
// out are closed.
type closeCounter struct {
	closes atomic.Int32
}

func (cc *closeCounter) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := Direct{}.DialContext(ctx, network, address)
	if err != nil {
		return nil, err
	}
	return &countedConn{Conn: c, closes: &cc.closes}, nil
}

type countedConn struct {
	net.Conn
	closes *atomic.Int32
}

func (c *countedConn) Close() error {
	c.closes.Add(1)
	return c.Conn.Close()
}

// TestSOCKS5ServerMisbehaves runs the dialer against scripted servers that
// break the protocol, and checks the error and that the conn to the server
// was closed exactly once.
func TestSOCKS5ServerMisbehaves(t *testing.T) {
	noAuthThen := func(answer []byte) func(net.Conn) {
		return func(c net.Conn) {
			if _, err := acceptNoAuth(c); err != nil {
				return
			}
			c.Write(answer)
		}
	}
	greetThen := func(answer []byte) func(net.Conn) {
		return func(c net.Conn) {
			io.ReadFull(c, make([]byte, 3))
			c.Write(answer)
			io.Copy(io.Discard, c)
		}
	}
	tests := []struct {
		name    string
		server  func(net.Conn)
		wantErr error
		errText string
	}{
		{name: "no acceptable method", server: greetThen([]byte{0x05, 0xFF}), wantErr: socks5.ErrNoAcceptableMethods},
		{name: "method not offered", server: greetThen([]byte{0x05, 0x02}), errText: "server chose method 0x02, which was not offered"},
		{name: "socks4 server", server: greetThen([]byte{0x00, 0x5B}), errText: "method selection: version 0x00, want 0x05"},
		{name: "closes after greeting", server: func(c net.Conn) { io.ReadFull(c, make([]byte, 3)) }, wantErr: io.EOF, errText: "read method selection: EOF"},
		{name: "http server", server: noAuthThen([]byte("HTTP/1.1 400 Bad Request\r\n\r\n")), errText: "read reply: version 0x48, want 0x05"},
		{name: "closes mid reply", server: noAuthThen([]byte{0x05, 0x00, 0x00, 0x01, 127, 0}), wantErr: io.ErrUnexpectedEOF, errText: "read reply: unexpected EOF"},
		{name: "empty domain in reply", server: noAuthThen([]byte{0x05, 0x00, 0x00, 0x03, 0x00, 0, 0}), errText: "read reply: empty domain name"},
		{name: "host unreachable", server: noAuthThen([]byte{0x05, 0x04, 0x00, 0x01, 0, 0, 0, 0, 0, 0}), wantErr: syscall.EHOSTUNREACH, errText: "host unreachable (reply code 4)"},
		{name: "network unreachable", server: noAuthThen([]byte{0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0}), wantErr: syscall.ENETUNREACH, errText: "network unreachable (reply code 3)"},
		{name: "not allowed", server: noAuthThen([]byte{0x05, 0x02, 0x00, 0x01, 0, 0, 0, 0, 0, 0}), errText: "not allowed by ruleset (reply code 2)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var forward closeCounter
			server := startServer(t, tt.server)
			c, err := SOCKS5{Server: server, Forward: &forward}.DialContext(t.Context(), "tcp", "192.0.2.1:80")
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("err = %q, want it to contain %q", err, tt.errText)
			}
			if n := forward.closes.Load(); n != 1 {
				t.Errorf("conn to the server closed %d times, want once", n)
			}
		})
	}
}

// TestSOCKS5BadInput checks that requests the dialer cannot send fail
// before the server is dialed.
func TestSOCKS5BadInput(t *testing.T) {
	tests := []struct {
		name    string
		dialer  SOCKS5
		network string
		address string
		errText string
	}{
		{name: "udp", network: "udp", address: "192.0.2.1:53", errText: "unknown network udp"},
		{name: "missing port", network: "tcp", address: "192.0.2.1", errText: "missing port"},
		{name: "ipv6 for tcp4", network: "tcp4", address: "[2001:db8::1]:80", errText: "no suitable address"},
		{name: "ipv4 for tcp6", network: "tcp6", address: "192.0.2.1:80", errText: "no suitable address"},
		{name: "domain too long", network: "tcp", address: strings.Repeat("a", 256) + ":80", errText: "longer than 255"},
		{name: "password without username", dialer: SOCKS5{Password: "x"}, network: "tcp", address: "192.0.2.1:80", errText: "password set without a username"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := tt.dialer
			d.Server = "192.0.2.2:1080"
			d.Forward = failDialer{t}
			_, err := d.DialContext(t.Context(), tt.network, tt.address)
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("err = %v, want one containing %q", err, tt.errText)
			}
		})
	}
}

// failDialer fails the test if it is used.
type failDialer struct{ t *testing.T }

func (f failDialer) DialContext(context.Context, string, string) (net.Conn, error) {
	f.t.Error("the server was dialed")
	return nil, errors.New("failDialer")
}

// TestSOCKS5SilentServer checks that a server which accepts and never
// answers cannot hold a dial past HandshakeTimeout, the context's deadline
// or its cancellation, and that the conn to it is closed.
func TestSOCKS5SilentServer(t *testing.T) {
	tests := []struct {
		name      string
		timeout   time.Duration
		ctx       func(context.Context) (context.Context, context.CancelFunc)
		wantErr   error
		wantAfter time.Duration
	}{
		{
			name:    "handshake timeout",
			timeout: 300 * time.Millisecond,
			ctx: func(ctx context.Context) (context.Context, context.CancelFunc) {
				return ctx, func() {}
			},
			wantErr:   os.ErrDeadlineExceeded,
			wantAfter: 300 * time.Millisecond,
		},
		{
			name:    "context deadline",
			timeout: time.Minute,
			ctx: func(ctx context.Context) (context.Context, context.CancelFunc) {
				return context.WithTimeout(ctx, 300*time.Millisecond)
			},
			wantAfter: 300 * time.Millisecond,
		},
		{
			name:    "context cancelled",
			timeout: time.Minute,
			ctx: func(ctx context.Context) (context.Context, context.CancelFunc) {
				ctx, cancel := context.WithCancel(ctx)
				timer := time.AfterFunc(300*time.Millisecond, cancel)
				return ctx, func() { timer.Stop(); cancel() }
			},
			wantErr:   context.Canceled,
			wantAfter: 300 * time.Millisecond,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			closed := make(chan struct{})
			server := startServer(t, func(c net.Conn) {
				io.Copy(io.Discard, c)
				close(closed)
			})
			ctx, cancel := tt.ctx(t.Context())
			defer cancel()
			start := time.Now()
			c, err := SOCKS5{Server: server, HandshakeTimeout: tt.timeout}.DialContext(ctx, "tcp", "192.0.2.1:80")
			elapsed := time.Since(start)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded, want an error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
			}
			if ne, ok := errors.AsType[net.Error](err); tt.wantErr != context.Canceled && (!ok || !ne.Timeout()) {
				t.Errorf("err = %v, want a timeout", err)
			}
			if elapsed < tt.wantAfter-50*time.Millisecond || elapsed > 2*time.Second {
				t.Errorf("dial failed after %v, want about %v", elapsed, tt.wantAfter)
			}
			select {
			case <-closed:
			case <-time.After(5 * time.Second):
				t.Error("conn to the server still open after the dial failed")
			}
		})
	}
}

func TestSOCKS5String(t *testing.T) {
	tests := []struct {
		name   string
		dialer SOCKS5
		want   string
	}{
		{name: "no auth", dialer: SOCKS5{Server: "127.0.0.1:1080"}, want: "socks5://127.0.0.1:1080"},
		{name: "ipv6", dialer: SOCKS5{Server: "[::1]:1080"}, want: "socks5://[::1]:1080"},
		{name: "password hidden", dialer: SOCKS5{Server: "proxy.lan:1080", Username: "bob", Password: "hunter2"}, want: "socks5://bob@proxy.lan:1080"},
		{name: "username escaped", dialer: SOCKS5{Server: "proxy.lan:1080", Username: "a@b:c", Password: "hunter2"}, want: "socks5://a%40b%3Ac@proxy.lan:1080"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.dialer.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
			if got := tt.dialer.LogValue().String(); got != tt.want {
				t.Errorf("LogValue() = %q, want %q", got, tt.want)
			}
		})
	}
}
