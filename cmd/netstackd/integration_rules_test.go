package main_test

// Issue 17: routing rules, end to end, against real SOCKS5 servers, real
// curl (plain HTTP, TLS with --resolve) and a real QUIC client.

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/quic"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// Where the rules test's servers listen in the server namespace.
var (
	rulesSocksA = netip.AddrPortFrom(netnstest.ServerIPv4, 1081)
	rulesSocksB = netip.AddrPortFrom(netnstest.ServerIPv4, 1082)
)

const (
	rulesTLSPort    = 8443
	rulesQUICPort   = 4433
	rulesRejectPort = 9999
	// rejectWithin is how fast a rejected connect must fail: a reset in
	// reply to the SYN, nothing dialed.
	rejectWithin = 50 * time.Millisecond
)

// rulesFlow is an entry of GET /flows with the routing fields.
type rulesFlow struct {
	Proto       string `json:"proto"`
	Destination string `json:"destination"`
	Name        string `json:"name"`
	NameFrom    string `json:"name_from"`
	Via         string `json:"via"`
	Rule        string `json:"rule"`
	State       string `json:"state"`
}

// TestIntegrationRules: one rule list sends a domain through one SOCKS5
// server and an address range through another, a port direct and another
// rejected (TCP reset within 50 ms, UDP port unreachable); a client that
// connects by address is routed by the name in its TLS ClientHello, its
// HTTP Host header or its QUIC Initial, and the proxy is asked for that
// name; a reload with changed rules moves new flows and leaves a live one
// alone.
func TestIntegrationRules(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.Client.SetResolvConf(t, dnsAddr)
	hosts := map[string]netip.Addr{"one.test": netnstest.ServerIPv4, "sni.test": netnstest.ServerIPv4, "host.test": netnstest.ServerIPv4}
	socksA := tp.StartLoggingSOCKS5(t, rulesSocksA, hosts)
	socksB := tp.StartLoggingSOCKS5(t, rulesSocksB, hosts)
	startTLSServer(t, tp, netip.AddrPortFrom(netnstest.ServerIPv4, rulesTLSPort))
	udp := tp.StartUDPEcho(t, netip.AddrPortFrom(netnstest.ServerIPv4, rulesQUICPort))

	dir := t.TempDir()
	config := filepath.Join(dir, "netstackd.toml")
	writeRules := func(rules ...string) {
		t.Helper()
		q := make([]string, len(rules))
		for i, r := range rules {
			q[i] = fmt.Sprintf("%q", r)
		}
		body := fmt.Sprintf("proxy = [%q, %q]\ndns-upstream = %q\nrule = [%s]\n",
			"a=socks5://"+rulesSocksA.String(), "b=socks5://"+rulesSocksB.String(), dnsUpstream.String(), strings.Join(q, ", "))
		if err := os.WriteFile(config, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	// Order matters: the port rules come first, so that those flows are
	// decided without a name (no sniffing, no handshake before the
	// decision); names come before the address range, which catches what
	// gave no name.
	writeRules(
		fmt.Sprintf("port:%d=reject", rulesRejectPort),
		fmt.Sprintf("port:%d=direct", netnstest.EchoPort),
		"domain:host.test=proxy:a",
		"domain:sni.test=proxy:a",
		"domain:quic.test,net:udp=reject",
		"domain:other.test,net:udp=direct",
		"suffix:one.test=proxy:a",
		"cidr:192.0.2.0/25,port:8080=proxy:b",
	)
	d := startNetstackd(t, tp, "--config", config, "--metrics", fmt.Sprint(metricsPort))
	api := newMetricsClient(tp)

	requested := func(s *netnstest.LoggingSOCKS5, host string, port uint16) bool {
		for _, r := range s.Requests() {
			if r.Host == host && r.Port == port {
				return true
			}
		}
		return false
	}

	t.Run("domain-via-a", func(t *testing.T) {
		r := curl(t, tp, 10*time.Second, fmt.Sprintf("http://one.test:%d/", netnstest.HTTPPort))
		if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
			t.Fatalf("GET one.test: %s", r)
		}
		if !requested(socksA, "one.test", netnstest.HTTPPort) || requested(socksB, "one.test", netnstest.HTTPPort) {
			t.Errorf("one.test: a saw %v, b saw %v; want it on a only", socksA.Requests(), socksB.Requests())
		}
	})
	t.Run("range-via-b", func(t *testing.T) {
		testGet(t, tp, netnstest.ServerIPv4)
		if !requested(socksB, netnstest.ServerIPv4.String(), netnstest.HTTPPort) || requested(socksA, netnstest.ServerIPv4.String(), netnstest.HTTPPort) {
			t.Errorf("192.0.2.2: a saw %v, b saw %v; want it on b only", socksA.Requests(), socksB.Requests())
		}
	})
	t.Run("port-direct", func(t *testing.T) {
		before := len(socksA.Requests()) + len(socksB.Requests())
		r := tp.Client.ExecInput(t, 15*time.Second, strings.NewReader("ping\n"), "socat", "-t", "2", "-", fmt.Sprintf("TCP:%s", serverAddr(netnstest.ServerIPv4, netnstest.EchoPort)))
		if r.ExitCode != 0 || r.Stdout != "ping\n" {
			t.Fatalf("echo direct: %s", r)
		}
		if after := len(socksA.Requests()) + len(socksB.Requests()); after != before {
			t.Errorf("a proxy saw the direct flow: a %v, b %v", socksA.Requests(), socksB.Requests())
		}
	})
	t.Run("port-reject-tcp", func(t *testing.T) {
		dst := serverAddr(netnstest.ServerIPv4, rulesRejectPort)
		for range 5 {
			start := time.Now()
			c, err := tp.Client.DialContext(t.Context(), "tcp", dst)
			took := time.Since(start)
			if err == nil {
				c.Close()
				t.Fatal("connect to a rejected port succeeded")
			}
			if !errors.Is(err, syscall.ECONNREFUSED) || took > rejectWithin {
				t.Fatalf("connect to a rejected port: %v after %v, want ECONNREFUSED within %v", err, took, rejectWithin)
			}
			t.Logf("rejected in %v", took)
		}
	})
	t.Run("port-reject-udp", func(t *testing.T) {
		err := tp.Client.Do(func() error {
			c, err := net.Dial("udp", serverAddr(netnstest.ServerIPv4, rulesRejectPort))
			if err != nil {
				return err
			}
			defer c.Close()
			for range 10 {
				if _, err := c.Write([]byte("anyone?")); err != nil {
					return err
				}
				c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
				if _, err := c.Read(make([]byte, 64)); err != nil && !isTimeout(err) {
					return err
				}
			}
			return errors.New("no error after 10 datagrams")
		})
		if !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("UDP to a rejected port: %v, want ECONNREFUSED", err)
		}
	})
	t.Run("sniff-tls", func(t *testing.T) {
		r := curl(t, tp, 10*time.Second, "-k", "--resolve", fmt.Sprintf("sni.test:%d:%s", rulesTLSPort, netnstest.ServerIPv4),
			fmt.Sprintf("https://sni.test:%d/", rulesTLSPort))
		if r.ExitCode != 0 || r.Stdout != "tls ok\n" {
			t.Fatalf("GET https://sni.test: %s", r)
		}
		if !requested(socksA, "sni.test", rulesTLSPort) {
			t.Errorf("a was not asked for sni.test by name: %v", socksA.Requests())
		}
	})
	t.Run("sniff-http", func(t *testing.T) {
		r := curl(t, tp, 10*time.Second, "-H", "Host: host.test", httpURL(netnstest.ServerIPv4, "/"))
		if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
			t.Fatalf("GET with Host: host.test: %s", r)
		}
		if !requested(socksA, "host.test", netnstest.HTTPPort) {
			t.Errorf("a was not asked for host.test by name: %v", socksA.Requests())
		}
	})
	t.Run("sniff-quic", func(t *testing.T) {
		dst := netip.AddrPortFrom(netnstest.ServerIPv4, rulesQUICPort)
		quicDial(t, tp, dst, "other.test")
		if len(udp.Sources(dst)) == 0 {
			t.Fatal("the QUIC Initial for other.test did not reach the server: the control failed")
		}
		udp.Reset()
		quicDial(t, tp, dst, "quic.test")
		if n := len(udp.Sources(dst)); n != 0 {
			t.Errorf("the QUIC Initial for quic.test reached the server from %d sources: not rejected", n)
		}
		code, body := api.get(t, "/flows")
		var flows []rulesFlow
		if err := json.Unmarshal([]byte(body), &flows); err != nil || code != 200 {
			t.Fatalf("GET /flows: %d %v", code, err)
		}
		found := false
		for _, f := range flows {
			found = found || f.Proto == "udp" && f.Name == "quic.test" && f.NameFrom == "sniffed" && f.State == "rejected"
		}
		if !found {
			t.Errorf("no rejected udp flow named quic.test (sniffed) in /flows:\n%s", body)
		}
	})
	t.Run("metrics", func(t *testing.T) {
		m := api.scrape(t)
		if v := m.value("netstackd_rule_matches_total", "rule", "1"); v < 5 {
			t.Errorf("rule 1 (reject) matched %v times, want at least 5", v)
		}
	})
	t.Run("reload", func(t *testing.T) {
		// A slow download through a (one.test), running across a reload
		// that sends one.test to b.
		const size = 2 << 20
		out := filepath.Join(t.TempDir(), "download")
		ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
		defer cancel()
		aBefore := len(socksA.Requests())
		dl := tp.Client.Command(ctx, "curl", "-sS", "--limit-rate", "256K", "-o", out,
			fmt.Sprintf("http://one.test:%d/bytes?n=%d", netnstest.HTTPPort, size))
		if err := dl.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- dl.Wait() }()
		if err := netnstest.Poll(netnstest.TestContext(t, 10*time.Second), 20*time.Millisecond, func() (bool, error) {
			return len(socksA.Requests()) == aBefore+1, nil
		}); err != nil {
			t.Fatalf("the download did not go through a: %v", err)
		}
		writeRules("suffix:one.test=proxy:b")
		if err := d.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		if err := netnstest.Poll(netnstest.TestContext(t, 10*time.Second), 20*time.Millisecond, func() (bool, error) {
			return strings.Count(d.Log(), "msg=reloaded") >= 1, nil
		}); err != nil {
			t.Fatalf("no reload: %s", d.Log())
		}
		select {
		case err := <-done:
			t.Fatalf("the download ended (%v) before the reload: the test would prove nothing", err)
		default:
		}
		bBefore := len(socksB.Requests())
		r := curl(t, tp, 10*time.Second, fmt.Sprintf("http://one.test:%d/", netnstest.HTTPPort))
		if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
			t.Fatalf("GET one.test after the reload: %s", r)
		}
		if len(socksB.Requests()) != bBefore+1 || len(socksA.Requests()) != aBefore+1 {
			t.Errorf("after the reload: a saw %d new, b %d new; want the download on a and the new flow on b",
				len(socksA.Requests())-aBefore, len(socksB.Requests())-bBefore)
		}
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("the download across the reload failed: %v", err)
			}
		case <-ctx.Done():
			t.Fatal("the download did not finish")
		}
		if got, n := fileSHA256(t, out); got != netnstest.BytesSHA256(size) || n != size {
			t.Errorf("the download across the reload got %d bytes with sha256 %s", n, got)
		}
	})
}

