package socks5

import (
	"bytes"
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestParseAddr(t *testing.T) {
	long := strings.Repeat("a", MaxDomainLen)
	tests := []struct {
		name    string
		in      string
		want    Addr
		wantErr string
	}{
		{name: "ipv4", in: "192.0.2.1:80", want: Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "ipv6", in: "[2001:db8::1]:443", want: Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 443}},
		{name: "ipv4-mapped becomes ipv4", in: "[::ffff:192.0.2.1]:80", want: Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 80}},
		{name: "domain", in: "example.com:8080", want: Addr{Name: "example.com", Port: 8080}},
		{name: "domain of 255 bytes", in: long + ":1", want: Addr{Name: long, Port: 1}},
		{name: "port 0", in: "example.com:0", want: Addr{Name: "example.com"}},
		{name: "port 65535", in: "example.com:65535", want: Addr{Name: "example.com", Port: 65535}},
		{name: "domain of 256 bytes", in: long + "a:1", wantErr: "longer than 255"},
		{name: "missing port", in: "example.com", wantErr: "missing port"},
		{name: "empty host", in: ":80", wantErr: "missing host"},
		{name: "port out of range", in: "example.com:65536", wantErr: "invalid port"},
		{name: "named port", in: "example.com:http", wantErr: "invalid port"},
		{name: "zoned ipv6", in: "[fe80::1%eth0]:80", wantErr: "zoned"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseAddr(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseAddr(%q) = %v, %v; want error containing %q", tt.in, got, err, tt.wantErr)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("ParseAddr(%q) = %#v, %v; want %#v", tt.in, got, err, tt.want)
			}
		})
	}
}

func TestAddrString(t *testing.T) {
	tests := []struct {
		name string
		in   Addr
		want string
	}{
		{name: "ipv4", in: AddrFromAddrPort(netip.MustParseAddrPort("192.0.2.1:80")), want: "192.0.2.1:80"},
		{name: "ipv6", in: AddrFromAddrPort(netip.MustParseAddrPort("[2001:db8::1]:443")), want: "[2001:db8::1]:443"},
		{name: "domain", in: Addr{Name: "example.com", Port: 8080}, want: "example.com:8080"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.in.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
			back, err := ParseAddr(tt.in.String())
			if err != nil || back != tt.in {
				t.Errorf("ParseAddr(String()) = %#v, %v; want %#v", back, err, tt.in)
			}
		})
	}
}

func TestAddrPort(t *testing.T) {
	ap := netip.MustParseAddrPort("192.0.2.1:80")
	if got, ok := AddrFromAddrPort(ap).AddrPort(); !ok || got != ap {
		t.Errorf("AddrPort() = %v, %v; want %v, true", got, ok, ap)
	}
	if _, ok := (Addr{Name: "example.com", Port: 80}).AddrPort(); ok {
		t.Error("AddrPort() of a name reports ok")
	}
}

