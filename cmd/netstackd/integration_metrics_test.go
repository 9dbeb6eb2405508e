package main_test

// Issue 16: the --metrics listener of a netstackd relaying through
// microsocks. Its counters are scraped and parsed, never grepped: each
// must move by exactly what the test did.

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// metricsPort is where the test's netstackd listens, on the daemon
// namespace's loopback (a bare port means 127.0.0.1).
const metricsPort = 9464

// metricsClient reaches the metrics listener from inside the daemon
// namespace, where netstackd runs.
type metricsClient struct {
	c    *http.Client
	base string
}

func newMetricsClient(tp *netnstest.Topology) *metricsClient {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			return tp.Daemon.DialContext(ctx, network, addr)
		},
		DisableKeepAlives: true, // nothing left open for goleak
	}
	return &metricsClient{c: &http.Client{Transport: tr, Timeout: 10 * time.Second}, base: fmt.Sprintf("http://127.0.0.1:%d", metricsPort)}
}

func (m *metricsClient) get(t *testing.T, path string) (int, string) {
	t.Helper()
	resp, err := m.c.Get(m.base + path)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: %v", path, err)
	}
	return resp.StatusCode, string(b)
}

// scrape fetches /metrics and parses it, and logs how long that took.
func (m *metricsClient) scrape(t *testing.T) metricSet {
	t.Helper()
	start := time.Now()
	code, body := m.get(t, "/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse /metrics: %v\n%s", err, body)
	}
	t.Logf("scrape: %d families, %d bytes in %v", len(fams), len(body), time.Since(start).Round(time.Microsecond))
	return metricSet(fams)
}

type metricSet map[string]*dto.MetricFamily

// value is the counter, gauge or histogram count of the series of name
// whose labels include the pairs in labels; -1 if there is none.
func (s metricSet) value(name string, labels ...string) float64 {
	f := s[name]
	if f == nil {
		return -1
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(labels); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				found = found || l.GetName() == labels[i] && l.GetValue() == labels[i+1]
			}
			if !found {
				continue next
			}
		}
		switch {
		case m.Counter != nil:
			return m.GetCounter().GetValue()
		case m.Gauge != nil:
			return m.GetGauge().GetValue()
		case m.Histogram != nil:
			return float64(m.GetHistogram().GetSampleCount())
		}
	}
	return -1
}

