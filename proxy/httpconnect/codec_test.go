package httpconnect

import (
	"bytes"
	"errors"
	"strings"
	"syscall"
	"testing"
)

func TestAppendRequest(t *testing.T) {
	tests := []struct {
		name     string
		target   string
		user     string
		password string
		want     string
	}{
		{name: "ipv4", target: "192.0.2.1:443", want: "CONNECT 192.0.2.1:443 HTTP/1.1\r\nHost: 192.0.2.1:443\r\n\r\n"},
		{name: "ipv6", target: "[2001:db8::1]:443", want: "CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n"},
		{name: "name", target: "example.com:80", want: "CONNECT example.com:80 HTTP/1.1\r\nHost: example.com:80\r\n\r\n"},
		{
			// The example of RFC 7617 §2.
			name: "basic auth", target: "example.com:443", user: "Aladdin", password: "open sesame",
			want: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n\r\n",
		},
		{
			name: "empty password", target: "example.com:443", user: "bob",
			want: "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nProxy-Authorization: Basic Ym9iOg==\r\n\r\n",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendRequest([]byte("x"), tt.target, tt.user, tt.password)
			if err != nil || string(got) != "x"+tt.want {
				t.Fatalf("AppendRequest = %q, %v; want %q", got, err, "x"+tt.want)
			}
		})
	}
}

func TestAppendRequestErrors(t *testing.T) {
	tests := []struct {
		name     string
		target   string
		user     string
		password string
		errText  string
	}{
		{name: "header injection", target: "a.example:80\r\nX-Evil: 1", errText: `"a.example:80\r\nX-Evil: 1": too many colons`},
		{name: "crlf in host", target: "a\r\nX-Evil:80", errText: `'\r' in host name`},
		{name: "space in host", target: "a b:80", errText: `' ' in host name`},
		{name: "slash in host", target: "a/b:80", errText: `'/' in host name`},
		{name: "missing port", target: "example.com", errText: "missing port"},
		{name: "port out of range", target: "example.com:65536", errText: "invalid port"},
		{name: "signed port", target: "example.com:+80", errText: "invalid port"},
		{name: "empty host", target: ":80", errText: "host of 0 bytes"},
		{name: "long host", target: strings.Repeat("a", 256) + ":80", errText: "host of 256 bytes"},
		{name: "zoned ipv6", target: "[fe80::1%eth0]:80", errText: "zoned"},
		{name: "colon in username", target: "example.com:80", user: "a:b", errText: `username holds a ":"`},
		{name: "newline in password", target: "example.com:80", user: "bob", password: "a\nb", errText: "control character"},
		{name: "tab in username", target: "example.com:80", user: "a\tb", errText: "control character"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendRequest([]byte("x"), tt.target, tt.user, tt.password)
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("AppendRequest = %q, %v; want an error containing %q", got, err, tt.errText)
			}
			if string(got) != "x" {
				t.Fatalf("AppendRequest failed but changed the slice to %q", got)
			}
		})
	}
}

func TestParseResponseHead(t *testing.T) {
	tests := []struct {
		name string
		head string
		want Response
	}{
		{
			// What tinyproxy 1.11.1 sends.
			name: "tinyproxy",
			head: "HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\n",
			want: Response{Proto: "HTTP/1.0", StatusCode: 200, Reason: "Connection established"},
		},
		{name: "no headers", head: "HTTP/1.1 200 OK\r\n\r\n", want: Response{Proto: "HTTP/1.1", StatusCode: 200, Reason: "OK"}},
		{name: "bare LF", head: "HTTP/1.1 200 OK\nVia: x\n\n", want: Response{Proto: "HTTP/1.1", StatusCode: 200, Reason: "OK"}},
		{name: "no reason", head: "HTTP/1.1 200\r\n\r\n", want: Response{Proto: "HTTP/1.1", StatusCode: 200}},
		{name: "empty reason", head: "HTTP/1.1 204 \r\n\r\n", want: Response{Proto: "HTTP/1.1", StatusCode: 204}},
		{name: "reason with spaces", head: "HTTP/1.1 502 Bad  Gateway \r\n\r\n", want: Response{Proto: "HTTP/1.1", StatusCode: 502, Reason: "Bad  Gateway "}},
		{
			name: "407 with scheme",
			head: "HTTP/1.0 407 Proxy Authentication Required\r\nServer: x\r\nproxy-authenticate:  Basic realm=\"Tinyproxy\"\r\nProxy-Authenticate: Digest\r\n\r\n",
			want: Response{Proto: "HTTP/1.0", StatusCode: 407, Reason: "Proxy Authentication Required", ProxyAuthenticate: `Basic realm="Tinyproxy"`},
		},
		{
			name: "malformed header lines ignored",
			head: "HTTP/1.1 200 OK\r\nno colon here\r\n folded\r\n\r\n",
			want: Response{Proto: "HTTP/1.1", StatusCode: 200, Reason: "OK"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The first bytes of the tunnel may come in the same segment.
			got, n, err := ParseResponseHead([]byte(tt.head + "banner\r\n\r\n"))
			if err != nil || n != len(tt.head) || got != tt.want {
				t.Fatalf("ParseResponseHead = %+v, %d, %v; want %+v, %d", got, n, err, tt.want, len(tt.head))
			}
			for i := range len(tt.head) {
				if _, _, err := ParseResponseHead([]byte(tt.head[:i])); !errors.Is(err, ErrTruncated) {
					t.Fatalf("ParseResponseHead of %d of %d bytes = %v, want ErrTruncated", i, len(tt.head), err)
				}
			}
		})
	}
}

