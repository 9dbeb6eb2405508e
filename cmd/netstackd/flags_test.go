package main

import (
	"errors"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/stack"
)

func TestParseFlagsDefaults(t *testing.T) {
	o, err := parseFlags(nil, false, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.tun != "netstack0" || o.mtu != 1500 || ups(o) != "direct://" || o.dnsMode != "remote" {
		t.Errorf("defaults: tun %q mtu %d proxy %q dns %q", o.tun, o.mtu, ups(o), o.dnsMode)
	}
	wantAddrs := []netip.Prefix{netip.MustParsePrefix("198.18.0.1/15"), netip.MustParsePrefix("fd00:1898::1/64")}
	if !slices.Equal(o.addrs, wantAddrs) {
		t.Errorf("addrs %v, want %v", o.addrs, wantAddrs)
	}
	if len(o.routes) != 0 {
		t.Errorf("routes %v without --netns, want none touched", o.routes)
	}
}

func TestParseFlags(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		run    bool
		check  func(*options) string
		errHas string
	}{
		{name: "netns default routes", args: []string{"--netns", "/run/netns/x"}, check: func(o *options) string {
			if len(o.routes) != 2 || o.routes[0].String() != "0.0.0.0/0" || o.routes[1].String() != "::/0" {
				return "routes " + strings.Join(prefixStrings(o.routes), ",")
			}
			return ""
		}},
		{name: "explicit route replaces default", args: []string{"--netns", "/x", "--route", "10.9.0.0/16", "--dns", "off"}, check: func(o *options) string {
			if len(o.routes) != 1 || o.routes[0].String() != "10.9.0.0/16" {
				return "routes " + strings.Join(prefixStrings(o.routes), ",")
			}
			return ""
		}},
		{name: "fake range routed when routes are set", args: []string{"--socks", "127.0.0.1:1080", "--route", "10.9.0.0/16"}, check: func(o *options) string {
			if !slices.Contains(o.routes, netip.MustParsePrefix("fd00:1919::/96")) {
				return "fake v6 range not routed: " + strings.Join(prefixStrings(o.routes), ",")
			}
			return ""
		}},
		{name: "repeatable addr", args: []string{"--addr", "10.1.0.1/24", "--addr", "fd01::1/64"}, check: func(o *options) string {
			if len(o.addrs) != 2 || o.addrs[0].String() != "10.1.0.1/24" {
				return "addrs " + strings.Join(prefixStrings(o.addrs), ",")
			}
			return ""
		}},
		{name: "socks shorthand", args: []string{"--socks", "127.0.0.1:1080"}, check: func(o *options) string {
			if ups(o) != "proxy1=socks5://127.0.0.1:1080" || o.dnsMode != "fake-ip" {
				return ups(o) + " " + o.dnsMode
			}
			return ""
		}},
		{name: "run command", args: []string{"--", "curl", "-s", "x"}, run: true, check: func(o *options) string {
			if !slices.Equal(o.command, []string{"curl", "-s", "x"}) || len(o.routes) != 2 {
				return strings.Join(o.command, " ")
			}
			return ""
		}},
		{name: "offloads by default", args: nil, check: func(o *options) string {
			if o.noOffload {
				return "noOffload set without --no-offload"
			}
			return ""
		}},
		{name: "no offload", args: []string{"--no-offload"}, check: func(o *options) string {
			if !o.noOffload {
				return "--no-offload not taken"
			}
			return ""
		}},
		{name: "upstreams named in order", args: []string{"--proxy", "socks5://a:1", "--socks", "b:2", "--proxy", "fast=http://u:p=q@c:3", "--proxy", "socks4://d:4"}, check: func(o *options) string {
			if want := "proxy1=socks5://a:1 proxy2=socks5://b:2 fast=http://u:p=q@c:3 proxy3=socks4://d:4"; ups(o) != want {
				return ups(o) + ", want " + want
			}
			return ""
		}},
		{name: "direct among several", args: []string{"--socks", "a:1", "--proxy", "direct://"}, errHas: "direct:// cannot be one of several"},
		{name: "upstream named direct", args: []string{"--proxy", "direct=socks5://a:1"}, errHas: "reserved"},
		{name: "upstream name twice", args: []string{"--proxy", "a=socks5://a:1", "--proxy", "a=socks5://b:1"}, errHas: `"a" given twice`},
		{name: "upstream name taken by an unnamed one", args: []string{"--proxy", "proxy1=socks5://a:1", "--proxy", "socks5://b:1"}, errHas: `"proxy1" given twice`},
		{name: "upstream name uppercase", args: []string{"--proxy", "A=socks5://a:1"}, errHas: "lowercase"},
		{name: "upstream without URL", args: []string{"--proxy", "a="}, errHas: "empty URL"},
		{name: "upstream in the TUN prefix", args: []string{"--proxy", "x=socks5://198.18.0.9:1080"}, errHas: "--proxy x 198.18.0.9:1080"},
		{name: "socks without port", args: []string{"--socks", "host"}, errHas: "HOST:PORT"},
		{name: "bad cidr", args: []string{"--addr", "nonsense"}, errHas: "not a CIDR"},
		{name: "mtu too small", args: []string{"--mtu", "100"}, errHas: "--mtu"},
		{name: "long tun name", args: []string{"--tun", "abcdefghijklmnop"}, errHas: "--tun"},
		{name: "bad log level", args: []string{"--log-level", "loud"}, errHas: "level"},
		{name: "bad dns mode", args: []string{"--dns", "magic"}, errHas: "--dns"},
		{name: "stray argument", args: []string{"extra"}, errHas: "unexpected argument"},
		{name: "run without command", args: nil, run: true, errHas: "no command"},
		{name: "run with netns", args: []string{"--netns", "/x", "--", "true"}, run: true, errHas: "--netns"},
		{name: "bad dial timeout", args: []string{"--dial-timeout", "-1s"}, errHas: "--dial-timeout"},
		{name: "tcp defaults", args: nil, check: func(o *options) string {
			if o.tcp != stack.DefaultTCPOptions() {
				return fmt.Sprintf("tcp %+v, want the stack's defaults", o.tcp)
			}
			return ""
		}},
		{name: "tcp flags", args: []string{"--tcp-rmem", "8k,256K,16M", "--tcp-wmem", "4096,65536,4194304", "--tcp-cc", "cubic",
			"--tcp-sack=false", "--tcp-rack=false", "--tcp-moderate-rcvbuf=false", "--tcp-nagle"}, check: func(o *options) string {
			want := stack.TCPOptions{
				ReceiveBuffer:     stack.BufferRange{Min: 8 << 10, Default: 256 << 10, Max: 16 << 20},
				SendBuffer:        stack.BufferRange{Min: 4 << 10, Default: 64 << 10, Max: 4 << 20},
				CongestionControl: "cubic", NoSACK: true, NoRACK: true, NoModerateReceiveBuffer: true, Nagle: true,
			}
			if o.tcp != want {
				return fmt.Sprintf("tcp %+v, want %+v", o.tcp, want)
			}
			return ""
		}},
		{name: "tcp-rmem two numbers", args: []string{"--tcp-rmem", "4K,8M"}, errHas: "want MIN,DEFAULT,MAX"},
		{name: "tcp-rmem not a size", args: []string{"--tcp-rmem", "4K,lots,8M"}, errHas: `size "lots"`},
		{name: "tcp-rmem negative", args: []string{"--tcp-rmem", "-4,128K,8M"}, errHas: `size "-4"`},
		{name: "tcp-rmem min zero", args: []string{"--tcp-rmem", "0,128K,8M"}, errHas: "min 0"},
		{name: "tcp-wmem default below min", args: []string{"--tcp-wmem", "64K,4K,8M"}, errHas: "default 4096 below min 65536"},
		{name: "tcp-wmem max below default", args: []string{"--tcp-wmem", "4K,1M,64K"}, errHas: "max 65536 below default"},
		{name: "tcp-wmem too big", args: []string{"--tcp-wmem", "4K,1M,4G"}, errHas: "below 2G"},
		{name: "tcp-cc unknown", args: []string{"--tcp-cc", "bbr"}, errHas: `--tcp-cc "bbr": want reno or cubic`},
		{name: "tcp-handshake default", args: nil, check: func(o *options) string {
			if o.acceptFirst {
				return "accept-first by default, want dial-first"
			}
			return ""
		}},
		{name: "tcp-handshake accept-first", args: []string{"--tcp-handshake", "accept-first"}, check: func(o *options) string {
			if !o.acceptFirst {
				return "--tcp-handshake accept-first did not set acceptFirst"
			}
			return ""
		}},
		{name: "tcp-handshake dial-first", args: []string{"--tcp-handshake=dial-first"}, check: func(o *options) string {
			if o.acceptFirst {
				return "--tcp-handshake dial-first set acceptFirst"
			}
			return ""
		}},
		{name: "tcp-handshake unknown", args: []string{"--tcp-handshake", "optimistic"}, errHas: `--tcp-handshake "optimistic": want dial-first or accept-first`},
		{name: "tcp-sack not bool", args: []string{"--tcp-sack=maybe"}, errHas: "tcp-sack"},
		{name: "half-open defaults", args: nil, check: func(o *options) string {
			if o.maxInFlight != 1024 || o.maxInFlightPerSource != 0 || o.handshakeTimeout != 2500*time.Millisecond {
				return fmt.Sprintf("max-inflight %d, per source %d, handshake timeout %v", o.maxInFlight, o.maxInFlightPerSource, o.handshakeTimeout)
			}
			return ""
		}},
		{name: "half-open flags", args: []string{"--max-inflight", "64", "--max-inflight-per-source", "8", "--tcp-handshake-timeout", "5s"}, check: func(o *options) string {
			if o.maxInFlight != 64 || o.maxInFlightPerSource != 8 || o.handshakeTimeout != 5*time.Second {
				return fmt.Sprintf("max-inflight %d, per source %d, handshake timeout %v", o.maxInFlight, o.maxInFlightPerSource, o.handshakeTimeout)
			}
			return ""
		}},
		{name: "max-inflight zero", args: []string{"--max-inflight", "0"}, errHas: "--max-inflight 0: want a positive number"},
		{name: "per source above max-inflight", args: []string{"--max-inflight", "64", "--max-inflight-per-source", "65"}, errHas: "--max-inflight-per-source 65"},
		{name: "handshake timeout zero", args: []string{"--tcp-handshake-timeout", "0s"}, errHas: "--tcp-handshake-timeout 0s"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseFlags(tc.args, tc.run, io.Discard)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("error %v, want one containing %q", err, tc.errHas)
				}
				if strings.Contains(err.Error(), "\n") {
					t.Errorf("error is not one line: %q", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if msg := tc.check(o); msg != "" {
				t.Error(msg)
			}
		})
	}
}

