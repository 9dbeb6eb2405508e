package proxy

import (
	"fmt"
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
		"socks4a://bob@h:1", "socks4://a%00@h:1", "socks4://u:p@h:1", "socks4://@h:1",
		"http://h:3128", "HTTP://bob:pw@[::1]:3128/", "http://a%3Ab@h:1", "http://b:%0A@h:1",
		"http://h", "https://h:443",
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
		case SOCKS4:
			checkSOCKS4FromURL(t, raw, d)
		case HTTPConnect:
			checkHTTPFromURL(t, raw, d)
		default:
			t.Fatalf("FromURL(%q) returned a %T", raw, d)
		}
	})
}

// checkServer checks that a parsed proxy address is "host:port" with a
// port in range, written without leading zeros.
func checkServer(t *testing.T, raw, server string) {
	host, port, err := net.SplitHostPort(server)
	if err != nil || host == "" {
		t.Fatalf("FromURL(%q) gave server %q: %v", raw, server, err)
	}
	if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 || strconv.Itoa(p) != port {
		t.Fatalf("FromURL(%q) gave port %q", raw, port)
	}
}

// checkAgain checks that FromURL gives d again for u, the URL written back
// from d, and that d's String (without the password) parses to noPassword.
func checkAgain(t *testing.T, raw string, u *url.URL, d, noPassword Dialer) {
	again, err := FromURL(u.String(), nil)
	if err != nil || !reflect.DeepEqual(again, d) {
		t.Fatalf("FromURL(%q) = %#v, but its URL %q gives %#v, %v", raw, d, u.String(), again, err)
	}
	s := d.(fmt.Stringer).String()
	again, err = FromURL(s, nil)
	if err != nil || !reflect.DeepEqual(again, noPassword) {
		t.Fatalf("FromURL(%q) = %#v, but its String %q gives %#v, %v", raw, d, s, again, err)
	}
}

func checkSOCKS4FromURL(t *testing.T, raw string, d SOCKS4) {
	checkServer(t, raw, d.Server)
	if len(d.UserID) > 255 || strings.ContainsRune(d.UserID, 0) {
		t.Fatalf("FromURL(%q) gave user ID %q", raw, d.UserID)
	}
	if d.Forward != nil || d.HandshakeTimeout != 0 {
		t.Fatalf("FromURL(%q) set fields it was not given: %#v", raw, d)
	}
	u := url.URL{Scheme: "socks4", Host: d.Server}
	if d.UserID != "" {
		u.User = url.User(d.UserID)
	}
	checkAgain(t, raw, &u, d, d)
}

func checkHTTPFromURL(t *testing.T, raw string, d HTTPConnect) {
	checkServer(t, raw, d.Server)
	if strings.Contains(d.Username, ":") || (d.Username == "" && d.Password != "") {
		t.Fatalf("FromURL(%q) gave credentials %q, %q", raw, d.Username, d.Password)
	}
	if d.Forward != nil || d.HandshakeTimeout != 0 {
		t.Fatalf("FromURL(%q) set fields it was not given: %#v", raw, d)
	}
	u := url.URL{Scheme: "http", Host: d.Server}
	if d.Password != "" {
		u.User = url.UserPassword(d.Username, d.Password)
	} else if d.Username != "" {
		u.User = url.User(d.Username)
	}
	noPassword := d
	noPassword.Password = ""
	checkAgain(t, raw, &u, d, noPassword)
}

func checkSOCKS5FromURL(t *testing.T, raw string, d SOCKS5) {
	checkServer(t, raw, d.Server)
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
	// String drops only the password.
	noPassword := d
	noPassword.Password = ""
	checkAgain(t, raw, &u, d, noPassword)
}
