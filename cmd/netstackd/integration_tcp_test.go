package main_test

import (
	"context"
	"errors"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// TestIntegrationTCPFlags runs netstackd with every TCP setting away from its
// default: the daemon logs what it handed to the stack, and bulk transfers
// both ways and both families still arrive intact with them.
func TestIntegrationTCPFlags(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	d := startNetstackd(t, tp, "--tcp-rmem", "4K,64K,4M", "--tcp-wmem", "8K,256K,16M", "--tcp-cc", "cubic",
		"--tcp-sack=false", "--tcp-rack=false", "--tcp-moderate-rcvbuf=false", "--tcp-nagle")
	const want = `msg="tcp settings" rmem=4096,65536,4194304 wmem=8192,262144,16777216 cc=cubic sack=false moderate_rcvbuf=false rack=false nagle=true`
	if log := d.Log(); !strings.Contains(log, want) {
		t.Errorf("daemon log lacks %q:\n%s", want, log)
	}
	t.Run("get-ipv4", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv4) })
	t.Run("get-ipv6", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv6) })
	t.Run("download-20MB", func(t *testing.T) { testDownload(t, tp, 20<<20) })
	t.Run("upload-10MB", func(t *testing.T) { testUpload(t, tp, 10<<20) })
}

// TestIntegrationBadTCPFlags: the binary refuses bad TCP settings with one
// line and exit status 2, before it creates anything.
func TestIntegrationBadTCPFlags(t *testing.T) {
	requireBinary(t)
	for _, tc := range []struct {
		name string
		args []string
	}{
		{"rmem-two-numbers", []string{"--tcp-rmem", "4K,8M"}},
		{"rmem-order", []string{"--tcp-rmem", "1M,4K,8M"}},
		{"wmem-suffix", []string{"--tcp-wmem", "4K,128KB,8M"}},
		{"cc-unknown", []string{"--tcp-cc", "bbr"}},
		{"sack-not-bool", []string{"--tcp-sack=sometimes"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ns := netnstest.NewNetns(t)
			r := ns.Exec(t, 10*time.Second, append([]string{netstackdBin}, tc.args...)...)
			stderr := strings.TrimSuffix(r.Stderr, "\n")
			if r.ExitCode != 2 || !strings.Contains(stderr, strings.TrimPrefix(strings.SplitN(tc.args[0], "=", 2)[0], "--")) || strings.Contains(stderr, "\n") {
				t.Errorf("netstackd %s: exit %d, stderr %q; want exit 2 and one line naming the flag", strings.Join(tc.args, " "), r.ExitCode, r.Stderr)
			}
			ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
			defer cancel()
			if ok, err := ns.HasLink(ctx, tunName); ok || err != nil {
				t.Errorf("a bad flag left %s in the namespace (err %v)", tunName, err)
			}
		})
	}
}

// TestIntegrationAcceptFirst runs netstackd with --tcp-handshake
// accept-first, direct and through microsocks: flows work both ways, and a
// port where nothing listens, which the default refuses, is a connection
// that opens and is then reset within refuseWithin. (curl is not asked
// about that port: a reset that lands before it sees its connect complete
// reads to curl as a refusal, so its answer could not tell the two orders
// apart.)
func TestIntegrationAcceptFirst(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartMicrosocks(t, socks4)
	for _, mode := range []struct {
		name string
		args []string
	}{
		{"direct", nil},
		{"microsocks", []string{"--socks", socks4.String()}},
	} {
		t.Run(mode.name, func(t *testing.T) {
			d := startNetstackd(t, tp, append([]string{"--tcp-handshake", "accept-first"}, mode.args...)...)
			if log := d.Log(); !strings.Contains(log, "handshake=accept-first") {
				t.Errorf("daemon log lacks handshake=accept-first:\n%s", log)
			}
			t.Run("get-ipv4", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv4) })
			t.Run("get-ipv6", func(t *testing.T) { testGet(t, tp, netnstest.ServerIPv6) })
			t.Run("download-20MB", func(t *testing.T) { testDownload(t, tp, 20<<20) })
			t.Run("upload-10MB", func(t *testing.T) { testUpload(t, tp, 10<<20) })
			for _, ip := range []netip.Addr{netnstest.ServerIPv4, netnstest.ServerIPv6} {
				addr := serverAddr(ip, netnstest.ClosedPort)
				t.Run("closed-port-go-"+ip.String(), func(t *testing.T) { expectResetAfterConnect(t, tp, addr) })
			}
		})
	}
}

// expectResetAfterConnect dials addr from the client namespace and wants
// the handshake to complete and the connection then reset (ECONNRESET)
// within refuseWithin, not refused. The reset may come so soon that the
// kernel reports it as connect's result instead of the first read's.
func expectResetAfterConnect(t *testing.T, tp *netnstest.Topology, addr string) {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	start := time.Now()
	c, err := tp.Client.DialContext(ctx, "tcp", addr)
	if errors.Is(err, syscall.ECONNRESET) && time.Since(start) <= refuseWithin {
		return
	}
	if err != nil {
		t.Fatalf("dial %s: %v, want the connect to succeed (or be reset) before the upstream refuses", addr, err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(refuseWithin))
	n, err := c.Read(make([]byte, 1))
	if !errors.Is(err, syscall.ECONNRESET) || time.Since(start) > refuseWithin {
		t.Errorf("read from %s: %d bytes, %v after %v; want ECONNRESET within %v", addr, n, err, time.Since(start).Round(time.Millisecond), refuseWithin)
	}
}