// startTLSServer serves HTTPS in the server namespace with a certificate
// made now: every GET is answered "tls ok".
func startTLSServer(t *testing.T, tp *netnstest.Topology, at netip.AddrPort) {
	t.Helper()
	ln, err := tp.Server.Listen("tcp", at.String())
	if err != nil {
		t.Fatal(err)
	}
	tl := tls.NewListener(ln, &tls.Config{Certificates: []tls.Certificate{selfSigned(t, "sni.test")}})
	t.Cleanup(func() { tl.Close() })
	go func() {
		for {
			c, err := tl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(10 * time.Second))
				buf := make([]byte, 4096)
				if _, err := c.Read(buf); err != nil {
					return
				}
				fmt.Fprint(c, "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nConnection: close\r\n\r\ntls ok\n")
			}()
		}
	}()
}

func selfSigned(t *testing.T, name string) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name}, DNSNames: []string{name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// quicDial starts a real QUIC handshake (golang.org/x/net/quic) from the
// client namespace to dst for serverName; nothing answers QUIC there, so
// it gives up after a second: what matters is what its Initial packets
// did.
func quicDial(t *testing.T, tp *netnstest.Topology, dst netip.AddrPort, serverName string) {
	t.Helper()
	cfg := &quic.Config{TLSConfig: &tls.Config{ServerName: serverName, NextProtos: []string{"h3"}, MinVersion: tls.VersionTLS13}}
	var ep *quic.Endpoint
	if err := tp.Client.Do(func() error {
		var err error
		ep, err = quic.Listen("udp", "0.0.0.0:0", nil)
		return err
	}); err != nil {
		t.Fatalf("quic endpoint: %v", err)
	}
	defer func() {
		// Nothing answers: abandon the connection, do not wait to drain.
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		ep.Close(ctx)
	}()
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if c, err := ep.Dial(ctx, "udp", dst.String(), cfg); err == nil {
		c.Abort(nil)
		t.Fatalf("a QUIC handshake with %s completed: nothing should answer", dst)
	}
}

// TestIntegrationRulesOwner: in host-wide mode, in a test namespace, the
// flows of two local users take different upstreams by uid:, and a
// program's flows another by exe:, each looked up from the flow's socket.
func TestIntegrationRulesOwner(t *testing.T) {
	requireBinary(t)
	setpriv := netnstest.RequireCommand(t, "setpriv", "util-linux")
	socat := netnstest.RequireCommand(t, "socat", "socat")
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	proxyA := netip.AddrPortFrom(netnstest.ProxyIPv4, 1081)
	proxyB := netip.AddrPortFrom(netnstest.ProxyIPv4, 1082)
	socksA := tp.StartLoggingSOCKS5(t, proxyA, nil)
	socksB := tp.StartLoggingSOCKS5(t, proxyB, nil)
	p := startHostWide(t, tp, netstackdBin, "--dns", "off",
		"--proxy", "a=socks5://"+proxyA.String(), "--proxy", "b=socks5://"+proxyB.String(),
		"--rule", "uid:65534=proxy:b", "--rule", "exe:"+socat+"=proxy:b")
	defer stopHostWide(t, p)

	seen := func(s *netnstest.LoggingSOCKS5, port uint16) int {
		n := 0
		for _, r := range s.Requests() {
			if r.Port == port {
				n++
			}
		}
		return n
	}
	url := httpURL(netnstest.ServerIPv4, "/")
	// root's curl: no rule holds, the default upstream (a).
	wantBody(t, tp, url, netnstest.HelloBody)
	if a, b := seen(socksA, netnstest.HTTPPort), seen(socksB, netnstest.HTTPPort); a != 1 || b != 0 {
		t.Fatalf("root's curl: a saw %d, b %d; want a", a, b)
	}
	// nobody's curl: uid:65534 sends it to b.
	r := tp.Daemon.Exec(t, 15*time.Second, setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
		"curl", "-sS", "-g", "--max-time", "10", url)
	if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
		t.Fatalf("nobody's curl: %s", r)
	}
	if a, b := seen(socksA, netnstest.HTTPPort), seen(socksB, netnstest.HTTPPort); a != 1 || b != 1 {
		t.Fatalf("nobody's curl: a saw %d, b %d in all; want it on b", a, b)
	}
	// root's socat: exe: sends it to b.
	r = tp.Daemon.ExecInput(t, 15*time.Second, strings.NewReader("ping\n"), socat, "-t", "2", "-",
		"TCP:"+serverAddr(netnstest.ServerIPv4, netnstest.EchoPort))
	if r.ExitCode != 0 || r.Stdout != "ping\n" {
		t.Fatalf("socat: %s", r)
	}
	if a, b := seen(socksA, netnstest.EchoPort), seen(socksB, netnstest.EchoPort); a != 0 || b != 1 {
		t.Fatalf("socat: a saw %d, b %d; want it on b", a, b)
	}
}

