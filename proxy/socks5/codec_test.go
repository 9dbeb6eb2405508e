package socks5

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
)

// checkErr fails t unless err matches: want (with errors.Is) when not nil,
// else text as a substring when not empty, else no error.
func checkErr(t *testing.T, err, want error, text string) {
	t.Helper()
	switch {
	case want != nil:
		if !errors.Is(err, want) {
			t.Fatalf("err = %v, want %v", err, want)
		}
	case text != "":
		if err == nil || !strings.Contains(err.Error(), text) {
			t.Fatalf("err = %v, want one containing %q", err, text)
		}
	case err != nil:
		t.Fatalf("unexpected error: %v", err)
	}
}

func TestGreeting(t *testing.T) {
	tests := []struct {
		name    string
		methods []byte
		want    []byte
		errText string
	}{
		{name: "no auth", methods: []byte{MethodNoAuth}, want: []byte{0x05, 1, 0x00}},
		{name: "no auth and user/pass", methods: []byte{MethodNoAuth, MethodUserPass}, want: []byte{0x05, 2, 0x00, 0x02}},
		{name: "none", methods: nil, errText: "0 authentication methods"},
		{name: "too many", methods: make([]byte, 256), errText: "256 authentication methods"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendGreeting(nil, tt.methods...)
			checkErr(t, err, nil, tt.errText)
			if tt.errText != "" {
				return
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("AppendGreeting = %x, want %x", got, tt.want)
			}
			methods, n, err := ParseGreeting(append(got, 0xEE))
			if err != nil || n != len(got) || !bytes.Equal(methods, tt.methods) {
				t.Fatalf("ParseGreeting = %x, %d, %v; want %x, %d", methods, n, err, tt.methods, len(got))
			}
		})
	}
}

func TestParseGreeting(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		wantErr error
		errText string
	}{
		{name: "empty", in: nil, wantErr: ErrTruncated},
		{name: "no count", in: []byte{0x05}, wantErr: ErrTruncated},
		{name: "methods short", in: []byte{0x05, 2, 0x00}, wantErr: ErrTruncated},
		{name: "socks4", in: []byte{0x04, 1, 0x00}, errText: "version 0x04"},
		{name: "zero methods", in: []byte{0x05, 0}, errText: "no authentication method"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ParseGreeting(tt.in)
			checkErr(t, err, tt.wantErr, tt.errText)
		})
	}
}

func TestMethodSelection(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    byte
		wantErr error
		errText string
	}{
		{name: "no auth", in: AppendMethodSelection(nil, MethodNoAuth), want: MethodNoAuth},
		{name: "user/pass", in: []byte{0x05, 0x02}, want: MethodUserPass},
		{name: "no acceptable", in: []byte{0x05, 0xFF}, want: MethodNoAcceptable, wantErr: ErrNoAcceptableMethods},
		{name: "empty", in: nil, wantErr: ErrTruncated},
		{name: "short", in: []byte{0x05}, wantErr: ErrTruncated},
		{name: "long", in: []byte{0x05, 0x00, 0x00}, errText: "3 bytes, want 2"},
		{name: "bad version", in: []byte{0x01, 0x00}, errText: "version 0x01, want 0x05"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseMethodSelection(tt.in)
			checkErr(t, err, tt.wantErr, tt.errText)
			if tt.errText == "" && got != tt.want {
				t.Fatalf("method = %#02x, want %#02x", got, tt.want)
			}
		})
	}
}

func TestUserPassRequest(t *testing.T) {
	long := strings.Repeat("u", 255)
	tests := []struct {
		name     string
		user     string
		password string
		want     []byte
		errText  string
	}{
		{name: "short", user: "bob", password: "pw", want: []byte{0x01, 3, 'b', 'o', 'b', 2, 'p', 'w'}},
		{name: "empty password", user: "bob", want: []byte{0x01, 3, 'b', 'o', 'b', 0}},
		{name: "255 bytes each", user: long, password: long, want: append(append(append([]byte{0x01, 255}, long...), 255), long...)},
		{name: "empty user", user: "", password: "pw", errText: "username of 0 bytes"},
		{name: "user too long", user: long + "u", errText: "username of 256 bytes"},
		{name: "password too long", user: "bob", password: long + "p", errText: "password of 256 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendUserPassRequest(nil, tt.user, tt.password)
			checkErr(t, err, nil, tt.errText)
			if tt.errText != "" {
				return
			}
			if !bytes.Equal(got, tt.want) {
				t.Fatalf("AppendUserPassRequest = %x, want %x", got, tt.want)
			}
			user, password, n, err := ParseUserPassRequest(got)
			if err != nil || user != tt.user || password != tt.password || n != len(got) {
				t.Fatalf("ParseUserPassRequest = %q, %q, %d, %v", user, password, n, err)
			}
			for i := range len(got) {
				if _, _, _, err := ParseUserPassRequest(got[:i]); !errors.Is(err, ErrTruncated) {
					t.Fatalf("ParseUserPassRequest of %d of %d bytes = %v, want ErrTruncated", i, len(got), err)
				}
			}
		})
	}
	t.Run("bad version", func(t *testing.T) {
		_, _, _, err := ParseUserPassRequest([]byte{0x05, 1, 'u', 0})
		checkErr(t, err, nil, "version 0x05, want 0x01")
	})
}

