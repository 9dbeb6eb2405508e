package main

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
)

func TestParseMetricsAddr(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		bad      bool
	}{
		{in: "9464", want: "127.0.0.1:9464"},
		{in: ":9464", want: "127.0.0.1:9464"},
		{in: "0", want: "127.0.0.1:0"},
		{in: "0.0.0.0:9464", want: "0.0.0.0:9464"},
		{in: "[::1]:9464", want: "[::1]:9464"},
		{in: "[::]:80", want: "[::]:80"},
		{in: "metrics.internal:9464", want: "metrics.internal:9464"},
		{in: "", bad: true},
		{in: "x", bad: true},
		{in: "65536", bad: true},
		{in: "::1:9464", bad: true},
		{in: "host:", bad: true},
		{in: "-1", bad: true},
	} {
		got, err := parseMetricsAddr(tc.in)
		if tc.bad != (err != nil) || !tc.bad && got != tc.want {
			t.Errorf("parseMetricsAddr(%q) = %q, %v; want %q (error: %v)", tc.in, got, err, tc.want, tc.bad)
		}
	}
}

func TestPprofNeedsMetrics(t *testing.T) {
	if _, err := parseFlags([]string{"--pprof"}, false, io.Discard); err == nil || !strings.Contains(err.Error(), "--metrics") {
		t.Errorf("--pprof alone: %v, want an error naming --metrics", err)
	}
	o, err := parseFlags([]string{"--pprof", "--metrics", ":9464"}, false, io.Discard)
	if err != nil || !o.pprof || o.metricsAddr != "127.0.0.1:9464" {
		t.Errorf("--pprof --metrics :9464: %+v, %v", o, err)
	}
}

// startTestAPI serves the listener on a loopback port with the given
// stack counters, and closes it in t.Cleanup.
// live nil is direct mode.
func startTestAPI(t *testing.T, pprof bool, stats stack.Stats, live *liveDialer, done <-chan struct{}) (*apiServer, *http.Client) {
	t.Helper()
	mode := "direct"
	if live != nil {
		mode = "proxy"
	}
	a, err := startAPI(apiConfig{
		addr:  "127.0.0.1:0",
		pprof: pprof,
		metrics: metricsSources{
			stack:   func() stack.Stats { return stats },
			refused: &refusals{},
			live:    live,
			mode:    mode,
		},
		done: done,
		log:  slog.New(slog.DiscardHandler),
		mount: func(mux *http.ServeMux) {
			mux.Handle("GET /upstreams", upstreamsHandler(live, nil))
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.Close)
	// No idle connections left behind for goleak.
	return a, &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
}

func get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("GET %s: read: %v", url, err)
	}
	return resp.StatusCode, string(b)
}

// parseMetrics parses the text exposition format.
func parseMetrics(t testing.TB, body string) map[string]*dto.MetricFamily {
	t.Helper()
	p := expfmt.NewTextParser(model.UTF8Validation)
	fams, err := p.TextToMetricFamilies(strings.NewReader(body))
	if err != nil {
		t.Fatalf("parse metrics: %v\n%s", err, body)
	}
	return fams
}

// sample finds the metric of family name whose labels include want.
func sample(fams map[string]*dto.MetricFamily, name string, want ...string) *dto.Metric {
	f := fams[name]
	if f == nil {
		return nil
	}
next:
	for _, m := range f.GetMetric() {
		for i := 0; i+1 < len(want); i += 2 {
			found := false
			for _, l := range m.GetLabel() {
				found = found || l.GetName() == want[i] && l.GetValue() == want[i+1]
			}
			if !found {
				continue next
			}
		}
		return m
	}
	return nil
}

