package proxy

import (
	"net"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// FuzzFromURL checks that FromURL never panics, that its errors are one
// line, and that every URL it accepts describes a dialer it can write back
// as a URL that parses to the same dialer. Seeds beyond these live in
// testdata/fuzz/FuzzFromURL.
func FuzzFromURL(f *testing.F) {
	for _, seed := range []string{
		"direct", "direct://", "DIRECT", "direct://x",
		"socks5://127.0.0.1:1080", "socks5h://proxy.lan:1080/", "socks5://[::1]:1080",
		"socks5://[fe80::1%25eth0]:1080", "socks5://bob:hunter2@127.0.0.1:1080",
		"socks5://b%40b:p%3Aw@h:1", "socks5://bob@h:1", "socks5://:pw@h:1",
		"socks5://h", "socks5://h:0", "socks5://h:65536", "socks5://::1:1080",
		"socks5://h:1?q", "socks5://h:1#f", "socks5://h:1/p", "socks4://h:1",
		"127.0.0.1:1080", "", "://", "socks5://[::1", "socks5://u:%zz@h:1",
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		d, err := FromURL(raw, nil)
		if err != nil {
			if msg := err.Error(); !strings.HasPrefix(msg, `proxy URL "`) || strings.Contains(msg, "\n") {
				t.Fatalf("error %q is not one line starting with the URL", msg)
			}
			return
		}
		switch d := d.(type) {
		case Direct:
			if !reflect.DeepEqual(d, Direct{}) {
				t.Fatalf("FromURL(%q) = %#v, want Direct{}", raw, d)
			}
		case SOCKS5:
			checkSOCKS5FromURL(t, raw, d)
		default:
			t.Fatalf("FromURL(%q) returned a %T", raw, d)
		}
	})
}

func checkSOCKS5FromURL(t *testing.T, raw string, d SOCKS5) {
	host, port, err := net.SplitHostPort(d.Server)
	if err != nil || host == "" {
		t.Fatalf("FromURL(%q) gave server %q: %v", raw, d.Server, err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || strconv.Itoa(p) != port {
		t.Fatalf("FromURL(%q) gave port %q", raw, port)
	}
	if len(d.Username) > 255 || len(d.Password) > 255 || (d.Username == "" && d.Password != "") {
		t.Fatalf("FromURL(%q) gave credentials of %d and %d bytes", raw, len(d.Username), len(d.Password))
	}
	if d.Forward != nil || d.HandshakeTimeout != 0 {
		t.Fatalf("FromURL(%q) set fields it was not given: %#v", raw, d)
	}

	u := url.URL{Scheme: "socks5", Host: d.Server}
	if d.Password != "" {
		u.User = url.UserPassword(d.Username, d.Password)
	} else if d.Username != "" {
		u.User = url.User(d.Username)
	}
	again, err := FromURL(u.String(), nil)
	if err != nil || !reflect.DeepEqual(again, d) {
		t.Fatalf("FromURL(%q) = %#v, but its URL %q gives %#v, %v", raw, d, u.String(), again, err)
	}

	// String drops only the password.
	noPassword := d
	noPassword.Password = ""
	again, err = FromURL(d.String(), nil)
	if err != nil || !reflect.DeepEqual(again, noPassword) {
		t.Fatalf("FromURL(%q) = %#v, but its String %q gives %#v, %v", raw, d, d.String(), again, err)
	}
}
