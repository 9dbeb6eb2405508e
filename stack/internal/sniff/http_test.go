package sniff

import (
	"context"
	"crypto/tls"
	"errors"
	"os/exec"
	"testing"
)

// TestHTTPCurl sniffs the Host header of real curl requests.
func TestHTTPCurl(t *testing.T) {
	for _, tc := range []struct {
		name    string
		network string
		args    func(port string) []string
		want    string
		errIs   error
	}{
		{name: "name-with-port", network: "tcp4", want: "x.test", args: func(port string) []string {
			return []string{"--resolve", "x.test:" + port + ":127.0.0.1", "http://x.test:" + port + "/"}
		}},
		{name: "host-header-set", network: "tcp4", want: "other.test", args: func(port string) []string {
			return []string{"-H", "Host: Other.Test", "http://127.0.0.1:" + port + "/"}
		}},
		{name: "post-with-body", network: "tcp4", want: "x.test", args: func(port string) []string {
			return []string{"--resolve", "x.test:" + port + ":127.0.0.1", "-d", "a=b", "http://x.test:" + port + "/form"}
		}},
		{name: "ipv4-literal", network: "tcp4", errIs: ErrNoName, args: func(port string) []string {
			return []string{"http://127.0.0.1:" + port + "/"}
		}},
		{name: "ipv6-literal", network: "tcp6", errIs: ErrNoName, args: func(port string) []string {
			return []string{"http://[::1]:" + port + "/"}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := captureFromCommand(t, tc.network, HTTP, func(ctx context.Context, port string) *exec.Cmd {
				return exec.CommandContext(ctx, "curl", append([]string{"-s", "--max-time", "10"}, tc.args(port)...)...)
			})
			if tc.errIs != nil {
				if !errors.Is(a.err, tc.errIs) {
					t.Fatalf("HTTP = %q, %v; want %v\nrequest: %q", a.name, a.err, tc.errIs, a.all())
				}
				return
			}
			if a.err != nil || a.name != tc.want {
				t.Fatalf("HTTP = %q, %v; want %q\nrequest: %q", a.name, a.err, tc.want, a.all())
			}
			checkPrefixes(t, HTTP, a.all(), tc.want)
		})
	}
}

// TestHTTPEdges covers request heads no test client here sends.
func TestHTTPEdges(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
		err            error
	}{
		{name: "empty", in: "", err: ErrMore},
		{name: "method-prefix", in: "PA", err: ErrMore},
		{name: "method-no-space", in: "GET", err: ErrMore},
		{name: "unknown-method", in: "FETCH / HTTP/1.1\r\n", err: ErrNotThis},
		{name: "lower-case-method", in: "get / HTTP/1.1\r\n", err: ErrNotThis},
		{name: "tls", in: "\x16\x03\x01", err: ErrNotThis},
		{name: "http2-preface", in: "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", err: ErrNotThis},
		{name: "http09", in: "GET /\r\n", err: ErrNotThis},
		{name: "http2-version", in: "GET / HTTP/2.0\r\nHost: a.test\r\n\r\n", err: ErrNotThis},
		{name: "request-line-unfinished", in: "GET / HTTP/1.1", err: ErrMore},
		{name: "host-line-unfinished", in: "GET / HTTP/1.1\r\nHost: a.te", err: ErrMore},
		{name: "host", in: "GET / HTTP/1.1\r\nHost: a.test\r\n", want: "a.test"},
		{name: "host-bare-lf", in: "GET / HTTP/1.1\nhost: a.test\n", want: "a.test"},
		{name: "host-after-others", in: "GET / HTTP/1.0\r\nUser-Agent: x\r\nAccept: */*\r\nHOST:\tA.Test:8080 \r\n", want: "a.test"},
		{name: "host-trailing-dot", in: "GET / HTTP/1.1\r\nHost: a.test.\r\n", want: "a.test"},
		{name: "absolute-form-target", in: "GET http://b.test/ HTTP/1.1\r\nHost: a.test\r\n", want: "a.test"},
		{name: "connect", in: "CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n", want: "a.test"},
		{name: "ipv6-literal", in: "GET / HTTP/1.1\r\nHost: [2001:db8::1]:80\r\n", err: ErrNoName},
		{name: "ipv6-literal-no-port", in: "GET / HTTP/1.1\r\nHost: [::1]\r\n", err: ErrNoName},
		{name: "ipv6-unclosed", in: "GET / HTTP/1.1\r\nHost: [::1\r\n", err: ErrNoName},
		{name: "ipv4-literal", in: "GET / HTTP/1.1\r\nHost: 192.0.2.1\r\n", err: ErrNoName},
		{name: "empty-host", in: "GET / HTTP/1.1\r\nHost: \r\n", err: ErrNoName},
		{name: "port-only", in: "GET / HTTP/1.1\r\nHost: :80\r\n", err: ErrNoName},
		{name: "bad-port", in: "GET / HTTP/1.1\r\nHost: a.test:8x\r\n", err: ErrNoName},
		{name: "bad-char", in: "GET / HTTP/1.1\r\nHost: a b.test\r\n", err: ErrNoName},
		{name: "label-too-long", in: "GET / HTTP/1.1\r\nHost: " + string(make64('a')) + ".test\r\n", err: ErrNoName},
		{name: "no-host", in: "GET / HTTP/1.0\r\nAccept: */*\r\n\r\n", err: ErrNoName},
		{name: "obs-fold", in: "GET / HTTP/1.1\r\nX: a\r\n b\r\nHost: a.test\r\n", err: ErrNotThis},
		{name: "space-before-colon", in: "GET / HTTP/1.1\r\nHost : a.test\r\n", err: ErrNotThis},
		{name: "head-too-large", in: "GET / HTTP/1.1\r\nX: " + string(make([]byte, MaxHeader)), err: ErrNotThis},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name, err := HTTP([]byte(tc.in))
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("HTTP = %q, %v; want %v", name, err, tc.err)
				}
				return
			}
			if err != nil || name != tc.want {
				t.Fatalf("HTTP = %q, %v; want %q", name, err, tc.want)
			}
			checkPrefixes(t, HTTP, []byte(tc.in), tc.want)
		})
	}
}

// make64 returns a 64-byte label, one more than DNS allows.
func make64(c byte) []byte {
	b := make([]byte, 64)
	for i := range b {
		b[i] = c
	}
	return b
}

// TestStream checks that Stream picks TLS or HTTP by the first byte, on a
// real hello and a request head.
func TestStream(t *testing.T) {
	hello := goTLSHello(t, &tls.Config{ServerName: "s.test"}, 4096, TLS).all()
	for _, tc := range []struct {
		name  string
		in    []byte
		want  string
		proto Proto
		err   error
	}{
		{name: "empty", in: nil, proto: ProtoNone, err: ErrMore},
		{name: "tls", in: hello, want: "s.test", proto: ProtoTLS},
		{name: "tls-prefix", in: hello[:100], proto: ProtoTLS, err: ErrMore},
		{name: "http", in: []byte("HEAD / HTTP/1.1\r\nHost: h.test\r\n\r\n"), want: "h.test", proto: ProtoHTTP},
		{name: "ssh", in: []byte("SSH-2.0-OpenSSH_9.2\r\n"), proto: ProtoHTTP, err: ErrNotThis},
	} {
		t.Run(tc.name, func(t *testing.T) {
			name, p, err := Stream(tc.in)
			if p != tc.proto || name != tc.want || !errors.Is(err, tc.err) {
				t.Fatalf("Stream = %q, %v, %v; want %q, %v, %v", name, p, err, tc.want, tc.proto, tc.err)
			}
		})
	}
}