// TestAPIServes: /metrics is the exposition format with the stack's
// counters under their names, Go's and the process's collectors beside
// them; /healthz is ok in direct mode until the stack stops; /debug/pprof/
// is there only with --pprof.
func TestAPIServes(t *testing.T) {
	var stats stack.Stats
	stats.TCPFlows, stats.TCPActive, stats.UDPFlows, stats.BytesDown = 7, 2, 3, 12345
	stats.DialErrors[stack.DialRefused] = 4
	stats.DialLatency.Counts[0], stats.DialLatency.Counts[3], stats.DialLatency.Sum = 5, 1, 15*time.Millisecond
	stats.Drops.BadChecksum = 9
	stats.TUNReads, stats.TUNBatches = []uint64{100, 50}, []uint64{10, 25}
	stats.CoalescedACKs = 17
	done := make(chan struct{})
	a, c := startTestAPI(t, false, stats, nil, done)
	base := "http://" + a.Addr().String()

	code, body := get(t, c, base+"/metrics")
	if code != http.StatusOK {
		t.Fatalf("/metrics: %d %s", code, body)
	}
	fams := parseMetrics(t, body)
	for _, want := range []struct {
		name   string
		labels []string
		value  float64
	}{
		{"netstackd_flows_total", []string{"protocol", "tcp", "mode", "direct", "upstream", "direct"}, 7},
		{"netstackd_flows_total", []string{"protocol", "udp"}, 3},
		{"netstackd_flows_active", []string{"protocol", "tcp"}, 2},
		{"netstackd_bytes_total", []string{"direction", "down"}, 12345},
		{"netstackd_dial_errors_total", []string{"reason", "refused"}, 4},
		{"netstackd_dial_errors_total", []string{"reason", "timeout"}, 0},
		{"netstackd_dropped_total", []string{"reason", "bad_checksum"}, 9},
		{"netstackd_tun_packets_read_total", []string{"queue", "1"}, 50},
		{"netstackd_tun_read_batches_total", []string{"queue", "0"}, 10},
		{"netstackd_tcp_acks_coalesced_total", nil, 17},
		{"netstackd_upstream_up", []string{"upstream", "direct"}, 1},
	} {
		m := sample(fams, want.name, want.labels...)
		var got float64
		switch {
		case m == nil:
			t.Errorf("%s%v missing", want.name, want.labels)
			continue
		case m.Counter != nil:
			got = m.GetCounter().GetValue()
		default:
			got = m.GetGauge().GetValue()
		}
		if got != want.value {
			t.Errorf("%s%v = %v, want %v", want.name, want.labels, got, want.value)
		}
	}
	h := sample(fams, "netstackd_dial_duration_seconds").GetHistogram()
	if h.GetSampleCount() != 6 || h.GetSampleSum() != 0.015 || h.GetBucket()[0].GetCumulativeCount() != 5 || h.GetBucket()[3].GetCumulativeCount() != 6 {
		t.Errorf("dial histogram %v, want 6 samples summing to 0.015, 5 in the first bucket, all 6 by the fourth", h)
	}
	for _, name := range []string{"go_goroutines", "process_open_fds"} {
		if fams[name] == nil {
			t.Errorf("%s missing: Go and process collectors not registered", name)
		}
	}

	if code, body := get(t, c, base+"/debug/pprof/"); code != http.StatusNotFound {
		t.Errorf("/debug/pprof/ without --pprof: %d %q, want 404", code, body)
	}
	if code, body := get(t, c, base+"/healthz"); code != http.StatusOK || body != "ok\n" {
		t.Errorf("/healthz direct: %d %q, want 200 ok", code, body)
	}
	close(done)
	if code, body := get(t, c, base+"/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "stack") {
		t.Errorf("/healthz after the stack stopped: %d %q, want 503 saying why", code, body)
	}

	a2, _ := startTestAPI(t, true, stats, nil, nil)
	if code, body := get(t, c, "http://"+a2.Addr().String()+"/debug/pprof/"); code != http.StatusOK || !strings.Contains(body, "goroutine") {
		t.Errorf("/debug/pprof/ with --pprof: %d, want 200 listing profiles", code)
	}
}