// TestIntegrationRulesDNS: DNS follows the rules. A name the rules reject
// gets an empty answer at once, a name whose flows go direct its real
// address (looked up from netstackd's namespace, here from dnsmasq), and
// its flows go direct: the proxy never hears of them.
func TestIntegrationRulesDNS(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.Daemon.SetResolvConf(t, netnstest.ServerIPv4)
	tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{"direct.test": netnstest.ServerIPv4, "ads.test": netnstest.ServerIPv4})
	socks := tp.StartLoggingSOCKS5(t, rulesSocksA, map[string]netip.Addr{"other.test": netnstest.ServerIPv4})
	startNetstackd(t, tp, "--proxy", "socks5://"+rulesSocksA.String(), "--dns-upstream", dnsUpstream.String(),
		"--rule", "suffix:ads.test=reject", "--rule", "domain:direct.test=direct")

	start := time.Now()
	r := dig(t, tp, dnsAddr, "x.ads.test", "A")
	if r.ExitCode != 0 || strings.TrimSpace(r.Stdout) != "" {
		t.Errorf("x.ads.test: %s, want an empty answer", r)
	}
	t.Logf("rejected name answered in %v", time.Since(start).Round(time.Millisecond))
	if a := digAddr(t, tp, dnsAddr, "direct.test", "A"); a != netnstest.ServerIPv4 {
		t.Errorf("direct.test = %s, want its real address %s", a, netnstest.ServerIPv4)
	}
	if a := digAddr(t, tp, dnsAddr, "other.test", "A"); !fakeRange4.Contains(a) {
		t.Errorf("other.test = %s, want a fake address", a)
	}
	tp.Client.SetResolvConf(t, dnsAddr)
	r = curl(t, tp, 10*time.Second, fmt.Sprintf("http://direct.test:%d/", netnstest.HTTPPort))
	if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
		t.Fatalf("GET direct.test: %s", r)
	}
	for _, req := range socks.Requests() {
		if req.Host == "direct.test" || req.Host == netnstest.ServerIPv4.String() {
			t.Errorf("the proxy was asked for %v: the direct name's flow went through it", req)
		}
	}
}