func TestUserPassResponse(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		wantErr error
		errText string
	}{
		{name: "success", in: AppendUserPassResponse(nil, 0x00)},
		{name: "failure", in: AppendUserPassResponse(nil, 0x01), wantErr: ErrAuthFailed},
		// microsocks sends its reply code for "not allowed" as the status.
		{name: "failure 2", in: []byte{0x01, 0x02}, wantErr: ErrAuthFailed},
		{name: "socks version", in: []byte{0x05, 0x00}, errText: "version 0x05, want 0x01"},
		{name: "short", in: []byte{0x01}, wantErr: ErrTruncated},
		{name: "long", in: []byte{0x01, 0x00, 0x00}, errText: "3 bytes, want 2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			checkErr(t, ParseUserPassResponse(tt.in), tt.wantErr, tt.errText)
		})
	}
}

func TestRequest(t *testing.T) {
	v4 := Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}
	v6 := Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 80}
	name := Addr{Name: "example.com", Port: 443}
	tests := []struct {
		name string
		cmd  Command
		dst  Addr
		want []byte
	}{
		{name: "connect ipv4", cmd: CommandConnect, dst: v4, want: []byte{0x05, 0x01, 0x00, 0x01, 192, 0, 2, 1, 0, 80}},
		{
			name: "connect ipv6", cmd: CommandConnect, dst: v6,
			want: []byte{0x05, 0x01, 0x00, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 80},
		},
		{name: "connect domain", cmd: CommandConnect, dst: name, want: append(append([]byte{0x05, 0x01, 0x00, 0x03, 11}, "example.com"...), 0x01, 0xBB)},
		// UDP ASSOCIATE sends the address the client will send from; all
		// zeros when it does not know (RFC 1928 §4).
		{name: "udp associate", cmd: CommandUDPAssociate, dst: AddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), 0)), want: []byte{0x05, 0x03, 0x00, 0x01, 0, 0, 0, 0, 0, 0}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendRequest(nil, tt.cmd, tt.dst)
			if err != nil || !bytes.Equal(got, tt.want) {
				t.Fatalf("AppendRequest = %x, %v; want %x", got, err, tt.want)
			}
			req, n, err := ParseRequest(got)
			if err != nil || n != len(got) || req != (Request{Command: tt.cmd, Addr: tt.dst}) {
				t.Fatalf("ParseRequest = %+v, %d, %v", req, n, err)
			}
		})
	}
	t.Run("unencodable address", func(t *testing.T) {
		got, err := AppendRequest([]byte{0xAA}, CommandConnect, Addr{Name: strings.Repeat("a", 256)})
		checkErr(t, err, nil, "longer than 255")
		if !bytes.Equal(got, []byte{0xAA}) {
			t.Errorf("AppendRequest failed but changed the slice to %x", got)
		}
	})
}

func TestReplyLen(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    int
		errText string
	}{
		{name: "empty", in: nil, want: 4},
		{name: "version only", in: []byte{0x05}, want: 4},
		{name: "no atyp", in: []byte{0x05, 0x00, 0x00}, want: 4},
		{name: "ipv4", in: []byte{0x05, 0x00, 0x00, 0x01}, want: 10},
		{name: "ipv6", in: []byte{0x05, 0x00, 0x00, 0x04}, want: 22},
		{name: "domain without length", in: []byte{0x05, 0x00, 0x00, 0x03}, want: 5},
		{name: "domain", in: []byte{0x05, 0x00, 0x00, 0x03, 9}, want: 16},
		{name: "longest domain", in: []byte{0x05, 0x00, 0x00, 0x03, 255}, want: 262},
		{name: "failure code", in: []byte{0x05, 0x05, 0x00, 0x01}, want: 10},
		{name: "full reply with data after", in: []byte{0x05, 0x00, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 'x'}, want: 10},
		{name: "bad version", in: []byte{0x04}, errText: "version 0x04"},
		{name: "bad rsv", in: []byte{0x05, 0x00, 0x01}, errText: "reserved octet is 0x01"},
		{name: "bad atyp", in: []byte{0x05, 0x00, 0x00, 0x05}, errText: "unknown address type 0x05"},
		{name: "empty domain", in: []byte{0x05, 0x00, 0x00, 0x03, 0}, errText: "empty domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ReplyLen(tt.in)
			checkErr(t, err, nil, tt.errText)
			if tt.errText == "" && got != tt.want {
				t.Fatalf("ReplyLen(%x) = %d, want %d", tt.in, got, tt.want)
			}
		})
	}
}