func TestHelpExitsZero(t *testing.T) {
	var out strings.Builder
	_, err := parseFlags([]string{"--help"}, false, &out)
	if !errors.Is(err, errHelp) {
		t.Fatalf("err %v, want errHelp", err)
	}
	for _, want := range []string{"--socks", "--netns", "--dns", "netstackd run"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("usage lacks %q", want)
		}
	}
}

func prefixStrings(ps []netip.Prefix) []string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return s
}

func TestParsePublish(t *testing.T) {
	tests := []struct {
		in, want string
		udp      bool
		errHas   string
	}{
		{in: "8080:80", want: "[::]:8080"},
		{in: "127.0.0.1:8080:80", want: "127.0.0.1:8080"},
		{in: "[::1]:8080:80/tcp", want: "[::1]:8080"},
		{in: "5353:53/udp", want: "[::]:5353", udp: true},
		{in: "80", errHas: "want [IP:]HOSTPORT:NSPORT"},
		{in: "0:80", errHas: "host port"},
		{in: "8080:99999", errHas: "namespace port"},
		{in: "nohost:8080:80", errHas: "not an IP"},
		{in: "8080:80/sctp", errHas: "protocol"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			p, err := parsePublish(tc.in)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("error %v, want %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if p.host.String() != tc.want || p.nsPort == 0 || p.udp != tc.udp {
				t.Errorf("got %v", p)
			}
		})
	}
}

