package main

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

func writeFile(t testing.TB, body string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "netstackd.toml")
	if err := os.WriteFile(path, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func printConfig(t testing.TB, args ...string) string {
	t.Helper()
	var out strings.Builder
	if _, err := parseFlags(append(args, "--print-config"), false, &out); !errors.Is(err, errVersion) {
		t.Fatalf("parseFlags(%q, --print-config): %v", args, err)
	}
	return out.String()
}

// TestConfigFile: keys set what the flags of their names set, and the
// command line wins: over a key of its own name, over the key that sets the
// same thing (socks and proxy), and over a whole list.
func TestConfigFile(t *testing.T) {
	path := writeFile(t, `
socks = "127.0.0.1:1080"
route = ["10.0.0.0/8", "192.0.2.0/24"]
max-flows = 4096
tcp-sack = false
udp-timeout = "90s"
dns-direct = ["corp.test", "lan.test"]
`)
	o, err := parseFlags([]string{"--config", path}, false, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	if ups(o) != "proxy1=socks5://127.0.0.1:1080" || o.maxFlows != 4096 || !o.tcp.NoSACK || o.udpTimeout != 90*time.Second ||
		!slices.Equal(o.dnsDirect, []string{"corp.test", "lan.test"}) || !slices.Contains(cidrStrings(o.routes), "192.0.2.0/24") {
		t.Errorf("from the file: proxy %s, max-flows %d, no-sack %v, udp-timeout %s, dns-direct %v, routes %v",
			ups(o), o.maxFlows, o.tcp.NoSACK, o.udpTimeout, o.dnsDirect, o.routes)
	}
	o, err = parseFlags([]string{"--config", path, "--proxy", "http://127.0.0.1:3128", "--max-flows", "10", "--route", "172.16.0.0/12"}, false, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	if ups(o) != "proxy1=http://127.0.0.1:3128" || o.maxFlows != 10 || slices.Contains(cidrStrings(o.routes), "10.0.0.0/8") || !slices.Contains(cidrStrings(o.routes), "172.16.0.0/12") {
		t.Errorf("the command line did not win: proxy %s, max-flows %d, routes %v", ups(o), o.maxFlows, o.routes)
	}
}

// TestPrintConfigRoundTrip: what --print-config writes, read back with
// --config, prints the same, and sets the same options.
func TestPrintConfigRoundTrip(t *testing.T) {
	for _, args := range [][]string{
		nil,
		{"--socks", "127.0.0.1:1080", "--route", "10.0.0.0/8", "--route", "::/0", "--max-flows", "100"},
		{"--proxy", "socks5://u:p@127.0.0.1:1080", "--dns", "fake-ip", "--dns-direct", "lan.test", "--fake-ip-range", "198.19.0.0/16"},
		{"--tcp-rmem", "8K,256K,16M", "--tcp-sack=false", "--udp-timeout", "2m", "--publish", "127.0.0.1:8080:80", "--pcap-max-size", "1M"},
		{"--netns", "/run/netns/x", "--log-format", "json", "--log-level", "debug"},
		{"--socks", "127.0.0.1:1080", "--proxy", "b=http://127.0.0.1:3128", "--proxy", "socks5://127.0.0.1:1081"},
	} {
		first := printConfig(t, args...)
		path := writeFile(t, first)
		second := printConfig(t, "--config", path)
		if first != second {
			t.Errorf("%q: printed, read back and printed again differs:\n%s\n---\n%s", args, first, second)
		}
		o1, err1 := parseFlags(args, false, &strings.Builder{})
		o2, err2 := parseFlags([]string{"--config", path}, false, &strings.Builder{})
		if err1 != nil || err2 != nil {
			t.Fatalf("%q: %v, %v", args, err1, err2)
		}
		if ups(o1) != ups(o2) || o1.maxFlows != o2.maxFlows || !slices.Equal(o1.routes, o2.routes) || o1.tcp != o2.tcp ||
			o1.dnsMode != o2.dnsMode || len(o1.publish) != len(o2.publish) || o1.logFormat != o2.logFormat || o1.pcapMaxSize != o2.pcapMaxSize {
			t.Errorf("%q: options differ after the round trip:\n%+v\n%+v", args, o1, o2)
		}
	}
}

func TestConfigFileErrors(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"max-flow = 3", `unknown key "max-flow" (did you mean "max-flows"?)`},
		{"frobnicate = 1", `unknown key "frobnicate"`},
		{"version = true", `unknown key "version"`},
		{"mtu = [1400, 1500]", "mtu: want one value, not a list"},
		{`route = "x"`, `route = "x": "x" is not a CIDR`},
		{"mtu = 1.5", "want a whole number"},
		{"[dns]\nmode = \"remote\"", "dns: a table"},
		{"route = [", "toml:"},
		{`tcp-handshake = "later"`, `--tcp-handshake "later": want dial-first or accept-first`},
	} {
		_, err := parseFlags([]string{"--config", writeFile(t, tc.body)}, false, &strings.Builder{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want it to contain %q", tc.body, err, tc.want)
		}
	}
	if _, err := parseFlags([]string{"--config", "/nonexistent/netstackd.toml"}, false, &strings.Builder{}); err == nil || !strings.Contains(err.Error(), "no such file") {
		t.Errorf("a missing file: %v", err)
	}
}

// FuzzConfigFile: any file is refused with an error or accepted, and an
// accepted one prints a configuration that reads back to itself.
func FuzzConfigFile(f *testing.F) {
	for _, s := range []string{"", "socks = \"127.0.0.1:1080\"", "route = [\"10.0.0.0/8\"]\nmax-flows = 7", "tcp-sack = false", "mtu = 1400", "[x]\ny=1", "dns-direct = [[\"a\"]]", "publish = [\"8080:80/udp\"]"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, body string) {
		path := writeFile(t, body)
		var out strings.Builder
		if _, err := parseFlags([]string{"--config", path, "--print-config"}, false, &out); !errors.Is(err, errVersion) {
			return
		}
		again := printConfig(t, "--config", writeFile(t, out.String()))
		if again != out.String() {
			t.Fatalf("%q prints a configuration that does not read back to itself:\n%s\n---\n%s", body, out.String(), again)
		}
	})
}

// ups is o's upstreams as --print-config writes them, for comparing.
func ups(o *options) string { return strings.Join(proxyStrings(o.proxies), " ") }

// TestConfigProxyList: proxy takes a list of [NAME=]URL, named as on the
// command line; a single string, as old files have, still loads; the
// order of --socks and --proxy survives --print-config.
func TestConfigProxyList(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`proxy = "socks5://127.0.0.1:1080"`, "proxy1=socks5://127.0.0.1:1080"},
		{`proxy = ["a=socks5://127.0.0.1:1080", "socks5://127.0.0.1:1081"]`, "a=socks5://127.0.0.1:1080 proxy1=socks5://127.0.0.1:1081"},
		{`socks = "127.0.0.1:1080"`, "proxy1=socks5://127.0.0.1:1080"},
	} {
		o, err := parseFlags([]string{"--config", writeFile(t, tc.body)}, false, &strings.Builder{})
		if err != nil {
			t.Fatalf("%s: %v", tc.body, err)
		}
		if got := ups(o); got != tc.want {
			t.Errorf("%s: upstreams %q, want %q", tc.body, got, tc.want)
		}
	}
	out := printConfig(t, "--socks", "127.0.0.1:1080", "--proxy", "b=http://127.0.0.1:3128")
	if want := `proxy = ["proxy1=socks5://127.0.0.1:1080", "b=http://127.0.0.1:3128"]`; !strings.Contains(out, want+"\n") || !strings.Contains(out, "# socks = []\n") {
		t.Errorf("--print-config lacks %s (and a commented socks):\n%s", want, out)
	}
}
