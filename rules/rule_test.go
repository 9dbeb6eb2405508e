package rules

import (
	"errors"
	"strings"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"cidr v4", "cidr:10.0.0.0/8=direct", "cidr:10.0.0.0/8=direct"},
		{"cidr v6", "cidr:2001:db8::/32=proxy", "cidr:2001:db8::/32=proxy"},
		{"bare v4 is /32", "cidr:192.0.2.1=reject", "cidr:192.0.2.1/32=reject"},
		{"bare v6 is /128", "cidr:2001:db8::1=drop", "cidr:2001:db8::1/128=drop"},
		{"v4-mapped prefix is v4", "cidr:::ffff:10.0.0.0/104=direct", "cidr:10.0.0.0/8=direct"},
		{"v4-mapped address is v4", "cidr:::ffff:192.0.2.1=direct", "cidr:192.0.2.1/32=direct"},
		{"domain lowered, dot dropped", "domain:WWW.Example.COM.=proxy:a", "domain:www.example.com=proxy:a"},
		{"suffix", "suffix:example.com=proxy:eu-1.b_c", "suffix:example.com=proxy:eu-1.b_c"},
		{"keyword", "keyword:ADS=reject", "keyword:ads=reject"},
		{"regex keeps commas", `regex:^a{1,3}\.example\.com$=direct`, `regex:^a{1,3}\.example\.com$=direct`},
		{"regex with '='", "regex:a=b=direct", "regex:a=b=direct"},
		{"regex last after others", "net:tcp,port:443,regex:x,y=proxy", "net:tcp,port:443,regex:x,y=proxy"},
		{"port", "port:443=direct", "port:443=direct"},
		{"port range", "port:1-65535=direct", "port:1-65535=direct"},
		{"port range of one", "port:80-80=direct", "port:80=direct"},
		{"net", "net:udp,net:icmp=drop", "net:udp,net:icmp=drop"},
		{"src", "src:10.1.0.0/16,cidr:0.0.0.0/0=direct", "src:10.1.0.0/16,cidr:0.0.0.0/0=direct"},
		{"uid", "uid:0=direct", "uid:0=direct"},
		{"uid max", "uid:4294967294=direct", "uid:4294967294=direct"},
		{"exe", "exe:/usr/bin/curl=proxy", "exe:/usr/bin/curl=proxy"},
		{"list", "list:ads.txt=reject", "list:ads.txt=reject"},
		{"spaces around separators", "  suffix:a.com , port:443 = proxy  ", "suffix:a.com,port:443=proxy"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, err := Parse(tc.in)
			if err != nil {
				t.Fatalf("Parse(%q): %v", tc.in, err)
			}
			if got := r.String(); got != tc.want {
				t.Errorf("Parse(%q).String() = %q, want %q", tc.in, got, tc.want)
			}
			if r.Text != strings.TrimSpace(tc.in) {
				t.Errorf("Text = %q, want the input", r.Text)
			}
		})
	}
}

func TestParseErrors(t *testing.T) {
	for _, tc := range []struct {
		name, in, want string
	}{
		{"no action", "cidr:10.0.0.0/8", `no "=ACTION"`},
		{"no match", "=direct", "no MATCH"},
		{"unknown action", "port:80=accept", `unknown action "accept"`},
		{"empty upstream", "port:80=proxy:", "empty upstream name"},
		{"bad upstream", "port:80=proxy:a/b", `upstream name "a/b": character '/'`},
		{"no colon", "example.com=direct", `MATCH "example.com" has no ':'`},
		{"unknown kind", "host:a.com=direct", `unknown MATCH kind "host"`},
		{"empty match", "port:80,,net:tcp=direct", "empty MATCH"},
		{"trailing comma", "port:80,=direct", "empty MATCH after the last ','"},
		{"port too big", "port:99999=direct", "port 99999 out of range 1-65535"},
		{"port zero", "port:0=direct", "port 0 out of range 1-65535"},
		{"port range backwards", "port:90-80=direct", "port range 90-80 ends before it starts"},
		{"port range top", "port:1-65536=direct", "port 65536 out of range"},
		{"port not number", "port:http=direct", `port "http" is not a number`},
		{"cidr junk", "cidr:10.0.0/8=direct", `cidr: "10.0.0/8" is not a prefix`},
		{"cidr host bits", "cidr:10.1.2.3/8=direct", "did you mean 10.0.0.0/8"},
		{"cidr zone", "cidr:fe80::1%eth0=direct", "not an address or prefix"},
		{"empty label", "suffix:a..com=direct", "empty label"},
		{"leading dot", "suffix:.a.com=direct", "empty label"},
		{"empty name", "domain:.=direct", "empty name"},
		{"bad name char", "domain:a b.com=direct", "character ' '"},
		{"keyword empty", "keyword:=direct", "keyword"},
		{"regex broken", "regex:a(b=direct", "regex \"a(b\""},
		{"net", "net:sctp=direct", `net "sctp": want tcp, udp or icmp`},
		{"uid -1", "uid:4294967295=direct", "uid"},
		{"uid negative", "uid:-1=direct", "uid"},
		{"exe relative", "exe:curl=direct", "absolute path"},
		{"list empty", "list:=direct", "list: empty path"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse(tc.in)
			if err == nil {
				t.Fatalf("Parse(%q) succeeded", tc.in)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("Parse(%q) = %q, want it to say %q", tc.in, err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "rule \"") {
				t.Errorf("Parse(%q) = %q, want it to name the rule", tc.in, err)
			}
		})
	}
}

// TestParseAllNamesRule: the error says which rule, counted from 1, as the
// operator reads the list.
func TestParseAllNamesRule(t *testing.T) {
	_, err := ParseAll([]string{"port:80=direct", "suffix:a.com=proxy", "port:99999=direct"})
	const want = `rule 3 "port:99999=direct": port 99999 out of range 1-65535`
	if err == nil || err.Error() != want {
		t.Fatalf("ParseAll = %v, want %s", err, want)
	}
	var e *Error
	if !errors.As(err, &e) || e.Index != 2 {
		t.Errorf("errors.As(%v) = %v, Index %d; want *Error with Index 2", err, e, e.Index)
	}
	rs, err := ParseAll([]string{"port:80=direct", "suffix:a.com=proxy:b"})
	if err != nil {
		t.Fatal(err)
	}
	if got := rs[1].Label(); got != `rule 2 "suffix:a.com=proxy:b"` {
		t.Errorf("Label = %s", got)
	}
}

func TestActionString(t *testing.T) {
	for _, a := range []Action{{Kind: Direct}, {Kind: Proxy}, {Kind: Proxy, Upstream: "x"}, {Kind: Reject}, {Kind: Drop}} {
		got, err := parseAction(a.String())
		if err != nil || got != a {
			t.Errorf("parseAction(%q) = %v, %v; want %v", a.String(), got, err, a)
		}
	}
}