// TestIntegrationMetrics: flows through microsocks move the flow, byte and
// dial-latency metrics by exactly the flows made; refused destinations
// move the dial error counter for "refused"; fake-ip answers move the DNS
// counters and the pool's use; /healthz is 200 while
// microsocks answers and 503 once it is killed, within the probe interval;
// --pprof serves /debug/pprof/.
func TestIntegrationMetrics(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	socks := tp.StartMicrosocks(t, socks4)
	// fake-ip mode (the default with a proxy): A queries are answered
	// from the pool, the upstream resolver is never asked.
	startNetstackd(t, tp, "--proxy", "socks5://"+socks4.String(), "--dns-upstream", dnsUpstream.String(),
		"--metrics", fmt.Sprint(metricsPort), "--pprof")
	m := newMetricsClient(tp)
	via := []string{"mode", "proxy", "upstream", "proxy1"}

	before := m.scrape(t)
	const flows = 5
	for range flows {
		testGet(t, tp, netnstest.ServerIPv4)
	}
	// A flow's bytes are counted once both its directions have ended,
	// a moment after curl has its answer.
	var after metricSet
	ctx := netnstest.TestContext(t, 10*time.Second)
	wantTotal := before.value("netstackd_flows_total", append(via, "protocol", "tcp")...) + flows
	err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
		after = m.scrape(t)
		return after.value("netstackd_flows_active", "protocol", "tcp") == 0 &&
			after.value("netstackd_flows_total", "protocol", "tcp") == wantTotal, nil
	})
	if err != nil {
		t.Errorf("tcp flows: total %v active %v, want total %v and none active: %v",
			after.value("netstackd_flows_total", "protocol", "tcp"), after.value("netstackd_flows_active", "protocol", "tcp"), wantTotal, err)
	}
	delta := func(name string, labels ...string) float64 {
		return after.value(name, labels...) - before.value(name, labels...)
	}
	for _, name := range []string{"netstackd_dial_duration_seconds", "netstackd_connect_duration_seconds"} {
		if d := delta(name, via...); d != flows {
			t.Errorf("%s grew by %v observations, want %d", name, d, flows)
		}
	}
	// Each GET moves its request up and the reply (headers and
	// HelloBody) down.
	if up, down := delta("netstackd_bytes_total", "direction", "up"), delta("netstackd_bytes_total", "direction", "down"); up < flows*40 || down < flows*float64(len(netnstest.HelloBody)) {
		t.Errorf("bytes up %v down %v for %d GETs, want at least %d up and %d down", up, down, flows, flows*40, flows*len(netnstest.HelloBody))
	}

	const refused = 3
	addr := serverAddr(netnstest.ServerIPv4, netnstest.ClosedPort)
	for range refused {
		expectRefused(t, tp, addr)
	}
	before, after = after, m.scrape(t)
	if d := delta("netstackd_dial_errors_total", append(via, "reason", "refused")...); d != refused {
		t.Errorf("dial errors for reason refused grew by %v after %d refused flows, want %d", d, refused, refused)
	}
	if d := delta("netstackd_flows_total", "protocol", "tcp"); d != 0 {
		t.Errorf("refused flows counted as flows: total grew by %v", d)
	}

	for _, name := range []string{"one.test", "two.test", "one.test"} {
		digAddr(t, tp, dnsAddr, name, "A")
	}
	before, after = after, m.scrape(t)
	if d := delta("netstackd_dns_queries_total", "mode", "fake-ip", "answer", "fake"); d != 3 {
		t.Errorf("fake DNS answers grew by %v after 3 A queries, want 3", d)
	}
	if d := delta("netstackd_dns_fake_ip_pool_used", "family", "ipv4"); d != 2 {
		t.Errorf("fake-IP pool use grew by %v after 2 names, want 2", d)
	}

	if code, body := m.get(t, "/debug/pprof/"); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with --pprof: %d, want 200 with the profile list", code)
	}
	if code, body := m.get(t, "/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz with microsocks up: %d %q, want 200 ok", code, body)
	}
	if after.value("netstackd_upstream_up", via...) != 1 {
		t.Errorf("netstackd_upstream_up = %v with microsocks up, want 1", after.value("netstackd_upstream_up"))
	}

	if _, err := socks.Stop(syscall.SIGKILL, time.Second); err != nil {
		t.Fatalf("kill %s: %v", socks, err)
	}
	killed := time.Now()
	// The probe runs every 5s and gives up after the dial timeout at
	// most; a refused connection answers at once.
	ctx = netnstest.TestContext(t, 10*time.Second)
	var code int
	var body string
	err = netnstest.Poll(ctx, 100*time.Millisecond, func() (bool, error) {
		code, body = m.get(t, "/healthz")
		return code == http.StatusServiceUnavailable, nil
	})
	if err != nil || !strings.Contains(body, socks4.String()) {
		t.Fatalf("/healthz after microsocks was killed: %d %q, want 503 naming the proxy (%v)", code, body, err)
	}
	t.Logf("/healthz said %q %v after microsocks was killed", strings.TrimSpace(body), time.Since(killed).Round(time.Millisecond))
	if v := m.scrape(t).value("netstackd_upstream_up", via...); v != 0 {
		t.Errorf("netstackd_upstream_up = %v with microsocks dead, want 0", v)
	}
}

// TestIntegrationMetricsRun: `netstackd run` serves --metrics too, in
// netstackd's own namespace, while its program runs; direct mode is
// healthy.
func TestIntegrationMetricsRun(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	// The program fetches a page, then waits for the test to have seen it
	// in the metrics (a file the test creates), at most 20 s.
	scraped := filepath.Join(t.TempDir(), "scraped")
	script := fmt.Sprintf("curl -sS -g --max-time %s %s >/dev/null || exit 3; for i in $(seq 400); do [ -e %s ] && exit 0; sleep 0.05; done; exit 4",
		curlMaxTime, httpURL(netnstest.ServerIPv4, "/"), scraped)
	ran := make(chan *netnstest.Result, 1)
	go func() {
		ran <- runNetstackd(t, tp, nil, "--dns", "off", "--metrics", fmt.Sprint(metricsPort), "--", "sh", "-c", script)
	}()
	m := newMetricsClient(tp)
	ctx := netnstest.TestContext(t, 20*time.Second)
	var last string
	err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
		resp, err := m.c.Get(m.base + "/metrics")
		if err != nil {
			last = err.Error()
			return false, nil // not listening yet
		}
		defer resp.Body.Close()
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(resp.Body)
		if err != nil {
			return false, err
		}
		s := metricSet(fams)
		last = fmt.Sprintf("flows_total %v", s.value("netstackd_flows_total", "protocol", "tcp", "mode", "direct", "upstream", "direct"))
		return s.value("netstackd_flows_total", "protocol", "tcp", "mode", "direct", "upstream", "direct") == 1, nil
	})
	if err != nil {
		t.Errorf("the program's flow never showed in /metrics (last: %s): %v", last, err)
	} else if code, body := m.get(t, "/healthz"); code != http.StatusOK {
		t.Errorf("/healthz in run, direct: %d %q, want 200", code, body)
	}
	if err := os.WriteFile(scraped, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := <-ran; r.ExitCode != 0 {
		t.Errorf("run: exit %d, want 0: %s", r.ExitCode, r)
	}
}
