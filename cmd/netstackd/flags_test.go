package main

import (
	"errors"
	"io"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestParseFlagsDefaults(t *testing.T) {
	o, err := parseFlags(nil, false, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if o.tun != "netstack0" || o.mtu != 1500 || o.proxyURL != "direct://" || o.dnsMode != "remote" {
		t.Errorf("defaults: tun %q mtu %d proxy %q dns %q", o.tun, o.mtu, o.proxyURL, o.dnsMode)
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
			if o.proxyURL != "socks5://127.0.0.1:1080" || o.dnsMode != "fake-ip" {
				return o.proxyURL + " " + o.dnsMode
			}
			return ""
		}},
		{name: "run command", args: []string{"--", "curl", "-s", "x"}, run: true, check: func(o *options) string {
			if !slices.Equal(o.command, []string{"curl", "-s", "x"}) || len(o.routes) != 2 {
				return strings.Join(o.command, " ")
			}
			return ""
		}},
		{name: "socks and proxy", args: []string{"--socks", "a:1", "--proxy", "direct://"}, errHas: "both"},
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
