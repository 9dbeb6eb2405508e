package rules_test

import (
	"fmt"
	"net/netip"

	"github.com/netstackd/netstackd/rules"
)

func Example() {
	rs, err := rules.ParseAll([]string{
		"suffix:ads.example=reject",
		"cidr:10.0.0.0/8,net:tcp=direct",
		"suffix:example.com,port:443=proxy:eu",
		`regex:^cdn[0-9]{1,3}\.net$=proxy`,
	})
	if err != nil {
		fmt.Println(err)
		return
	}
	set, err := rules.Compile(rs, rules.Options{})
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, f := range []*rules.Flow{
		{Proto: rules.TCP, Dst: netip.MustParseAddrPort("10.1.2.3:22")},
		{Proto: rules.TCP, Dst: netip.MustParseAddrPort("203.0.113.5:443"), Name: "WWW.Example.COM."},
		{Proto: rules.UDP, Dst: netip.MustParseAddrPort("203.0.113.5:443"), Name: "cdn12.net"},
		{Proto: rules.UDP, Dst: netip.MustParseAddrPort("203.0.113.5:53")},
	} {
		if _, r := set.Match(f); r != nil {
			fmt.Printf("%s %s: %s by %s\n", f.Dst, f.Name, r.Action, r.Label())
		} else {
			fmt.Printf("%s %s: default upstream\n", f.Dst, f.Name)
		}
	}
	a, ok := set.MatchName("tracker.ads.example")
	fmt.Println("tracker.ads.example:", a, ok)
	// Output:
	// 10.1.2.3:22 : direct by rule 2 "cidr:10.0.0.0/8,net:tcp=direct"
	// 203.0.113.5:443 WWW.Example.COM.: proxy:eu by rule 3 "suffix:example.com,port:443=proxy:eu"
	// 203.0.113.5:443 cdn12.net: proxy by rule 4 "regex:^cdn[0-9]{1,3}\\.net$=proxy"
	// 203.0.113.5:53 : default upstream
	// tracker.ads.example: reject true
}

func ExampleParse() {
	r, err := rules.Parse("Domain:WWW.Example.COM.,port:8000-8080=proxy:a")
	fmt.Println(err)
	r, err = rules.Parse("domain:WWW.Example.COM.,port:8000-8080=proxy:a")
	fmt.Println(r, err)
	_, err = rules.Parse("port:99999=direct")
	fmt.Println(err)
	// Output:
	// rule "Domain:WWW.Example.COM.,port:8000-8080=proxy:a": unknown MATCH kind "Domain" in "Domain:WWW.Example.COM." (want cidr, domain, suffix, keyword, regex, port, net, src, uid, exe or list)
	// domain:www.example.com,port:8000-8080=proxy:a <nil>
	// rule "port:99999=direct": port 99999 out of range 1-65535
}