func TestAppendAddr(t *testing.T) {
	tests := []struct {
		name    string
		in      Addr
		want    []byte
		wantErr string
	}{
		{
			name: "ipv4",
			in:   Addr{IP: netip.MustParseAddr("192.0.2.1"), Port: 0x1F90},
			want: []byte{0x01, 192, 0, 2, 1, 0x1F, 0x90},
		},
		{
			name: "ipv6",
			in:   Addr{IP: netip.MustParseAddr("2001:db8::1"), Port: 443},
			want: []byte{0x04, 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x01, 0xBB},
		},
		{
			// Kept as IPv6 so that a decoded address re-encodes unchanged.
			name: "ipv4-mapped stays ipv6",
			in:   Addr{IP: netip.MustParseAddr("::ffff:192.0.2.1"), Port: 80},
			want: []byte{0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1, 0, 80},
		},
		{
			name: "domain",
			in:   Addr{Name: "a.example", Port: 80},
			want: append(append([]byte{0x03, 9}, "a.example"...), 0, 80),
		},
		{name: "domain of 256 bytes", in: Addr{Name: strings.Repeat("a", 256), Port: 80}, wantErr: "longer than 255"},
		{name: "zoned ipv6", in: Addr{IP: netip.MustParseAddr("fe80::1%eth0"), Port: 80}, wantErr: "zoned"},
		{name: "zero value", in: Addr{}, wantErr: "neither"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			prefix := []byte{0xAA}
			got, err := AppendAddr(prefix, tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("AppendAddr = %x, %v; want error containing %q", got, err, tt.wantErr)
				}
				if !bytes.Equal(got, prefix) {
					t.Fatalf("AppendAddr failed but changed the slice to %x", got)
				}
				return
			}
			if err != nil || !bytes.Equal(got[1:], tt.want) || got[0] != 0xAA {
				t.Fatalf("AppendAddr = %x, %v; want aa%x", got, err, tt.want)
			}
			dec, n, err := DecodeAddr(got[1:])
			if err != nil || n != len(tt.want) || dec != tt.in {
				t.Fatalf("DecodeAddr = %#v, %d, %v; want %#v, %d", dec, n, err, tt.in, len(tt.want))
			}
		})
	}
}

func TestDecodeAddr(t *testing.T) {
	tests := []struct {
		name    string
		in      []byte
		want    Addr
		wantN   int
		wantErr error
		errText string
	}{
		{name: "ipv4 with trailing data", in: []byte{0x01, 10, 0, 0, 1, 0, 53, 0xEE}, want: Addr{IP: netip.MustParseAddr("10.0.0.1"), Port: 53}, wantN: 7},
		{name: "domain of one byte", in: []byte{0x03, 1, 'x', 0xFF, 0xFF}, want: Addr{Name: "x", Port: 65535}, wantN: 5},
		{name: "empty", in: nil, wantErr: ErrTruncated},
		{name: "ipv4 short", in: []byte{0x01, 10, 0, 0, 1, 0}, wantErr: ErrTruncated},
		{name: "ipv6 short", in: append([]byte{0x04}, make([]byte, 17)...), wantErr: ErrTruncated},
		{name: "domain without length", in: []byte{0x03}, wantErr: ErrTruncated},
		{name: "domain short", in: []byte{0x03, 5, 'a', 'b', 'c', 'd', 'e', 0}, wantErr: ErrTruncated},
		{name: "empty domain", in: []byte{0x03, 0, 0, 80}, errText: "empty domain"},
		{name: "unknown type", in: []byte{0x02, 0, 0, 0, 0, 0, 0}, errText: "unknown address type 0x02"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, n, err := DecodeAddr(tt.in)
			switch {
			case tt.wantErr != nil:
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("DecodeAddr = %v, want %v", err, tt.wantErr)
				}
			case tt.errText != "":
				if err == nil || !strings.Contains(err.Error(), tt.errText) {
					t.Fatalf("DecodeAddr = %v, want error containing %q", err, tt.errText)
				}
			case err != nil || n != tt.wantN || got != tt.want:
				t.Fatalf("DecodeAddr = %#v, %d, %v; want %#v, %d", got, n, err, tt.want, tt.wantN)
			}
		})
	}
}

func TestAddrLen(t *testing.T) {
	tests := []struct {
		name string
		in   []byte
		want int
	}{
		{name: "empty asks for ATYP", in: nil, want: 1},
		{name: "ipv4", in: []byte{0x01}, want: 7},
		{name: "ipv6", in: []byte{0x04}, want: 19},
		{name: "domain asks for its length", in: []byte{0x03}, want: 2},
		{name: "domain", in: []byte{0x03, 255}, want: 259},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got, err := AddrLen(tt.in); err != nil || got != tt.want {
				t.Errorf("AddrLen(%x) = %d, %v; want %d", tt.in, got, err, tt.want)
			}
		})
	}
}