func TestGateways(t *testing.T) {
	o, err := parseFlags(nil, false, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	gw4, gw6, target := gateways(o)
	if gw4.String() != "198.18.0.2" || gw6.String() != "fd00:1898::2" || target.String() != "198.18.0.1" {
		t.Errorf("gateways %v %v target %v", gw4, gw6, target)
	}
	o, err = parseFlags([]string{"--addr", "198.18.0.2/24", "--addr", "fd01::2/64"}, false, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	gw4, gw6, target = gateways(o)
	if gw4.String() != "198.18.0.1" || gw6.String() != "fd01::1" || target.String() != "198.18.0.2" {
		t.Errorf("gateways %v %v target %v: must avoid the TUN's own addresses", gw4, gw6, target)
	}
}

// TestParseFlagsHostWide: when host-wide mode is on, and the flags that only
// it takes.
func TestParseFlagsHostWide(t *testing.T) {
	tests := []struct {
		name     string
		args     []string
		run      bool
		hostWide bool
		fwmark   uint32
		table    int
		excludes []string
		errHas   string
	}{
		{name: "default route", args: []string{"--socks", "h:1080", "--route", "0.0.0.0/0", "--route", "::/0"}, hostWide: true, fwmark: 0x6e73, table: 28275},
		{name: "ipv6 default only", args: []string{"--route", "::/0"}, hostWide: true, fwmark: 0x6e73, table: 28275},
		{name: "no routes", args: nil, fwmark: 0, table: 28275},
		{name: "specific route", args: []string{"--route", "10.0.0.0/8"}, fwmark: 0},
		{name: "netns default routes", args: []string{"--netns", "/x"}, fwmark: 0},
		{name: "netns explicit default", args: []string{"--netns", "/x", "--route", "0.0.0.0/0"}, fwmark: 0},
		{name: "run", args: []string{"--", "true"}, run: true, fwmark: 0},
		{name: "tun-fd", args: []string{"--tun-fd", "3", "--route", "0.0.0.0/0"}, fwmark: 0},
		{name: "fwmark hex and table", args: []string{"--route", "0.0.0.0/0", "--fwmark", "0x10", "--table", "100"}, hostWide: true, fwmark: 0x10, table: 100},
		{name: "fwmark decimal", args: []string{"--route", "0.0.0.0/0", "--fwmark", "51820"}, hostWide: true, fwmark: 51820},
		{name: "fwmark outside host-wide marks", args: []string{"--fwmark", "7"}, fwmark: 7},
		{name: "excludes", args: []string{"--route", "0.0.0.0/0", "--exclude", "192.168.0.0/16", "--exclude", "2001:db8::1"}, hostWide: true, fwmark: 0x6e73,
			excludes: []string{"192.168.0.0/16", "2001:db8::1/128"}},
		{name: "fwmark zero", args: []string{"--route", "0.0.0.0/0", "--fwmark", "0"}, errHas: "--fwmark"},
		{name: "fwmark junk", args: []string{"--fwmark", "mark"}, errHas: "--fwmark"},
		{name: "fwmark too big", args: []string{"--fwmark", "0x100000000"}, errHas: "--fwmark"},
		{name: "table main", args: []string{"--route", "0.0.0.0/0", "--table", "254"}, errHas: "--table 254"},
		{name: "table without host-wide", args: []string{"--table", "100"}, errHas: "host-wide mode only"},
		{name: "exclude without host-wide", args: []string{"--exclude", "10.0.0.0/8"}, errHas: "host-wide mode only"},
		{name: "exclude with netns", args: []string{"--netns", "/x", "--exclude", "10.0.0.0/8"}, errHas: "host-wide mode only"},
		{name: "exclude host bits", args: []string{"--route", "0.0.0.0/0", "--exclude", "10.1.2.3/8"}, errHas: "did you mean 10.0.0.0/8"},
		{name: "exclude everything", args: []string{"--route", "0.0.0.0/0", "--exclude", "0.0.0.0/0"}, errHas: "every destination"},
		{name: "route host bits", args: []string{"--route", "0.0.0.0/0", "--route", "10.1.2.3/8"}, errHas: "did you mean 10.0.0.0/8"},
		{name: "user with run", args: []string{"--user", "nobody", "--", "true"}, run: true, errHas: "run: --user"},
		{name: "user root", args: []string{"--user", "0:0"}, errHas: "drops nothing"},
		{name: "user unknown name", args: []string{"--user", "no-such-user-netstackd"}, errHas: "--user"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseFlags(tc.args, tc.run, io.Discard)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("error %v, want one containing %q", err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if o.hostWide != tc.hostWide || o.fwmark != tc.fwmark {
				t.Errorf("hostWide %v fwmark %#x, want %v %#x", o.hostWide, o.fwmark, tc.hostWide, tc.fwmark)
			}
			if tc.table != 0 && o.table != tc.table {
				t.Errorf("table %d, want %d", o.table, tc.table)
			}
			if got := prefixStrings(o.excludes); !slices.Equal(got, tc.excludes) && (len(got) > 0 || len(tc.excludes) > 0) {
				t.Errorf("excludes %v, want %v", got, tc.excludes)
			}
		})
	}
}

func TestParseUser(t *testing.T) {
	for _, tc := range []struct {
		spec     string
		uid, gid int
		errHas   string
	}{
		{spec: "nobody", uid: 65534, gid: 65534},
		{spec: "65534", uid: 65534, gid: 65534},
		{spec: "nobody:123", uid: 65534, gid: 123},
		{spec: "4242:4343", uid: 4242, gid: 4343},
		{spec: "4242", errHas: "UID:GID"},
		{spec: "0", errHas: "drops nothing"},
		{spec: "nobody:0", errHas: "drops nothing"},
		{spec: ":12", errHas: "want NAME"},
		{spec: "12:", errHas: "want NAME"},
		{spec: "-1:5", errHas: "unknown user"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			u, err := parseUser(tc.spec)
			if tc.errHas != "" {
				if err == nil || !strings.Contains(err.Error(), tc.errHas) {
					t.Fatalf("parseUser(%q) = %+v, %v; want an error containing %q", tc.spec, u, err, tc.errHas)
				}
				return
			}
			if err != nil {
				t.Fatalf("parseUser(%q): %v", tc.spec, err)
			}
			if u.uid != tc.uid || u.gid != tc.gid {
				t.Errorf("parseUser(%q) = uid %d gid %d, want %d %d", tc.spec, u.uid, u.gid, tc.uid, tc.gid)
			}
		})
	}
}

// TestTCPFlagsExitUsage: a bad TCP flag is a usage error, reported on one
// line of stderr, before anything is set up.
func TestTCPFlagsExitUsage(t *testing.T) {
	for _, args := range [][]string{
		{"--tcp-rmem", "4K,128K"},
		{"--tcp-wmem", "1M,4K,8M"},
		{"--tcp-cc", "vegas"},
		{"--tcp-moderate-rcvbuf=perhaps"},
		{"--tcp-handshake", "sometimes"},
	} {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			var stdout, stderr strings.Builder
			if code := run(args, &stdout, &stderr); code != exitUsage {
				t.Fatalf("exit code %d, want %d (stderr %q)", code, exitUsage, stderr.String())
			}
			msg := stderr.String()
			if !strings.HasPrefix(msg, "netstackd: ") || strings.Count(msg, "\n") != 1 || !strings.Contains(msg, strings.TrimLeft(strings.SplitN(args[0], "=", 2)[0], "-")) {
				t.Errorf("stderr %q, want one line naming the flag", msg)
			}
		})
	}
}