func TestParseReply(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want Reply
	}{
		{
			// What microsocks sends: it does not report the bound address.
			name: "ipv4 zero",
			in:   []byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0},
			want: Reply{Addr: AddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), 0))},
		},
		{
			name: "ipv4",
			in:   []byte{0x05, 0x00, 0x00, 0x01, 127, 0, 0, 1, 0x04, 0x38},
			want: Reply{Addr: AddrFromAddrPort(netip.MustParseAddrPort("127.0.0.1:1080"))},
		},
		{
			name: "ipv6",
			in:   []byte{0x05, 0x00, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x04, 0x38},
			want: Reply{Addr: AddrFromAddrPort(netip.MustParseAddrPort("[::1]:1080"))},
		},
		{
			name: "domain",
			in:   append(append([]byte{0x05, 0x00, 0x00, 0x03, 9}, "proxy.lan"...), 0x04, 0x38),
			want: Reply{Addr: Addr{Name: "proxy.lan", Port: 1080}},
		},
		{
			name: "refused",
			in:   []byte{0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0},
			want: Reply{Code: ReplyConnectionRefused, Addr: AddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), 0))},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// Data from the target may follow the reply in the same read.
			got, n, err := ParseReply(append(bytes.Clone(tt.in), "HTTP/1.1"...))
			if err != nil || n != len(tt.in) || got != tt.want {
				t.Fatalf("ParseReply = %+v, %d, %v; want %+v, %d", got, n, err, tt.want, len(tt.in))
			}
			enc, err := AppendReply(nil, got)
			if err != nil || !bytes.Equal(enc, tt.in) {
				t.Fatalf("AppendReply = %x, %v; want %x", enc, err, tt.in)
			}
			if need, err := ReplyLen(tt.in); err != nil || need != len(tt.in) {
				t.Fatalf("ReplyLen = %d, %v; want %d", need, err, len(tt.in))
			}
			for i := range len(tt.in) {
				if _, _, err := ParseReply(tt.in[:i]); !errors.Is(err, ErrTruncated) {
					t.Fatalf("ParseReply of %d of %d bytes = %v, want ErrTruncated", i, len(tt.in), err)
				}
			}
		})
	}
}

func TestParseReplyErrors(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		errText string
	}{
		{name: "socks4 reply", in: []byte{0x00, 0x5A, 0, 80, 127, 0, 0, 1}, errText: "version 0x00, want 0x05"},
		{name: "auth version", in: []byte{0x01, 0x00}, errText: "version 0x01, want 0x05"},
		{name: "bad rsv", in: []byte{0x05, 0x00, 0x02, 0x01, 0, 0, 0, 0, 0, 0}, errText: "reserved octet is 0x02"},
		{name: "bad atyp", in: []byte{0x05, 0x00, 0x00, 0x00, 0, 0, 0, 0, 0, 0}, errText: "unknown address type 0x00"},
		{name: "empty domain", in: []byte{0x05, 0x00, 0x00, 0x03, 0, 0, 80}, errText: "empty domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ParseReply(tt.in)
			checkErr(t, err, nil, tt.errText)
		})
	}
}

func TestReplyError(t *testing.T) {
	tests := []struct {
		code  byte
		text  string
		errno error
	}{
		{code: ReplyGeneralFailure, text: "general failure (reply code 1)"},
		{code: ReplyNotAllowed, text: "not allowed by ruleset (reply code 2)"},
		{code: ReplyNetworkUnreachable, text: "network unreachable (reply code 3)", errno: syscall.ENETUNREACH},
		{code: ReplyHostUnreachable, text: "host unreachable (reply code 4)", errno: syscall.EHOSTUNREACH},
		{code: ReplyConnectionRefused, text: "connection refused (reply code 5)", errno: syscall.ECONNREFUSED},
		{code: ReplyTTLExpired, text: "TTL expired (reply code 6)", errno: syscall.ETIMEDOUT},
		{code: ReplyCommandNotSupported, text: "command not supported (reply code 7)"},
		{code: ReplyAddressTypeNotSupported, text: "address type not supported (reply code 8)"},
		{code: 0x09, text: "unassigned reply code 0x09"},
		{code: 0xFF, text: "unassigned reply code 0xff"},
	}
	all := []error{syscall.ENETUNREACH, syscall.EHOSTUNREACH, syscall.ECONNREFUSED, syscall.ETIMEDOUT}
	for _, tt := range tests {
		t.Run(tt.text, func(t *testing.T) {
			err := Reply{Code: tt.code}.Err()
			if got := err.Error(); got != tt.text {
				t.Errorf("Error() = %q, want %q", got, tt.text)
			}
			if re, ok := errors.AsType[*ReplyError](err); !ok || re.Code != tt.code {
				t.Errorf("errors.AsType[*ReplyError] = %v, %v", re, ok)
			}
			for _, errno := range all {
				if got, want := errors.Is(err, errno), errno == tt.errno; got != want {
					t.Errorf("errors.Is(err, %v) = %v, want %v", errno, got, want)
				}
			}
		})
	}
	t.Run("success", func(t *testing.T) {
		if err := (Reply{Code: ReplySucceeded}).Err(); err != nil {
			t.Errorf("Err() = %v, want nil", err)
		}
	})
}
