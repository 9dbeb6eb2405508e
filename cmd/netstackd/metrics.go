package main

import (
	"strconv"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/stack"
)

// The stack and the DNS server keep plain atomic counters and know nothing
// of Prometheus (internal/fence); metricsCollector reads their snapshots
// when a scrape asks, so a netstackd nobody scrapes does no metrics work at
// all, and nothing is counted twice.

// metricsSources are what the collector reads at each scrape.
type metricsSources struct {
	stack   func() stack.Stats
	dns     *dns.Server // nil with --dns off
	refused *refusals
	live    *liveDialer // the upstreams; nil when direct
	routes  *router     // the routing rules
	mode    string      // "direct" or "proxy"
}

// metricsCollector is a prometheus.Collector over metricsSources.
type metricsCollector struct {
	src metricsSources

	flowsActive, flowsTotal, flowsRejected  *prometheus.Desc
	bytes, dialErrors, dialSeconds          *prometheus.Desc
	halfOpen, refusedDst, upstreamUp        *prometheus.Desc
	dnsQueries, dnsPoolUsed, dnsPoolSize    *prometheus.Desc
	dnsPoolExhausted, dropped, tunPacketsIn *prometheus.Desc
	tunBatches, connectSeconds, acksMerged  *prometheus.Desc
	upstreamDials                           *prometheus.Desc
	ruleMatches, routeRefused, sniffed      *prometheus.Desc
}

var _ prometheus.Collector = (*metricsCollector)(nil)

func newMetricsCollector(src metricsSources) *metricsCollector {
	// mode is the same for every series of a run. upstream is, on the
	// stack's series, the upstreams in use ("direct", or their names in
	// order: "a,b"), read at each scrape so that it follows a reload; on
	// the per-upstream series, one upstream's name.
	up := prometheus.Labels{"mode": src.mode}
	desc := func(name, help string, labels []string, constant prometheus.Labels) *prometheus.Desc {
		return prometheus.NewDesc("netstackd_"+name, help, labels, constant)
	}
	return &metricsCollector{
		src:              src,
		flowsActive:      desc("flows_active", "Flows open now: TCP flows holding a slot (relayed, published or dialing), UDP associations.", []string{"protocol", "upstream"}, up),
		flowsTotal:       desc("flows_total", "Flows opened: TCP flows whose upstream was reached, UDP associations.", []string{"protocol", "upstream"}, up),
		flowsRejected:    desc("flows_rejected_total", "TCP flows reset without a dial: over --max-flows (over_limit), or to a destination netstackd refuses (refused).", []string{"protocol", "reason", "upstream"}, up),
		bytes:            desc("bytes_total", "Bytes relayed by outbound TCP flows once they have ended, toward the upstream (up) and toward the client (down).", []string{"protocol", "direction", "upstream"}, up),
		dialErrors:       desc("dial_errors_total", "Upstream dials that failed, by reason; each resets its flow.", []string{"reason", "upstream"}, up),
		dialSeconds:      desc("dial_duration_seconds", "How long successful upstream dials took (through a proxy: its handshake included).", []string{"upstream"}, up),
		connectSeconds:   desc("connect_duration_seconds", "How long relayed TCP flows took to open, from the client's SYN to both sides connected: the upstream dial and the client's handshake.", []string{"upstream"}, up),
		halfOpen:         desc("tcp_handshakes_half_open", "TCP handshakes waiting for the client's final ACK.", nil, nil),
		refusedDst:       desc("refused_destinations_total", "Flows refused because their destination is netstackd's own (its addresses, host loopback in direct mode).", nil, nil),
		upstreamUp:       desc("upstream_up", "1 if the upstream answered its last health check (always 1 when direct), else 0; one series per upstream.", []string{"upstream"}, up),
		ruleMatches:      desc("rule_matches_total", "Flows each routing rule decided, by its number (from 1, in order of evaluation) and text; a reload counts anew.", []string{"rule", "text"}, nil),
		routeRefused:     desc("route_refused_total", "Flows the routing rules refused: TCP flows, UDP associations and echo requests, by action (reject, drop).", []string{"action"}, nil),
		sniffed:          desc("sniffed_names_total", "Flows routed by a name read from their first bytes (TLS SNI, HTTP Host, QUIC Initial).", nil, nil),
		upstreamDials:    desc("upstream_dials_total", "Connections and UDP associations asked of each upstream (the DNS forwarder's included), by result: ok, or error (a failure reaching the proxy moves the dial on to the next upstream).", []string{"upstream", "result"}, up),
		dnsQueries:       desc("dns_queries_total", "DNS queries answered, by how: a fake address (fake), the direct resolver (direct), the upstream resolver or its cache (forwarded), empty for a name the rules reject (rejected), netstackd itself (local: malformed, refused, empty, pool exhausted).", []string{"mode", "answer"}, nil),
		dnsPoolUsed:      desc("dns_fake_ip_pool_used", "Names holding a fake address now.", []string{"family"}, nil),
		dnsPoolSize:      desc("dns_fake_ip_pool_size", "Addresses the fake-IP range can give.", []string{"family"}, nil),
		dnsPoolExhausted: desc("dns_fake_ip_pool_exhausted_total", "Fake A and AAAA queries answered SERVFAIL because no address was free.", nil, nil),
		dropped:          desc("dropped_total", "Packets, datagrams, SYNs and queries dropped, by reason.", []string{"reason"}, nil),
		tunPacketsIn:     desc("tun_packets_read_total", "Packets read from the TUN, per queue.", []string{"queue"}, nil),
		tunBatches:       desc("tun_read_batches_total", "Reads from the TUN that returned packets, per queue: packets read over batches is the mean batch size.", []string{"queue"}, nil),
		acksMerged:       desc("tcp_acks_coalesced_total", "Pure TCP ACKs toward clients not written because the next packet of their flow, sent within 200 µs, carried them (a reply to a request, as with delayed ACKs).", nil, nil),
	}
}