func TestParseBytes(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		bad  bool
	}{
		{in: "4096", want: 4096},
		{in: "4k", want: 4 << 10},
		{in: "128K", want: 128 << 10},
		{in: "8M", want: 8 << 20},
		{in: "1G", want: 1 << 30},
		{in: " 64K ", want: 64 << 10},
		{in: "", bad: true},
		{in: "K", bad: true},
		{in: "1.5M", bad: true},
		{in: "2G", bad: true},
		{in: "8MB", bad: true},
	} {
		got, err := parseBytes(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("parseBytes(%q) = %d, want an error", tc.in, got)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("parseBytes(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
		if back, err := parseBytes(formatBytes(got)); err != nil || back != got {
			t.Errorf("formatBytes(%d) = %q does not read back", got, formatBytes(got))
		}
	}
}

// TestParseFlagsCombinations: flags that parse one by one but cannot work
// together are refused at start, naming the flags (issue 19).
func TestParseFlagsCombinations(t *testing.T) {
	tests := []struct {
		name   string
		args   []string
		run    bool
		errHas []string // "" in it: accepted
	}{
		{name: "fwmark and user outside host-wide", args: []string{"--fwmark", "7", "--user", "65534:65534"}, errHas: []string{"--fwmark", "--user", "host-wide"}},
		{name: "fwmark and user with netns", args: []string{"--netns", "/x", "--fwmark", "7", "--user", "65534:65534"}, errHas: []string{"--fwmark", "--user"}},
		{name: "fwmark and user with tun-fd", args: []string{"--tun-fd", "3", "--fwmark", "7", "--user", "65534:65534"}, errHas: []string{"--fwmark", "--user"}},
		{name: "user in host-wide mode", args: []string{"--route", "0.0.0.0/0", "--user", "65534:65534"}},
		{name: "fwmark and user in host-wide mode", args: []string{"--route", "0.0.0.0/0", "--fwmark", "7", "--user", "65534:65534"}},
		{name: "user alone", args: []string{"--user", "65534:65534"}},
		{name: "allow-host-loopback direct", args: []string{"--allow-host-loopback"}},
		{name: "allow-host-loopback run", args: []string{"--allow-host-loopback", "--", "true"}, run: true},
		{name: "allow-host-loopback with a proxy", args: []string{"--allow-host-loopback", "--socks", "127.0.0.1:1080"}, errHas: []string{"--allow-host-loopback", "direct"}},
		{name: "dns-upstream in the TUN prefix", args: []string{"--dns-upstream", "198.18.0.2:53"}, errHas: []string{"--dns-upstream 198.18.0.2:53", "own"}},
		{name: "dns-upstream in the fake range", args: []string{"--dns-upstream", "[::ffff:198.19.1.1]:53"}, errHas: []string{"--dns-upstream"}},
		{name: "dns-upstream on loopback", args: []string{"--dns-upstream", "127.0.0.53:53"}},
		{name: "proxy in the TUN prefix", args: []string{"--socks", "198.18.7.7:1080"}, errHas: []string{"--proxy", "198.18.7.7:1080"}},
		{name: "proxy at the dns address", args: []string{"--dns-addr", "10.53.0.53", "--proxy", "http://10.53.0.53:3128"}, errHas: []string{"--proxy"}},
		{name: "proxy on loopback", args: []string{"--socks", "127.0.0.1:1080"}},
		{name: "dns-direct in remote mode", args: []string{"--dns-direct", "corp.example"}, errHas: []string{"--dns-direct", "fake-ip"}},
		{name: "dns-direct in fake-ip mode", args: []string{"--dns", "fake-ip", "--dns-direct", "corp.example"}},
		{name: "dns-upstream with dns off", args: []string{"--dns", "off", "--dns-upstream", "192.0.2.53:53"}, errHas: []string{"--dns-upstream", "--dns off"}},
		{name: "dns-addr in the fake range", args: []string{"--socks", "192.0.2.1:1080", "--dns-addr", "198.19.0.1"}, errHas: []string{"--dns-addr 198.19.0.1", "--fake-ip-range"}},
		{name: "dns-addr in the fake range, remote mode", args: []string{"--dns-addr", "198.19.0.1"}},
		{name: "dns-addr is the TUN address", args: []string{"--dns-addr", "198.18.0.1"}, errHas: []string{"--dns-addr 198.18.0.1", "--addr"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseFlags(tc.args, tc.run, io.Discard)
			if len(tc.errHas) == 0 {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted, want a usage error")
			}
			for _, s := range tc.errHas {
				if !strings.Contains(err.Error(), s) {
					t.Errorf("error %q does not name %q", err, s)
				}
			}
		})
	}
}
