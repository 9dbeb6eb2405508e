package proxy

import (
	"net"
	"reflect"
	"strings"
	"testing"
)

func TestFromURL(t *testing.T) {
	forward := &net.Dialer{}
	tests := []struct {
		name string
		raw  string
		want Dialer
	}{
		{name: "direct", raw: "direct", want: Direct{}},
		{name: "direct url", raw: "direct://", want: Direct{}},
		{name: "direct upper case", raw: "DIRECT://", want: Direct{}},
		{name: "socks5", raw: "socks5://127.0.0.1:1080", want: SOCKS5{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "socks5h alias", raw: "socks5h://127.0.0.1:1080", want: SOCKS5{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "upper case scheme", raw: "SOCKS5://127.0.0.1:1080", want: SOCKS5{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "trailing slash", raw: "socks5://127.0.0.1:1080/", want: SOCKS5{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "hostname", raw: "socks5://proxy.lan:1080", want: SOCKS5{Server: "proxy.lan:1080", Forward: forward}},
		{name: "ipv6", raw: "socks5://[::1]:1080", want: SOCKS5{Server: "[::1]:1080", Forward: forward}},
		{name: "ipv6 with zone", raw: "socks5://[fe80::1%25eth0]:1080", want: SOCKS5{Server: "[fe80::1%eth0]:1080", Forward: forward}},
		{name: "leading zeros in port", raw: "socks5://127.0.0.1:01080", want: SOCKS5{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "port 65535", raw: "socks5://127.0.0.1:65535", want: SOCKS5{Server: "127.0.0.1:65535", Forward: forward}},
		{
			name: "user and password", raw: "socks5://bob:hunter2@127.0.0.1:1080",
			want: SOCKS5{Server: "127.0.0.1:1080", Username: "bob", Password: "hunter2", Forward: forward},
		},
		{
			name: "percent-decoded credentials", raw: "socks5://b%40b:p%3Aw%2F%25@127.0.0.1:1080",
			want: SOCKS5{Server: "127.0.0.1:1080", Username: "b@b", Password: "p:w/%", Forward: forward},
		},
		{name: "user without password", raw: "socks5://bob@127.0.0.1:1080", want: SOCKS5{Server: "127.0.0.1:1080", Username: "bob", Forward: forward}},
		{name: "empty password", raw: "socks5://bob:@127.0.0.1:1080", want: SOCKS5{Server: "127.0.0.1:1080", Username: "bob", Forward: forward}},
		{name: "socks4", raw: "socks4://127.0.0.1:1080", want: SOCKS4{Server: "127.0.0.1:1080", Forward: forward}},
		{name: "socks4a alias", raw: "socks4a://proxy.lan:1080/", want: SOCKS4{Server: "proxy.lan:1080", Forward: forward}},
		{name: "socks4 user id", raw: "socks4://b%40b@[::1]:1080", want: SOCKS4{Server: "[::1]:1080", UserID: "b@b", Forward: forward}},
		{name: "http", raw: "http://127.0.0.1:3128", want: HTTPConnect{Server: "127.0.0.1:3128", Forward: forward}},
		{name: "http upper case", raw: "HTTP://proxy.lan:3128/", want: HTTPConnect{Server: "proxy.lan:3128", Forward: forward}},
		{
			name: "http credentials", raw: "http://bob:p%3Aw%2F@[::1]:3128",
			want: HTTPConnect{Server: "[::1]:3128", Username: "bob", Password: "p:w/", Forward: forward},
		},
		{
			name: "255-byte credentials", raw: "socks5://" + strings.Repeat("u", 255) + ":" + strings.Repeat("p", 255) + "@h:1",
			want: SOCKS5{Server: "h:1", Username: strings.Repeat("u", 255), Password: strings.Repeat("p", 255), Forward: forward},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := FromURL(tt.raw, forward)
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("FromURL(%q) = %#v, want %#v", tt.raw, got, tt.want)
			}
		})
	}
}

func TestFromURLErrors(t *testing.T) {
	tests := []struct {
		name string
		raw  string
		want string
	}{
		{name: "empty", raw: "", want: `proxy URL "": missing scheme: want direct://, socks5://[user:pass@]host:port, socks4://[user@]host:port or http://[user:pass@]host:port`},
		{name: "host and port only", raw: "127.0.0.1:1080", want: `proxy URL "127.0.0.1:1080": missing scheme`},
		{name: "no scheme", raw: "://127.0.0.1:1080", want: "missing protocol scheme"},
		{name: "unknown scheme", raw: "ftp://127.0.0.1:21", want: `proxy URL "ftp://127.0.0.1:21": unknown scheme "ftp"`},
		{name: "https", raw: "https://127.0.0.1:3128", want: `scheme "https" not supported: no TLS to the proxy yet`},
		{name: "socks4 password", raw: "socks4://bob:pw@127.0.0.1:1080", want: "SOCKS4 has no password"},
		{name: "socks4 empty user id", raw: "socks4://@127.0.0.1:1080", want: "empty user ID"},
		{name: "socks4 user id too long", raw: "socks4://" + strings.Repeat("u", 256) + "@x:1080", want: "user ID of 256 bytes, want at most 255"},
		{name: "socks4 nul in user id", raw: "socks4://a%00b@x:1080", want: "user ID holds a NUL byte"},
		{name: "socks4 missing port", raw: "socks4a://x", want: "missing port"},
		{name: "socks4 ipv6 without brackets", raw: "socks4://::1:1080", want: "IPv6 address must be in brackets: socks4://[addr]:port"},
		{name: "http missing port", raw: "http://proxy.lan", want: "missing port"},
		{name: "http path", raw: "http://proxy.lan:3128/x", want: `unexpected path "/x"`},
		{name: "http empty username", raw: "http://:pw@proxy.lan:3128", want: "empty username"},
		{name: "http colon in username", raw: "http://a%3Ab:pw@proxy.lan:3128", want: `username holds a ":"`},
		{name: "http newline in password", raw: "http://bob:a%0Ab@proxy.lan:3128", want: "control character"},
		{name: "direct with host", raw: "direct://127.0.0.1", want: "direct:// takes nothing after the scheme"},
		{name: "missing port", raw: "socks5://x", want: `proxy URL "socks5://x": missing port`},
		{name: "empty port", raw: "socks5://x:", want: "missing port"},
		{name: "missing host", raw: "socks5://:1080", want: "missing host"},
		{name: "nothing", raw: "socks5://", want: "missing host"},
		{name: "port 0", raw: "socks5://x:0", want: "port 0 out of range 1 to 65535"},
		{name: "port 65536", raw: "socks5://x:65536", want: "port 65536 out of range 1 to 65535"},
		{name: "named port", raw: "socks5://x:socks", want: `invalid port ":socks" after host`},
		{name: "path", raw: "socks5://x:1080/path", want: `unexpected path "/path"`},
		{name: "query", raw: "socks5://x:1080?timeout=1", want: "unexpected query or fragment"},
		{name: "empty query", raw: "socks5://x:1080?", want: "unexpected query or fragment"},
		{name: "fragment", raw: "socks5://x:1080#frag", want: "unexpected query or fragment"},
		{name: "ipv6 without brackets", raw: "socks5://::1:1080", want: "IPv6 address must be in brackets"},
		{name: "unclosed bracket", raw: "socks5://[::1:1080", want: "missing ']' in host"},
		{name: "empty username", raw: "socks5://:pw@x:1080", want: "empty username"},
		{name: "username too long", raw: "socks5://" + strings.Repeat("u", 256) + "@x:1080", want: "username of 256 bytes, want at most 255"},
		{name: "password too long", raw: "socks5://u:" + strings.Repeat("p", 256) + "@x:1080", want: "password of 256 bytes, want at most 255"},
		{name: "bracket as host", raw: "socks5://]:1", want: `invalid host "]"`},
		{name: "zone not a name", raw: "socks5://[fe80::1%25e!th]:1080", want: `invalid host "fe80::1%e!th"`},
		{name: "punctuation in host", raw: "socks5://a!b:1080", want: `invalid host "a!b"`},
		{name: "bad escape", raw: "socks5://u:%zz@x:1080", want: `invalid percent-encoding (write "%" as "%25")`},
		{name: "bad escape in host", raw: "socks5://x%zz:1080", want: `invalid percent-encoding`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d, err := FromURL(tt.raw, nil)
			if err == nil {
				t.Fatalf("FromURL(%q) = %v, want an error", tt.raw, d)
			}
			if msg := err.Error(); !strings.Contains(msg, tt.want) || strings.Contains(msg, "\n") {
				t.Errorf("err = %q, want one line containing %q", msg, tt.want)
			}
		})
	}
}

func TestFromURLHidesPassword(t *testing.T) {
	tests := []struct {
		name string
		raw  string
		want string
	}{
		{name: "bad port", raw: "socks5://bob:hunter2@x:0", want: `proxy URL "socks5://bob:xxxxx@x:0": `},
		{name: "does not parse", raw: "socks5://bob:hunter2%@x:1080", want: `proxy URL "socks5://bob:xxxxx@x:1080": `},
		{name: "unescaped slash and at", raw: "socks5://bob:hun/@ter2@x:1080/p", want: `proxy URL "socks5://bob:xxxxx@x:1080/p": percent-encode`},
		// url.Parse would take "bob:123" as host and port, and "/ter2@x:1080"
		// as the path, and an error quoting the path would show "ter2".
		{name: "unescaped slash", raw: "socks5://bob:123/ter2@x:1080", want: `proxy URL "socks5://bob:xxxxx@x:1080": percent-encode "/", "?" and "#"`},
		{name: "unescaped question mark", raw: "socks5://bob:hun?ter2@x:1080", want: `proxy URL "socks5://bob:xxxxx@x:1080": percent-encode`},
		{name: "bad escape", raw: "socks5://bob:ter2%zz@x:1080", want: `proxy URL "socks5://bob:xxxxx@x:1080": invalid percent-encoding`},
		{name: "unknown scheme", raw: "ftp://bob:hunter2@x", want: `proxy URL "ftp://bob:xxxxx@x": `},
		{name: "socks4 password", raw: "socks4://bob:hunter2@x:1080", want: `proxy URL "socks4://bob:xxxxx@x:1080": SOCKS4 has no password`},
		{name: "https", raw: "https://bob:hunter2@x:3128", want: `proxy URL "https://bob:xxxxx@x:3128": scheme "https"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := FromURL(tt.raw, nil)
			if err == nil {
				t.Fatal("no error")
			}
			if msg := err.Error(); !strings.HasPrefix(msg, tt.want) || strings.Contains(msg, "ter2") {
				t.Errorf("err = %q, want it to start %q and hide the password", msg, tt.want)
			}
		})
	}
}

func TestDialerString(t *testing.T) {
	tests := []struct {
		raw  string
		want string
	}{
		{raw: "direct", want: "direct"},
		{raw: "socks5h://bob:hunter2@[::1]:1080", want: "socks5://bob@[::1]:1080"},
		{raw: "socks4a://bob@proxy.lan:1080", want: "socks4://bob@proxy.lan:1080"},
		{raw: "http://bob:hunter2@proxy.lan:3128/", want: "http://bob@proxy.lan:3128"},
	}
	for _, tt := range tests {
		t.Run(tt.raw, func(t *testing.T) {
			d, err := FromURL(tt.raw, nil)
			if err != nil {
				t.Fatal(err)
			}
			if got := d.(interface{ String() string }).String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}