// TestHealthzProxy: with upstreams, /healthz follows their health checks:
// 503 naming each upstream and its reason while none answers, 200 once one
// does; the handler itself dials nothing. /upstreams and upstream_up show
// each one's state.
func TestHealthzProxy(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	alive, err := net.Listen("tcp4", "127.0.0.1:0") // HTTP CONNECT's probe is a connect
	if err != nil {
		t.Fatal(err)
	}
	defer alive.Close()
	g, err := proxy.NewGroup(proxy.GroupConfig{Members: []proxy.Upstream{
		{Name: "a", Dialer: proxy.SOCKS5{Server: dead}},
		{Name: "b", Dialer: proxy.SOCKS5{Server: dead}},
	}, Interval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	live := newLiveDialer(g)
	t.Cleanup(live.Close)
	a, c := startTestAPI(t, false, stack.Stats{}, live, nil)
	base := "http://" + a.Addr().String()
	waitHealthz := func(want int, has ...string) {
		t.Helper()
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		for {
			code, body := get(t, c, base+"/healthz")
			ok := code == want
			for _, h := range has {
				ok = ok && strings.Contains(body, h)
			}
			if ok {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("/healthz never %d with %q: last %d %q", want, has, code, body)
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	waitHealthz(http.StatusServiceUnavailable, "no upstream is usable", "a (socks5://"+dead, "b (", "refused")

	g2, err := proxy.NewGroup(proxy.GroupConfig{Members: []proxy.Upstream{
		{Name: "a", Dialer: proxy.SOCKS5{Server: dead}},
		{Name: "b", Dialer: proxy.HTTPConnect{Server: alive.Addr().String()}},
	}, Interval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	live.swap(g2)
	waitHealthz(http.StatusOK, "ok")
	fams := parseMetrics(t, func() string { _, b := get(t, c, base+"/metrics"); return b }())
	for name, want := range map[string]float64{"a": 0, "b": 1} {
		if m := sample(fams, "netstackd_upstream_up", "upstream", name); m.GetGauge().GetValue() != want {
			t.Errorf("upstream_up{upstream=%q} = %v, want %v", name, m.GetGauge().GetValue(), want)
		}
	}
	if m := sample(fams, "netstackd_flows_total", "protocol", "tcp", "upstream", "a,b"); m == nil {
		t.Errorf("flows_total has no series with upstream=\"a,b\" after the swap")
	}
	_, body := get(t, c, base+"/upstreams")
	var ups []upstreamJSON
	if err := json.Unmarshal([]byte(body), &ups); err != nil || len(ups) != 2 || ups[0].State != "down" || ups[0].Error == "" || ups[1].State != "up" || ups[1].Name != "b" {
		t.Errorf("/upstreams: %s (%v)", body, err)
	}
}

// BenchmarkScrape is one /metrics request as Prometheus makes it: the cost
// of a scrape, paid only when one comes.
func BenchmarkScrape(b *testing.B) {
	var stats stack.Stats
	stats.TUNReads = []uint64{1}
	a, err := startAPI(apiConfig{
		addr: "127.0.0.1:0",
		metrics: metricsSources{
			stack:   func() stack.Stats { return stats },
			refused: &refusals{}, mode: "direct",
		},
		log: slog.New(slog.DiscardHandler),
	})
	if err != nil {
		b.Fatal(err)
	}
	defer a.Close()
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	c := &http.Client{Transport: tr}
	url := "http://" + a.Addr().String() + "/metrics"
	b.ReportAllocs()
	for b.Loop() {
		resp, err := c.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}

// BenchmarkCollect is netstackd's own collector alone, without the Go and
// process collectors or HTTP.
func BenchmarkCollect(b *testing.B) {
	var stats stack.Stats
	stats.TUNReads = []uint64{1}
	reg := prometheus.NewRegistry()
	reg.MustRegister(newMetricsCollector(metricsSources{
		stack:   func() stack.Stats { return stats },
		refused: &refusals{}, mode: "direct",
	}))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := reg.Gather(); err != nil {
			b.Fatal(err)
		}
	}
}
