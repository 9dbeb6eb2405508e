package socks4

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

func TestRequest(t *testing.T) {
	long := strings.Repeat("a", 255)
	tests := []struct {
		name string
		in   Request
		want []byte
	}{
		{
			name: "connect ipv4",
			in:   Request{Command: CommandConnect, IP: netip.MustParseAddr("192.0.2.1"), Port: 80},
			want: []byte{0x04, 0x01, 0, 80, 192, 0, 2, 1, 0},
		},
		{
			name: "user id",
			in:   Request{Command: CommandConnect, IP: netip.MustParseAddr("127.0.0.1"), Port: 0x1F90, UserID: "bob"},
			want: []byte{0x04, 0x01, 0x1F, 0x90, 127, 0, 0, 1, 'b', 'o', 'b', 0},
		},
		{
			name: "socks4a name",
			in:   Request{Command: CommandConnect, Name: "localhost", Port: 443, UserID: "bob"},
			want: append([]byte{0x04, 0x01, 0x01, 0xBB, 0, 0, 0, 1, 'b', 'o', 'b', 0}, "localhost\x00"...),
		},
		{
			name: "socks4a longest",
			in:   Request{Command: CommandConnect, Name: long, Port: 1, UserID: long},
			want: append(append(append(append([]byte{0x04, 0x01, 0, 1, 0, 0, 0, 1}, long...), 0), long...), 0),
		},
		{
			name: "bind",
			in:   Request{Command: CommandBind, IP: netip.MustParseAddr("192.0.2.1"), Port: 21},
			want: []byte{0x04, 0x02, 0, 21, 192, 0, 2, 1, 0},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendRequest([]byte{0xAA}, tt.in)
			if err != nil || got[0] != 0xAA || !bytes.Equal(got[1:], tt.want) {
				t.Fatalf("AppendRequest = %x, %v; want aa%x", got, err, tt.want)
			}
			req, n, err := ParseRequest(append(bytes.Clone(tt.want), "data"...))
			if err != nil || n != len(tt.want) || req != tt.in {
				t.Fatalf("ParseRequest = %+v, %d, %v; want %+v, %d", req, n, err, tt.in, len(tt.want))
			}
			for i := range len(tt.want) {
				if _, _, err := ParseRequest(tt.want[:i]); !errors.Is(err, ErrTruncated) {
					t.Fatalf("ParseRequest of %d of %d bytes = %v, want ErrTruncated", i, len(tt.want), err)
				}
			}
		})
	}
}

func TestAppendRequestErrors(t *testing.T) {
	long := strings.Repeat("a", 256)
	tests := []struct {
		name    string
		in      Request
		errText string
	}{
		{name: "ipv6", in: Request{IP: netip.MustParseAddr("2001:db8::1"), Port: 80}, errText: "only IPv4 addresses, not 2001:db8::1"},
		{name: "ipv4-mapped", in: Request{IP: netip.MustParseAddr("::ffff:192.0.2.1"), Port: 80}, errText: "only IPv4"},
		{name: "no address", in: Request{Port: 80}, errText: "only IPv4"},
		{name: "socks4a marker", in: Request{IP: netip.MustParseAddr("0.0.0.7"), Port: 80}, errText: "0.0.0.7 means a SOCKS4A name follows"},
		{name: "user id too long", in: Request{IP: netip.MustParseAddr("192.0.2.1"), UserID: long}, errText: "user ID of 256 bytes"},
		{name: "nul in user id", in: Request{IP: netip.MustParseAddr("192.0.2.1"), UserID: "a\x00b"}, errText: "user ID holds a NUL"},
		{name: "name too long", in: Request{Name: long}, errText: "name of 256 bytes"},
		{name: "nul in name", in: Request{Name: "a\x00b"}, errText: "name holds a NUL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendRequest([]byte{0xAA}, tt.in)
			checkErr(t, err, nil, tt.errText)
			if !bytes.Equal(got, []byte{0xAA}) {
				t.Fatalf("AppendRequest failed but changed the slice to %x", got)
			}
		})
	}
}

