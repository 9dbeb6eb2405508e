package main

import (
	"io"
	"net"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/netstackd/netstackd/stack"
)

// FuzzBufferRangeFlag: any --tcp-rmem/--tcp-wmem value is refused with an
// error or gives a range that validates and prints back to itself.
func FuzzBufferRangeFlag(f *testing.F) {
	for _, s := range []string{"4K,128K,8M", "4096,131072,8388608", "1M,4K,8M", "1,1,1", "0,0,0", "2G,2G,2G", " 4k , 64k, 1g", "4K,128K", "9999999999K,1,1", "-1,2,3", "4KK,1M,2M"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		var r stack.BufferRange
		if err := (bufferRangeFlag{&r}).Set(v); err != nil {
			return
		}
		if err := r.Validate(); err != nil {
			t.Fatalf("%q accepted as %+v, which does not validate: %v", v, r, err)
		}
		printed := bufferRangeFlag{&r}.String()
		var back stack.BufferRange
		if err := (bufferRangeFlag{&back}).Set(printed); err != nil || back != r {
			t.Fatalf("%q -> %+v prints as %q, which parses to %+v, %v", v, r, printed, back, err)
		}
	})
}

// FuzzFlagArgs: whatever is typed, parseFlags answers with options or with
// an error in our words, never the flag package's one-dash spelling.
func FuzzFlagArgs(f *testing.F) {
	for _, s := range []string{"--dial-timeout 10", "--mtu x", "--tcp-sack=maybe", "--dns", "-dns off", "---x", "--addr 1.2.3.4/33", "--socks h:1 --proxy direct://", "--publish 80", "--", "run --netns x"} {
		f.Add(s)
	}
	raw := regexp.MustCompile(`flag provided but not defined|for flag -|needs an argument: -|parse error`)
	f.Fuzz(func(t *testing.T, line string) {
		args := strings.Fields(line)
		runMode := len(args) > 0 && args[0] == "run"
		if runMode {
			args = args[1:]
		}
		_, err := parseFlags(args, runMode, io.Discard)
		if err != nil && raw.MatchString(err.Error()) {
			t.Fatalf("%q: error in the flag package's words: %v", line, err)
		}
	})
}

// FuzzParseMetricsAddr: any --metrics value is refused or gives a
// host:port that splits back, with a port from 0 to 65535, the host given
// or loopback when none was, and parses again to itself.
func FuzzParseMetricsAddr(f *testing.F) {
	for _, s := range []string{"9464", ":9464", "0", "0.0.0.0:9464", "[::1]:80", "[::]:1", "host:9464", "", ":", "x", "65536", "::1:80", "[::1]", "host:", "-1", "+1", "1e3", "[a:b]:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		a, err := parseMetricsAddr(v)
		if err != nil {
			return
		}
		host, port, serr := net.SplitHostPort(a)
		if serr != nil {
			t.Fatalf("parseMetricsAddr(%q) = %q, which does not split: %v", v, a, serr)
		}
		if n, perr := strconv.ParseUint(port, 10, 16); perr != nil || strconv.FormatUint(n, 10) != port {
			t.Fatalf("parseMetricsAddr(%q) = %q: port %q is not a plain number below 65536", v, a, port)
		}
		if !strings.Contains(v, ":") && host != "127.0.0.1" {
			t.Fatalf("parseMetricsAddr(%q) = %q: a bare port must mean loopback", v, a)
		}
		if again, err := parseMetricsAddr(a); err != nil || again != a {
			t.Fatalf("parseMetricsAddr(%q) = %q, which parses to %q, %v", v, a, again, err)
		}
	})
}

// FuzzProxySpec: any --proxy value is refused, or gives a name that is
// valid (or none) and not "direct", and a non-empty URL; written back as
// --print-config writes it, named, it parses to the same upstream.
func FuzzProxySpec(f *testing.F) {
	for _, s := range []string{"socks5://h:1", "a=socks5://h:1", "fast-1=http://u:p=q@h:3", "direct=socks5://h:1", "A=x", "a=", "=x", "a:b=c", " a = b", "proxy1=socks4://u@h:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, v string) {
		p, err := parseProxySpec(v)
		if err != nil {
			return
		}
		if p.url == "" || p.name == directName || p.name != "" && !proxyNameRE.MatchString(p.name) {
			t.Fatalf("%q accepted as %+v", v, p)
		}
		named := p
		if named.name == "" {
			named.name = "proxy1"
		}
		back, err := parseProxySpec(proxyStrings([]proxySpec{named})[0])
		if err != nil || back != named {
			t.Fatalf("%q -> %+v writes back as %q, which parses to %+v, %v", v, p, proxyStrings([]proxySpec{named})[0], back, err)
		}
	})
}
