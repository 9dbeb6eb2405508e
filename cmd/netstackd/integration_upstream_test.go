package main_test

// The upstreams other than SOCKS5: an HTTP CONNECT proxy (tinyproxy) and
// SOCKS4 (Dante, which answers SOCKS4 on its SOCKS5 port).

import (
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// upstreamDownloadSize is the size of the download checked by SHA-256.
const upstreamDownloadSize = 5 << 20

// TestIntegrationUpstream fetches a small page and a 5 MB body through
// tinyproxy (--proxy http://) and through Dante as a SOCKS4 server
// (--proxy socks4://), and wants a refused target to reach the client as a
// refusal within refuseWithin.
func TestIntegrationUpstream(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tiny := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.TinyproxyPort)
	tinyproxy := tp.StartTinyproxy(t, tiny)
	dante := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort)
	danted := tp.StartDanteUDP(t, dante)

	for _, mode := range []struct {
		name  string
		args  []string
		proxy *netnstest.Process
		// seen is what the proxy logs for a connection to the HTTP server:
		// the daemon namespace could reach it without the proxy.
		seen string
	}{
		{"http-connect", []string{"--proxy", "http://" + tiny.String()}, tinyproxy,
			"CONNECT " + serverAddr(netnstest.ServerIPv4, netnstest.HTTPPort)},
		{"socks4", []string{"--proxy", "socks4://" + dante.String()}, danted,
			"192.0.2.2.8080"},
	} {
		t.Run(mode.name, func(t *testing.T) {
			d := startNetstackd(t, tp, append(mode.args, "--dns", "off")...)
			t.Run("get", func(t *testing.T) {
				testGet(t, tp, netnstest.ServerIPv4)
				if log := mode.proxy.Log(); !strings.Contains(log, mode.seen) {
					t.Errorf("%s did not log %q: the flow did not go through it:\n%s", mode.proxy, mode.seen, log)
				}
			})
			if mode.name == "socks4" {
				// SOCKS4 carries IPv4 addresses only: the flow is refused.
				t.Run("ipv6-refused", func(t *testing.T) {
					r := curl(t, tp, 10*time.Second, httpURL(netnstest.ServerIPv6, "/"))
					if r.ExitCode != 7 || r.Elapsed > refuseWithin {
						t.Errorf("GET over IPv6 through SOCKS4: exit %d after %v, want 7 within %v: %s",
							r.ExitCode, r.Elapsed.Round(time.Millisecond), refuseWithin, r)
					}
				})
			} else {
				t.Run("get-ipv6", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv6) })
			}
			t.Run("download-5MB", func(t *testing.T) { testDownload(t, tp, upstreamDownloadSize) })
			t.Run("refused", func(t *testing.T) { testRefused(t, tp, netnstest.ServerIPv4) })
			t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
		})
	}
}
