package netnstest_test

import (
	"bytes"
	"context"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/miekg/dns"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// The helpers for UDP, DNS and the other proxies are checked without
// netstackd, from the daemon namespace, which reaches the server namespace
// over the veth.
func TestHelpers(t *testing.T) {
	tp := netnstest.New(t)
	tp.StartServers(t)
	hello := "http://" + netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.HTTPPort).String() + "/"
	curl := func(args ...string) *netnstest.Result {
		t.Helper()
		a := append([]string{"curl", "-sS", "-g", "--max-time", "10"}, args...)
		return tp.Daemon.Exec(t, 15*time.Second, a...)
	}

	t.Run("udp-echo", func(t *testing.T) {
		at := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort)
		e := tp.StartUDPEcho(t, at)
		ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
		defer cancel()
		c, err := tp.Daemon.DialContext(ctx, "udp", at.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("ping over udp")
		if _, err := c.Write(msg); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 100)
		n, err := c.Read(buf)
		if err != nil || !bytes.Equal(buf[:n], msg) {
			t.Fatalf("echo = %q, %v; want %q", buf[:n], err, msg)
		}
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		if got := e.Sources(at); len(got) != 1 || got[0] != local {
			t.Errorf("sources %v, want [%s]", got, local)
		}
	})

	t.Run("dnsmasq", func(t *testing.T) {
		want := netip.MustParseAddr("192.0.2.123")
		tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{"name.test": want})
		r, err := tp.Daemon.Query(t.Context(), netip.AddrPortFrom(netnstest.ServerIPv4, 53), "x.name.test", dns.TypeA, true)
		if err != nil || len(r.Answer) != 1 || r.Answer[0].(*dns.A).A.String() != want.String() {
			t.Fatalf("x.name.test over TCP: %v, %v; want %s", r, err, want)
		}
		// A resolv.conf for the daemon namespace: programs started there
		// afterwards resolve through dnsmasq.
		tp.Daemon.SetResolvConf(t, netnstest.ServerIPv4)
		g := tp.Daemon.Exec(t, 15*time.Second, "getent", "ahostsv4", "name.test")
		if g.Err != nil || !strings.HasPrefix(g.Stdout, want.String()+" ") {
			t.Errorf("getent with the namespace's resolv.conf: %s", g)
		}
	})

	t.Run("logging-socks5", func(t *testing.T) {
		at := netip.AddrPortFrom(netnstest.ServerIPv4, 1090)
		s := tp.StartLoggingSOCKS5(t, at, map[string]netip.Addr{"srv.test": netnstest.ServerIPv4})
		if r := curl("-x", "socks5h://"+at.String(), "http://srv.test:8080/"); r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET by name: %s", r)
		}
		if r := curl("-x", "socks5://"+at.String(), hello); r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET by address: %s", r)
		}
		if r := curl("-x", "socks5h://"+at.String(), "http://unknown.test:8080/"); r.Err == nil {
			t.Errorf("GET of a name the server does not know succeeded: %s", r)
		}
		want := []netnstest.SOCKS5Request{
			{ATYP: netnstest.ATYPDomain, Host: "srv.test", Port: 8080},
			{ATYP: netnstest.ATYPIPv4, Host: netnstest.ServerIPv4.String(), Port: 8080},
			{ATYP: netnstest.ATYPDomain, Host: "unknown.test", Port: 8080},
		}
		got := s.Requests()
		if len(got) != len(want) {
			t.Fatalf("requests %v, want %v", got, want)
		}
		for i := range want {
			if got[i] != want[i] {
				t.Errorf("request %d: %v, want %v", i, got[i], want[i])
			}
		}
	})

	t.Run("tinyproxy", func(t *testing.T) {
		at := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.TinyproxyPort)
		tp.StartTinyproxy(t, at)
		if r := curl("-p", "-x", "http://"+at.String(), hello); r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Errorf("GET through CONNECT: %s", r)
		}
	})

	t.Run("dante-udp", func(t *testing.T) {
		at := netip.AddrPortFrom(netnstest.ServerIPv4, 1082)
		tp.StartDanteUDP(t, at)
		for _, scheme := range []string{"socks5", "socks4"} {
			if r := curl("-x", scheme+"://"+at.String(), hello); r.Err != nil || r.Stdout != netnstest.HelloBody {
				t.Errorf("GET through %s: %s", scheme, r)
			}
		}
	})

	t.Run("in-echos", func(t *testing.T) {
		for _, ip := range []netip.Addr{netnstest.ServerIPv4, netnstest.ServerIPv6} {
			before := tp.Server.InEchos(t, ip.Is6())
			if r := tp.Daemon.Exec(t, 15*time.Second, "ping", "-n", "-c", "2", "-i", "0.2", "-W", "2", ip.String()); r.Err != nil {
				t.Fatalf("ping: %s", r)
			}
			if d := tp.Server.InEchos(t, ip.Is6()) - before; d != 2 {
				t.Errorf("ping %s twice: the counter went up by %d", ip, d)
			}
		}
	})
}