// TestIntegrationRulesQUICName: a QUIC client that connects by address is
// routed by the server name in its Initial packets, and its datagrams reach
// the proxy by that name: Dante (UDP ASSOCIATE) resolves it, as dnsmasq's
// log shows, and relays them to the server.
func TestIntegrationRulesQUICName(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.Server.SetResolvConf(t, netnstest.ServerIPv4) // before Dante starts: how it resolves
	dnsmasq := tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{"quic.test": netnstest.ServerIPv4})
	dante := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort)
	tp.StartDanteUDP(t, dante)
	dst := netip.AddrPortFrom(netnstest.ServerIPv4, rulesQUICPort)
	udp := tp.StartUDPEcho(t, dst)
	startNetstackd(t, tp, "--proxy", "socks5://"+dante.String(), "--dns-upstream", dnsUpstream.String(),
		"--rule", "domain:quic.test,net:udp=proxy")

	quicDial(t, tp, dst, "quic.test")
	if len(udp.Sources(dst)) == 0 {
		t.Fatal("the QUIC client's datagrams did not reach the server through Dante")
	}
	if log := dnsmasq.Log(); !strings.Contains(log, "query[A] quic.test from "+netnstest.ServerIPv4.String()) {
		t.Errorf("Dante did not resolve quic.test: the proxy was not given the sniffed name:\n%s", log)
	}
}

// TestIntegrationRulesRemoteDNS: in direct mode (remote DNS), the name a
// client looked up through netstackd names the address it then connects
// to: a rule on the name decides, though the client connects by address and
// sends no name netstackd could sniff. Both names have one address: the
// last one looked up names it.
func TestIntegrationRulesRemoteDNS(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{"named.test": netnstest.ServerIPv4, "other.test": netnstest.ServerIPv4})
	tp.Client.SetResolvConf(t, dnsAddr)
	startNetstackd(t, tp, "--dns-upstream", dnsUpstream.String(), "--rule", "domain:named.test,net:tcp=reject")
	for _, tc := range []struct {
		name string
		exit int
	}{{"named.test", 7}, {"other.test", 0}, {"named.test", 7}} {
		r := curl(t, tp, 10*time.Second, fmt.Sprintf("http://%s:%d/", tc.name, netnstest.HTTPPort))
		if r.ExitCode != tc.exit {
			t.Errorf("GET %s: exit %d, want %d: %s", tc.name, r.ExitCode, tc.exit, r)
		}
	}
}
