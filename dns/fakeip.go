package dns

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"strings"

	"github.com/miekg/dns"
)

// answerFake answers a query in fake-ip mode; action is what Config.Policy
// said of its name.
func (s *Server) answerFake(ctx context.Context, req *dns.Msg, action NameAction) *dns.Msg {
	q := req.Question[0]
	name := normaliseName(q.Name)
	if q.Qclass != dns.ClassINET || name == "" || strings.ContainsRune(name, '\\') {
		// Not a name a flow could be dialed by: another class, the root,
		// or a label with bytes no hostname has (miekg/dns escapes them).
		// The upstream answers it, through the dialer.
		return s.forward(ctx, req)
	}
	if s.isDirect(name) || action == NameDirect {
		return s.answerDirect(ctx, req, name)
	}
	switch q.Qtype {
	case dns.TypeA, dns.TypeAAAA:
		return s.answerFakeAddr(req, name)
	case dns.TypeHTTPS, dns.TypeSVCB:
		// An HTTPS or SVCB record (RFC 9460) carries ipv4hint and ipv6hint
		// with real addresses, and browsers connect to those hints: the
		// flow would reach the proxy as a bare real address, the hostname
		// lost and the fake mapping bypassed. An empty NOERROR makes them
		// fall back to A and AAAA, which we answer. The price is ECH and
		// HTTP/3 discovery through DNS, which the proxy cannot carry anyway.
		return reply(req, dns.RcodeSuccess)
	}
	return s.forward(ctx, req)
}

// isDirect reports whether name is one of the direct suffixes or under one.
func (s *Server) isDirect(name string) bool {
	for _, suffix := range s.direct {
		if name == suffix || strings.HasSuffix(name, "."+suffix) {
			return true
		}
	}
	return false
}

// answerFakeAddr answers an A or AAAA query with the name's fake address.
func (s *Server) answerFakeAddr(req *dns.Msg, name string) *dns.Msg {
	q := req.Question[0]
	v6 := q.Qtype == dns.TypeAAAA
	if v6 && !s.pool.hasV6() || !v6 && !s.pool.hasV4() {
		return reply(req, dns.RcodeSuccess) // no range of that family: NODATA
	}
	addr, err := s.pool.lookup(name, v6)
	if err != nil {
		// Recycling an address a client may still have cached would send
		// its next connection to another name: refuse this name instead.
		s.poolExhausted.Add(1)
		s.warnPool.Warn(s.log, "fake-ip pool exhausted, answering SERVFAIL",
			"name", name, "qtype", dns.TypeToString[q.Qtype], "err", err)
		return reply(req, dns.RcodeServerFailure)
	}
	s.answered[answerFake].Add(1)
	m := reply(req, dns.RcodeSuccess)
	m.Answer = []dns.RR{addrRR(q.Name, addr, s.fakeTTL)}
	return m
}

// answerDirect answers a query for a direct name with real addresses from
// the DirectResolver.
func (s *Server) answerDirect(ctx context.Context, req *dns.Msg, name string) *dns.Msg {
	s.answered[answerDirect].Add(1)
	q := req.Question[0]
	network := "ip4"
	switch q.Qtype {
	case dns.TypeA:
	case dns.TypeAAAA:
		network = "ip6"
	default:
		// The Resolver seam gives addresses only, and forwarding a local
		// name to the upstream would show it to the far side of the
		// proxy: the other types get an empty answer.
		return reply(req, dns.RcodeSuccess)
	}
	ctx, cancel := s.opContext(ctx)
	defer cancel()
	// The query names an absolute domain: keep the resolver from trying
	// search domains.
	addrs, err := s.resolver.LookupNetIP(ctx, network, name+".")
	if err != nil {
		var dnsErr *net.DNSError
		if errors.As(err, &dnsErr) && dnsErr.IsNotFound {
			// Go says "no such host" also for a name that only lacks
			// addresses of this family. NODATA is right in both cases;
			// NXDOMAIN would tell the client the name has no addresses of
			// any family (RFC 8020).
			return reply(req, dns.RcodeSuccess)
		}
		s.log.Debug("direct lookup failed", "name", name, "network", network, "err", err)
		return reply(req, dns.RcodeServerFailure)
	}
	m := reply(req, dns.RcodeSuccess)
	for _, a := range addrs {
		if a = a.Unmap(); a.Is4() == (network == "ip4") {
			m.Answer = append(m.Answer, addrRR(q.Name, a, s.fakeTTL))
		}
	}
	s.addrNames.record(name, m.Answer, s.now())
	return m
}

// addrRR builds the A or AAAA record of addr.
func addrRR(name string, addr netip.Addr, ttl uint32) dns.RR {
	if addr.Is4() {
		return &dns.A{
			Hdr: dns.RR_Header{Name: name, Rrtype: dns.TypeA, Class: dns.ClassINET, Ttl: ttl},
			A:   addr.AsSlice(),
		}
	}
	return &dns.AAAA{
		Hdr:  dns.RR_Header{Name: name, Rrtype: dns.TypeAAAA, Class: dns.ClassINET, Ttl: ttl},
		AAAA: addr.AsSlice(),
	}
}
