package main_test

// Issue 16: several upstreams with failover, against two real microsocks.

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// healthInterval is the daemon's health-check interval (httpapi.go): the
// bound on seeing an upstream go down by its check, or come back.
const healthInterval = 5 * time.Second

// upstreamState is an entry of GET /upstreams.
type upstreamState struct {
	Name  string `json:"name"`
	URL   string `json:"url"`
	State string `json:"state"`
	Error string `json:"error"`
}

// TestIntegrationFailover: with upstreams a and b (two microsocks), new
// flows go through a; a download through a that hangs (a stopped, its
// sockets open) is reset once a's health check fails, and new flows go
// through b; a back is used again within the health interval; a killed
// moves the very next flow to b; both killed refuse new flows at once and
// turn /healthz to 503 naming both.
func TestIntegrationFailover(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	addrA := socks4
	addrB := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort+10)
	a := tp.StartMicrosocks(t, addrA)
	b := tp.StartMicrosocks(t, addrB)
	startNetstackd(t, tp, "--proxy", "a=socks5://"+addrA.String(), "--proxy", "b=socks5://"+addrB.String(),
		"--dns", "off", "--dial-timeout", "2s", "--metrics", fmt.Sprint(metricsPort))
	m := newMetricsClient(tp)
	states := func() map[string]upstreamState {
		t.Helper()
		code, body := m.get(t, "/upstreams")
		var list []upstreamState
		if err := json.Unmarshal([]byte(body), &list); err != nil || code != http.StatusOK {
			t.Fatalf("GET /upstreams: %d %q: %v", code, body, err)
		}
		out := map[string]upstreamState{}
		for _, u := range list {
			out[u.Name] = u
		}
		return out
	}
	// waitState polls /upstreams until name is in state, within bound,
	// and returns how long that took.
	waitState := func(name, state string, bound time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		ctx := netnstest.TestContext(t, bound)
		var last map[string]upstreamState
		err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
			last = states()
			return last[name].State == state, nil
		})
		if err != nil {
			t.Fatalf("upstream %s not %s within %v: %+v", name, state, bound, last)
		}
		return time.Since(start)
	}
	// via makes one GET and returns which upstream's dial count grew.
	dials := func(s metricSet, name string) float64 {
		return s.value("netstackd_upstream_dials_total", "upstream", name, "result", "ok")
	}
	via := func() string {
		t.Helper()
		before := m.scrape(t)
		testGet(t, tp, netnstest.ServerIPv4)
		after := m.scrape(t)
		var went []string
		for _, n := range []string{"a", "b"} {
			if dials(after, n) > dials(before, n) {
				went = append(went, n)
			}
		}
		return strings.Join(went, ",")
	}

	waitState("a", "up", 10*time.Second)
	waitState("b", "up", 10*time.Second)
	if got := via(); got != "a" {
		t.Fatalf("GET with both up went via %q, want a", got)
	}

	t.Run("hung-upstream-resets-its-flows", func(t *testing.T) {
		ctx := netnstest.TestContext(t, 60*time.Second)
		dl := startSlowDownload(t, tp)
		// Bytes flowing through a, not only connected.
		err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
			_, body := m.get(t, "/flows")
			var flows []liveFlow
			if err := json.Unmarshal([]byte(body), &flows); err != nil {
				return false, err
			}
			return len(flows) == 1 && flows[0].DownBytes > 64<<10, nil
		})
		if err != nil {
			t.Fatalf("the download never showed in /flows: %v", err)
		}
		// Stopped, microsocks keeps its sockets open: without the reset
		// the download would hang until curl's --max-time.
		if err := a.Signal(syscall.SIGSTOP); err != nil {
			t.Fatalf("stop %s: %v", a, err)
		}
		bound := healthInterval + 2*time.Second + 3*time.Second // interval, probe timeout (--dial-timeout), slack
		took := dl.waitReset(t, "a was stopped", bound)
		t.Logf("download through a reset %v after a was stopped: %s", took.Round(time.Millisecond), strings.TrimSpace(dl.stderr.String()))
		if s := states()["a"]; s.State != "down" || s.Error == "" {
			t.Errorf("a after its health check failed: %+v, want down with a reason", s)
		}
		if got := via(); got != "b" {
			t.Errorf("GET with a down went via %q, want b", got)
		}
	})

	// a killed (it was stopped) and started again at the same address.
	if _, err := a.Stop(syscall.SIGKILL, netnstest.StopGrace); err != nil {
		t.Fatalf("kill %s: %v", a, err)
	}
	waitState("a", "down", 2*healthInterval)
	a = tp.StartMicrosocks(t, addrA)
	took := waitState("a", "up", healthInterval+2*time.Second)
	t.Logf("a back in use %v after it listened again (interval %v)", took.Round(time.Millisecond), healthInterval)
	if got := via(); got != "a" {
		t.Errorf("GET after a returned went via %q, want a", got)
	}

	// Killed, a refuses connections: the very next flow moves to b.
	if _, err := a.Stop(syscall.SIGKILL, netnstest.StopGrace); err != nil {
		t.Fatalf("kill %s: %v", a, err)
	}
	start := time.Now()
	if got := via(); got != "b" {
		t.Errorf("GET right after a was killed went via %q, want b", got)
	}
	t.Logf("first GET after a was killed went via b, %v after the kill", time.Since(start).Round(time.Millisecond))

	if _, err := b.Stop(syscall.SIGKILL, netnstest.StopGrace); err != nil {
		t.Fatalf("kill %s: %v", b, err)
	}
	for i := range 2 { // the first finds b down by dialing it, the second at once
		r := curl(t, tp, 10*time.Second, httpURL(netnstest.ServerIPv4, "/"))
		if r.ExitCode != 7 || r.Elapsed > time.Second {
			t.Errorf("curl %d with every upstream down: exit %d after %v, want 7 (refused) within 1s: %s", i, r.ExitCode, r.Elapsed.Round(time.Millisecond), r)
		}
		t.Logf("curl %d with every upstream down: exit %d after %v", i, r.ExitCode, r.Elapsed.Round(time.Millisecond))
	}
	// UDP: the association fails at once, and its datagrams get ICMP
	// port unreachable.
	start = time.Now()
	udpRefused(t, tp.Client, netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort))
	t.Logf("udp with every upstream down: refused after %v", time.Since(start).Round(time.Millisecond))
	code, body := m.get(t, "/healthz")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "a (socks5://"+addrA.String()) || !strings.Contains(body, "b (socks5://"+addrB.String()) {
		t.Errorf("/healthz with every upstream down: %d %q, want 503 naming a and b", code, body)
	}
	s := m.scrape(t)
	for _, n := range []string{"a", "b"} {
		if v := s.value("netstackd_upstream_up", "upstream", n); v != 0 {
			t.Errorf("upstream_up{upstream=%q} = %v with it dead, want 0", n, v)
		}
	}
}

// waitProxyBack waits until d's health check has found the proxy back, its
// n-th "proxy answers" line: until then new flows are refused at once. The
// check runs every 5s.
func waitProxyBack(t *testing.T, d *netnstest.Process, n int) {
	t.Helper()
	ctx := netnstest.TestContext(t, 5*time.Second+refuseWithin)
	err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
		return strings.Count(d.Log(), `msg="proxy answers"`) >= n, nil
	})
	if err != nil {
		t.Fatalf("the proxy's health check never found it back: %v\n%s", err, d.Log())
	}
}