// Describe sends every descriptor the collector may send.
func (c *metricsCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		c.flowsActive, c.flowsTotal, c.flowsRejected, c.bytes, c.dialErrors, c.dialSeconds,
		c.halfOpen, c.refusedDst, c.upstreamUp, c.dnsQueries, c.dnsPoolUsed, c.dnsPoolSize,
		c.dnsPoolExhausted, c.dropped, c.tunPacketsIn, c.tunBatches, c.connectSeconds, c.upstreamDials,
		c.ruleMatches, c.routeRefused, c.sniffed, c.acksMerged,
	} {
		ch <- d
	}
}

// Collect reads one snapshot of each source and sends it as const metrics.
func (c *metricsCollector) Collect(ch chan<- prometheus.Metric) {
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	s := c.src.stack()
	states := c.src.live.states()
	names := make([]string, len(states))
	for i, u := range states {
		names[i] = u.Name
		upValue := 0.0
		if u.State == "up" {
			upValue = 1
		}
		gauge(c.upstreamUp, upValue, u.Name)
		if c.src.live != nil { // direct dials are the stack's own series
			counter(c.upstreamDials, u.Dials-u.DialErrors, u.Name, "ok")
			counter(c.upstreamDials, u.DialErrors, u.Name, "error")
		}
	}
	ups := strings.Join(names, ",")
	gauge(c.flowsActive, float64(s.TCPActive), "tcp", ups)
	gauge(c.flowsActive, float64(s.UDPActive), "udp", ups)
	counter(c.flowsTotal, s.TCPFlows, "tcp", ups)
	counter(c.flowsTotal, s.UDPFlows, "udp", ups)
	counter(c.flowsRejected, s.TCPLimited, "tcp", "over_limit", ups)
	counter(c.flowsRejected, s.TCPRefused, "tcp", "refused", ups)
	counter(c.bytes, s.BytesUp, "tcp", "up", ups)
	counter(c.bytes, s.BytesDown, "tcp", "down", ups)
	for r, n := range s.DialErrors {
		counter(c.dialErrors, n, stack.DialReason(r).String(), ups)
	}
	ch <- latencyHistogram(c.dialSeconds, s.DialLatency, ups)
	ch <- latencyHistogram(c.connectSeconds, s.ConnectLatency, ups)
	gauge(c.halfOpen, float64(s.HalfOpen))
	counter(c.refusedDst, c.src.refused.count.Load())
	d := s.Drops
	for _, r := range []struct {
		reason string
		n      uint64
	}{
		{"bad_checksum", d.BadChecksum}, {"too_big", d.TooBig}, {"fragment", d.Fragments},
		{"tun_queue_full", d.OutboundQueue}, {"dns_busy", d.DNS},
		{"syn_per_source", d.SYNPerSource}, {"syn_inflight", d.SYNInFlight}, {"handshake_timeout", d.HandshakeTimed},
		{"udp_table_full", d.UDPTableFull}, {"udp_send", d.UDPSend}, {"udp_reply_too_big", d.UDPReplyTooBig},
		{"udp_opening", d.UDPOpening},
	} {
		counter(c.dropped, r.n, r.reason)
	}
	counter(c.routeRefused, s.Rejected, "reject")
	counter(c.routeRefused, s.Dropped, "drop")
	counter(c.sniffed, s.Sniffed)
	if c.src.routes != nil {
		labels, counts := c.src.routes.ruleCounts()
		for i, n := range counts {
			counter(c.ruleMatches, n, strconv.Itoa(i+1), labels[i])
		}
	}
	for q, n := range s.TUNReads {
		counter(c.tunPacketsIn, n, strconv.Itoa(q))
	}
	for q, n := range s.TUNBatches {
		counter(c.tunBatches, n, strconv.Itoa(q))
	}
	counter(c.acksMerged, s.CoalescedACKs)
	if c.src.dns == nil {
		return
	}
	ds := c.src.dns.Stats()
	mode := c.src.dns.Mode().String()
	local := ds.Queries - min(ds.Queries, ds.Fake+ds.Direct+ds.Forwarded+ds.Rejected)
	counter(c.dnsQueries, ds.Rejected, mode, "rejected")
	counter(c.dnsQueries, ds.Fake, mode, "fake")
	counter(c.dnsQueries, ds.Direct, mode, "direct")
	counter(c.dnsQueries, ds.Forwarded, mode, "forwarded")
	counter(c.dnsQueries, local, mode, "local")
	counter(c.dnsPoolExhausted, ds.PoolExhausted)
	if c.src.dns.Mode() == dns.ModeFakeIP {
		gauge(c.dnsPoolUsed, float64(ds.FakeV4), "ipv4")
		gauge(c.dnsPoolUsed, float64(ds.FakeV6), "ipv6")
		gauge(c.dnsPoolSize, float64(ds.FakeV4Size), "ipv4")
		gauge(c.dnsPoolSize, float64(ds.FakeV6Size), "ipv6")
	}
}

// latencyHistogram turns a stack histogram, whose buckets count apart, into
// Prometheus's cumulative one.
func latencyHistogram(d *prometheus.Desc, h stack.Histogram, labels ...string) prometheus.Metric {
	buckets := make(map[float64]uint64, len(h.Counts))
	var cum uint64
	for i, n := range h.Counts {
		cum += n
		buckets[stack.DialLatencyBuckets[i].Seconds()] = cum
	}
	return prometheus.MustNewConstHistogram(d, cum+h.Over, h.Sum.Seconds(), buckets, labels...)
}
