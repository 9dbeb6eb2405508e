package dns

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/miekg/dns"
)

// forward answers req from the cache or, on a miss, from the upstream over
// TCP through the dialer. A failed upstream gives SERVFAIL.
func (s *Server) forward(ctx context.Context, req *dns.Msg) *dns.Msg {
	s.answered[answerForwarded].Add(1)
	q := req.Question[0]
	key := cacheKey{name: normaliseName(q.Name), qtype: q.Qtype, qclass: q.Qclass}
	now := s.now()
	if m, ok := s.cache.get(key, now); ok {
		s.recordAddrs(key.name, q.Qtype, m, now)
		return fromUpstream(req, m)
	}
	up, err := s.exchange(ctx, q, req.CheckingDisabled)
	if err != nil {
		if ctx.Err() != nil || s.ctx.Err() != nil {
			s.log.Debug("dns query abandoned", "name", q.Name, "err", err)
		} else {
			s.warnUpstream.Warn(s.log, "dns upstream failed, answering SERVFAIL",
				"upstream", s.Upstream(), "name", q.Name, "err", err)
		}
		return reply(req, dns.RcodeServerFailure)
	}
	if ttl, ok := cacheTTL(up); ok {
		s.cache.put(key, up, ttl, now)
	}
	s.recordAddrs(key.name, q.Qtype, up, now)
	return fromUpstream(req, up)
}

// recordAddrs remembers the addresses an A or AAAA answer gave for name
// (NameOf).
func (s *Server) recordAddrs(name string, qtype uint16, m *dns.Msg, now time.Time) {
	if (qtype == dns.TypeA || qtype == dns.TypeAAAA) && name != "" && m.Rcode == dns.RcodeSuccess {
		s.addrNames.record(name, m.Answer, now)
	}
}

// fromUpstream builds the reply to req out of the upstream's reply: the
// query's ID, flags and question (with the client's letter case), the
// upstream's rcode and records. We are not authoritative and vouch for no
// DNSSEC validation, so AA and AD stay clear.
func fromUpstream(req, up *dns.Msg) *dns.Msg {
	m := reply(req, up.Rcode)
	m.Answer = up.Answer
	m.Ns = up.Ns
	m.Extra = up.Extra // its OPT is replaced by ours in pack
	return m
}

// exchange sends one question to the upstream on a connection of its own
// (RFC 7766 allows one query per connection) and returns the reply. It is
// bounded by upstreamTimeout, dial included.
func (s *Server) exchange(ctx context.Context, q dns.Question, checkingDisabled bool) (*dns.Msg, error) {
	ctx, cancel := s.opContext(ctx)
	defer cancel()
	select {
	case s.sem <- struct{}{}:
		defer func() { <-s.sem }()
	case <-ctx.Done():
		return nil, fmt.Errorf("wait for an upstream slot: %w", ctx.Err())
	}

	// A fresh query rather than the client's bytes: our own ID, and no
	// client EDNS options (cookies, client subnet) carried to the far side.
	m := new(dns.Msg)
	m.Id = dns.Id()
	m.RecursionDesired = true
	m.CheckingDisabled = checkingDisabled
	m.Question = []dns.Question{q}
	m.SetEdns0(dns.DefaultMsgSize, false)
	b, err := m.Pack()
	if err != nil {
		return nil, fmt.Errorf("pack query for %s: %w", q.Name, err)
	}

	upstream := s.Upstream()
	c, err := s.dialer.DialContext(ctx, "tcp", upstream)
	if err != nil {
		return nil, fmt.Errorf("dial dns upstream %s: %w", upstream, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	// Registered after SetDeadline so that a cancel, even an early one,
	// has the last word.
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	if err := writeFrame(c, b); err != nil {
		return nil, fmt.Errorf("send query to dns upstream %s: %w", upstream, err)
	}
	rb, err := readFrame(c)
	if err != nil {
		return nil, fmt.Errorf("read reply from dns upstream %s: %w", upstream, err)
	}
	r := new(dns.Msg)
	if err := r.Unpack(rb); err != nil {
		return nil, fmt.Errorf("parse reply from dns upstream %s: %w", upstream, err)
	}
	if r.Id != m.Id || !r.Response || len(r.Question) != 1 ||
		!strings.EqualFold(r.Question[0].Name, q.Name) ||
		r.Question[0].Qtype != q.Qtype || r.Question[0].Qclass != q.Qclass {
		return nil, fmt.Errorf("reply from dns upstream %s does not match the query for %s", upstream, q.Name)
	}
	return r, nil
}