func TestParseResponseHeadErrors(t *testing.T) {
	long := "HTTP/1.1 200 OK\r\nX: " + strings.Repeat("a", MaxHeadLen)
	tests := []struct {
		name    string
		in      string
		wantErr error
		errText string
	}{
		{name: "socks5 method selection", in: "\x05\xff", errText: `response starts "\x05\xff", want "HTTP/"`},
		{name: "html", in: "<html>", errText: `response starts "<html"`},
		{name: "empty first line", in: "\r\nHTTP/1.1 200 OK\r\n\r\n", errText: `response starts "\r\nHTT"`},
		{name: "no version", in: "HTTP/ 200 OK\r\n\r\n", errText: "malformed status line"},
		{name: "http/1.10", in: "HTTP/1.10 200 OK\r\n\r\n", errText: "malformed status line"},
		{name: "two-digit code", in: "HTTP/1.1 20 OK\r\n\r\n", errText: "malformed status code"},
		{name: "code 600", in: "HTTP/1.1 600 Odd\r\n\r\n", errText: "malformed status code"},
		{name: "code 099", in: "HTTP/1.1 099 Odd\r\n\r\n", errText: "malformed status code"},
		{name: "letters in code", in: "HTTP/1.1 2x0 OK\r\n\r\n", errText: "malformed status code"},
		{name: "control character", in: "HTTP/1.1 200 O\x1bK\r\n\r\n", errText: "control character"},
		{name: "lone CR ends nothing", in: "HTTP/1.1 200 OK\r\r", wantErr: ErrTruncated},
		{name: "too long", in: long, wantErr: ErrHeadTooLong},
		{name: "too long without newline", in: "HTTP/1.1 200 " + strings.Repeat("a", MaxHeadLen), wantErr: ErrHeadTooLong},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, n, err := ParseResponseHead([]byte(tt.in))
			switch {
			case tt.wantErr != nil && !errors.Is(err, tt.wantErr):
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			case tt.errText != "" && (err == nil || !strings.Contains(err.Error(), tt.errText)):
				t.Fatalf("err = %v, want one containing %q", err, tt.errText)
			case n != 0:
				t.Fatalf("failed with n = %d", n)
			}
		})
	}
	t.Run("longest head", func(t *testing.T) {
		head := "HTTP/1.1 200 OK\r\nX: "
		head += strings.Repeat("a", MaxHeadLen-len(head)-4) + "\r\n\r\n"
		if _, n, err := ParseResponseHead([]byte(head + "more")); err != nil || n != MaxHeadLen {
			t.Fatalf("head of MaxHeadLen bytes: n = %d, err = %v", n, err)
		}
	})
}

func TestStatusError(t *testing.T) {
	tests := []struct {
		name    string
		resp    Response
		text    string
		refused bool
	}{
		{name: "bad gateway", resp: Response{StatusCode: 502, Reason: "Bad Gateway"}, text: "proxy answered 502 Bad Gateway", refused: true},
		{name: "unavailable", resp: Response{StatusCode: 503, Reason: "Service Unavailable"}, text: "proxy answered 503 Service Unavailable", refused: true},
		{name: "gateway timeout", resp: Response{StatusCode: 504}, text: "proxy answered 504", refused: true},
		{name: "tinyproxy refused", resp: Response{StatusCode: 500, Reason: "Unable to connect"}, text: "proxy answered 500 Unable to connect", refused: true},
		{name: "refused in reason", resp: Response{StatusCode: 500, Reason: "Connection Refused"}, text: "proxy answered 500 Connection Refused", refused: true},
		{name: "forbidden", resp: Response{StatusCode: 403, Reason: "Forbidden"}, text: "proxy answered 403 Forbidden"},
		{name: "internal error", resp: Response{StatusCode: 500, Reason: "Internal Server Error"}, text: "proxy answered 500 Internal Server Error"},
		{name: "continue", resp: Response{StatusCode: 100, Reason: "Continue"}, text: "proxy answered 100 Continue"},
		{name: "redirect", resp: Response{StatusCode: 301}, text: "proxy answered 301"},
		{
			name: "auth required", resp: Response{StatusCode: 407, Reason: "Proxy Authentication Required", ProxyAuthenticate: "Digest realm=x"},
			text: "proxy authentication required (407 Proxy Authentication Required; proxy asks for Digest realm=x)",
		},
		{name: "auth required without scheme", resp: Response{StatusCode: 407}, text: "proxy authentication required (407)"},
		{name: "credentials rejected", resp: Response{StatusCode: 401, Reason: "Unauthorized"}, text: "proxy refused the credentials (401 Unauthorized)"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.resp.Err()
			if err == nil || err.Error() != tt.text {
				t.Fatalf("Err() = %v, want %q", err, tt.text)
			}
			if got := errors.Is(err, syscall.ECONNREFUSED); got != tt.refused {
				t.Errorf("errors.Is(err, ECONNREFUSED) = %v, want %v", got, tt.refused)
			}
		})
	}
	for _, code := range []int{200, 204, 299} {
		if err := (Response{StatusCode: code}).Err(); err != nil {
			t.Errorf("Err() for %d = %v, want nil", code, err)
		}
	}
}

func TestRequestParsesAsHTTP(t *testing.T) {
	// The request is itself a head that ParseResponseHead could scan for
	// its end; check that the shapes agree on CRLF framing.
	req, err := AppendRequest(nil, "example.com:443", "bob", "pw")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasSuffix(req, []byte("\r\n\r\n")) || bytes.Count(req, []byte("\r\n\r\n")) != 1 {
		t.Fatalf("request %q does not end at its only blank line", req)
	}
}