func TestParseRequestErrors(t *testing.T) {
	long := strings.Repeat("a", 256)
	tests := []struct {
		name    string
		in      []byte
		errText string
	}{
		{name: "socks5 greeting", in: []byte{0x05, 0x01, 0x00, 0, 0, 0, 0, 0, 0}, errText: "version 0x05, want 0x04"},
		{name: "user id too long", in: append([]byte{0x04, 0x01, 0, 80, 1, 2, 3, 4}, long...), errText: "user ID: longer than 255"},
		{name: "name too long", in: append([]byte{0x04, 0x01, 0, 80, 0, 0, 0, 1, 0}, long...), errText: "name: longer than 255"},
		{name: "empty name", in: []byte{0x04, 0x01, 0, 80, 0, 0, 0, 1, 0, 0}, errText: "empty name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ParseRequest(tt.in)
			checkErr(t, err, nil, tt.errText)
		})
	}
}

func TestParseReply(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    Reply
		wantErr error
		errText string
	}{
		{name: "granted", in: []byte{0x00, 90, 0, 0, 0, 0, 0, 0}, want: Reply{Code: ReplyGranted, IP: netip.IPv4Unspecified()}},
		// What dante sends: the address it connected from.
		{name: "granted with address", in: []byte{0x00, 90, 0x8D, 0x47, 127, 0, 0, 1}, want: Reply{Code: ReplyGranted, Port: 0x8D47, IP: netip.MustParseAddr("127.0.0.1")}},
		{name: "version 4 accepted", in: []byte{0x04, 90, 0, 0, 0, 0, 0, 0}, want: Reply{Code: ReplyGranted, IP: netip.IPv4Unspecified()}},
		{name: "rejected", in: []byte{0x00, 91, 0, 0, 0, 0, 0, 0}, want: Reply{Code: ReplyRejected, IP: netip.IPv4Unspecified()}},
		{name: "short", in: []byte{0x00, 90, 0, 0}, wantErr: ErrTruncated},
		{name: "long", in: []byte{0x00, 90, 0, 0, 0, 0, 0, 0, 'x'}, errText: "message of 9 bytes, want 8"},
		{name: "socks5 reply", in: []byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0}, errText: "reply version 0x05, want 0x00"},
		{name: "http", in: []byte("HTTP/1.1"), errText: "reply version 0x48"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseReply(tt.in)
			checkErr(t, err, tt.wantErr, tt.errText)
			if err != nil {
				return
			}
			if got != tt.want {
				t.Fatalf("ParseReply = %+v, want %+v", got, tt.want)
			}
			if enc := AppendReply(nil, got); !bytes.Equal(enc[1:], tt.in[1:]) || enc[0] != 0 {
				t.Fatalf("AppendReply = %x, want 00%x", enc, tt.in[1:])
			}
		})
	}
}

func TestReplyError(t *testing.T) {
	tests := []struct {
		code    byte
		text    string
		refused bool
	}{
		{code: ReplyRejected, text: "request rejected or failed (reply code 91)", refused: true},
		{code: ReplyIdentUnreachable, text: "rejected: the server cannot reach identd on the client (reply code 92)"},
		{code: ReplyIdentMismatch, text: "rejected: identd on the client reports a different user ID (reply code 93)"},
		{code: 0, text: "unknown reply code 0"},
		{code: 94, text: "unknown reply code 94"},
	}
	for _, tt := range tests {
		t.Run(tt.text, func(t *testing.T) {
			err := Reply{Code: tt.code}.Err()
			if got := err.Error(); got != tt.text {
				t.Errorf("Error() = %q, want %q", got, tt.text)
			}
			if re, ok := errors.AsType[*ReplyError](err); !ok || re.Code != tt.code {
				t.Errorf("errors.AsType[*ReplyError] = %v, %v", re, ok)
			}
			if got := errors.Is(err, syscall.ECONNREFUSED); got != tt.refused {
				t.Errorf("errors.Is(err, ECONNREFUSED) = %v, want %v", got, tt.refused)
			}
		})
	}
	if err := (Reply{Code: ReplyGranted}).Err(); err != nil {
		t.Errorf("Err() of a granted reply = %v, want nil", err)
	}
}
