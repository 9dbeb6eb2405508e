package socks5

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestUDPHeader(t *testing.T) {
	long := strings.Repeat("a", MaxDomainLen)
	tests := []struct {
		name string
		in   UDPHeader
		want []byte
	}{
		{
			name: "ipv4",
			in:   UDPHeader{Addr: Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 53}},
			want: []byte{0, 0, 0, 0x01, 192, 0, 2, 1, 0, 53},
		},
		{
			name: "ipv6",
			in:   UDPHeader{Addr: Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 443}},
			want: []byte{0, 0, 0, 0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0xBB},
		},
		{
			name: "domain",
			in:   UDPHeader{Addr: Addr{Name: "localhost", Port: 7}},
			want: append(append([]byte{0, 0, 0, 0x03, 9}, "localhost"...), 0, 7),
		},
		{
			name: "longest header",
			in:   UDPHeader{Addr: Addr{Name: long, Port: 1}},
			want: append(append([]byte{0, 0, 0, 0x03, 255}, long...), 0, 1),
		},
		{
			// Encoded so that tests can play a relay that fragments.
			name: "fragment",
			in:   UDPHeader{Frag: 0x81, Addr: Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 53}},
			want: []byte{0, 0, 0x81, 0x01, 192, 0, 2, 1, 0, 53},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := AppendUDPHeader([]byte{0xAA}, tt.in)
			if err != nil || got[0] != 0xAA || !bytes.Equal(got[1:], tt.want) {
				t.Fatalf("AppendUDPHeader = %x, %v; want aa%x", got, err, tt.want)
			}
			if len(tt.want) > MaxUDPHeaderLen {
				t.Fatalf("header of %d bytes, MaxUDPHeaderLen is %d", len(tt.want), MaxUDPHeaderLen)
			}
			// The data follows the header in the same datagram.
			dgram := append(bytes.Clone(tt.want), "payload"...)
			h, n, err := ParseUDPHeader(dgram)
			if err != nil || n != len(tt.want) || h != tt.in || string(dgram[n:]) != "payload" {
				t.Fatalf("ParseUDPHeader = %+v, %d, %v; want %+v, %d", h, n, err, tt.in, len(tt.want))
			}
			for i := range len(tt.want) {
				if _, _, err := ParseUDPHeader(tt.want[:i]); !errors.Is(err, ErrTruncated) {
					t.Fatalf("ParseUDPHeader of %d of %d bytes = %v, want ErrTruncated", i, len(tt.want), err)
				}
			}
		})
	}
	t.Run("unencodable address", func(t *testing.T) {
		got, err := AppendUDPHeader([]byte{0xAA}, UDPHeader{Addr: Addr{Name: long + "a"}})
		checkErr(t, err, nil, "longer than 255")
		if !bytes.Equal(got, []byte{0xAA}) {
			t.Errorf("AppendUDPHeader failed but changed the slice to %x", got)
		}
	})
}

func TestParseUDPHeaderErrors(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		wantErr error
		errText string
	}{
		{name: "empty", in: nil, wantErr: ErrTruncated},
		{name: "no address", in: []byte{0, 0, 0}, wantErr: ErrTruncated},
		{name: "ipv4 short", in: []byte{0, 0, 0, 0x01, 127, 0, 0, 1, 0}, wantErr: ErrTruncated},
		{name: "rsv nonzero", in: []byte{0, 1, 0, 0x01, 127, 0, 0, 1, 0, 53}, errText: "reserved field is 0x0001"},
		{name: "socks reply", in: []byte{0x05, 0x00, 0x00, 0x01, 127, 0, 0, 1, 0, 53}, errText: "reserved field is 0x0500"},
		{name: "unknown atyp", in: []byte{0, 0, 0, 0x02, 127, 0, 0, 1, 0, 53}, errText: "unknown address type 0x02"},
		{name: "empty domain", in: []byte{0, 0, 0, 0x03, 0, 0, 53}, errText: "empty domain"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := ParseUDPHeader(tt.in)
			checkErr(t, err, tt.wantErr, tt.errText)
		})
	}
}

func TestCommandString(t *testing.T) {
	for cmd, want := range map[Command]string{
		CommandConnect:      "CONNECT",
		CommandBind:         "BIND",
		CommandUDPAssociate: "UDP ASSOCIATE",
		0x09:                "command 0x09",
	} {
		if got := cmd.String(); got != want {
			t.Errorf("Command(%d).String() = %q, want %q", byte(cmd), got, want)
		}
	}
}
