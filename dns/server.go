package dns

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/miekg/dns"

	"github.com/netstackd/netstackd/internal/ratelog"
)

// Dialer reaches the upstream resolver: DNS over TCP through the proxy.
// *net.Dialer and every proxy dialer fit it.
type Dialer interface {
	DialContext(ctx context.Context, network, address string) (net.Conn, error)
}

// Resolver gives real addresses for names under the direct suffixes.
// *net.Resolver fits it.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

var (
	_ Dialer   = (*net.Dialer)(nil)
	_ Resolver = (*net.Resolver)(nil)
)

// Config configures a Server. The zero value is a Server in ModeOff; every
// other field's zero value is a usable default.
type Config struct {
	// Mode says how queries are answered.
	Mode Mode
	// FakeRanges are the fake-IP ranges, at most one IPv4 and one IPv6
	// prefix. nil or empty means 198.19.0.0/16 and fd00:1919::/96. Without
	// an IPv6 prefix AAAA queries get an empty answer (likewise A without
	// IPv4). The network and first address of each range, and the last of
	// an IPv4 range, are never handed out.
	FakeRanges []netip.Prefix
	// FakeTTL is the TTL of fake answers and of direct-suffix answers.
	// 0 means 10s. A fake address is given to no other name until FakeTTL
	// plus a minute has passed since it was last answered or used by a
	// flow, so it also sets how fast names can churn through a range: a
	// full range answers SERVFAIL until an address becomes free.
	FakeTTL time.Duration
	// DirectSuffixes are names whose A and AAAA queries, for the names and
	// everything under them, are answered with real addresses from
	// DirectResolver in fake-ip mode. "localhost" is always one.
	DirectSuffixes []string
	// DirectResolver resolves the direct names. nil means net.DefaultResolver,
	// which queries from netstackd's own namespace, not through the proxy.
	DirectResolver Resolver
	// Policy, if set, says what the routing rules decide for a name alone
	// (issue 17): a rejected name gets an empty answer at once, in every
	// mode; in fake-ip mode a direct one gets its real addresses, as
	// DirectSuffixes do. It is asked once per query and must be cheap.
	Policy func(name string) NameAction
	// Upstream is the resolver, "host:port" (a bare address means port 53),
	// that remote mode forwards every query to and fake-ip mode forwards
	// the query types it does not answer itself to. "" means the first
	// nameserver of /etc/resolv.conf, port 53.
	Upstream string
	// Dialer reaches Upstream over TCP (RFC 7766); give it the proxy dialer
	// so that queries leave through the proxy. nil means a net.Dialer, which
	// reaches Upstream directly.
	Dialer Dialer
	// CacheSize bounds the cache of forwarded answers, in entries. 0 means
	// 4096.
	CacheSize int
	// Logger receives the server's logs; nil discards them.
	Logger *slog.Logger
}

const (
	headerLen = 12
	// maxUDPPayload caps replies over UDP whatever EDNS size the client
	// offers: 1232 bytes fits any link of the IPv6 minimum MTU 1280 without
	// fragmentation (DNS Flag Day 2020), and the stack drops replies larger
	// than its link MTU. It is also the size our OPT record advertises.
	maxUDPPayload = 1232
	// upstreamTimeout bounds one forwarded query or direct lookup, dial
	// included.
	upstreamTimeout = 5 * time.Second
	// maxUpstreamInFlight bounds forwarded queries waiting for the upstream.
	maxUpstreamInFlight = 256
	// streamIdle ends a DNS-over-TCP connection with no query for this long
	// (RFC 7766 §6.2.3 suggests tens of seconds) and bounds each write.
	streamIdle = 30 * time.Second
	// maxStreamInFlight bounds the pipelined queries of one TCP connection
	// answered at once; further ones wait to be read.
	maxStreamInFlight = 16
	// defaultFakeTTL is short, so that a name's address outlives the
	// answers naming it by little, and long enough that clients do not
	// ask again for every connection.
	defaultFakeTTL = 10 * time.Second
	// fakeReuseMargin is added to the fake TTL before an address may go
	// to another name. Caches count the TTL from when they got the answer,
	// which can be a moment after we sent it, and some keep answers longer
	// than the TTL: the JVM caches lookups for 30 s by default
	// (networkaddress.cache.ttl), Chromium keeps what getaddrinfo gave it,
	// which carries no TTL, for 60 s. A minute covers both.
	fakeReuseMargin  = 60 * time.Second
	defaultCacheSize = 4096
	resolvConfPath   = "/etc/resolv.conf"
	// warnEvery rate-limits the warnings a peer can trigger.
	warnEvery = 10 * time.Second
)

func defaultFakeRanges() []netip.Prefix {
	return []netip.Prefix{
		netip.MustParsePrefix("198.19.0.0/16"),
		netip.MustParsePrefix("fd00:1919::/96"),
	}
}

// errOff is returned by ServeStream in ModeOff.
var errOff = errors.New("dns mode off: streams are not served")

// Server answers intercepted DNS queries. Its methods are safe for
// concurrent use.
type Server struct {
	mode     Mode
	log      *slog.Logger
	pool     *pool // fake-ip mode only
	fakeTTL  uint32
	direct   []string
	policy   func(name string) NameAction
	resolver Resolver
	upstream atomic.Pointer[string] // "host:port"; SetUpstream replaces it
	dialer   Dialer
	cache    *cache
	sem      chan struct{} // forwarded queries in flight
	now      func() time.Time
	// addrNames are the names real addresses stood for in answers
	// (NameOf).
	addrNames addrNames

	warnPool      ratelog.Limiter
	warnUpstream  ratelog.Limiter
	poolExhausted atomic.Uint64 // fake A and AAAA queries answered SERVFAIL
	// queries counts the queries answered, answered those answered by
	// each path but the stack's own (stats.go).
	queries  atomic.Uint64
	answered [numAnswerKinds]atomic.Uint64

	ctx       context.Context // cancelled by Close
	cancel    context.CancelFunc
	mu        sync.Mutex
	closed    bool
	active    sync.WaitGroup // Answer and ServeStream calls in progress
	closeOnce sync.Once
}

// New builds a Server. In fake-ip and remote modes it needs an upstream:
// Config.Upstream or a nameserver in /etc/resolv.conf.
func New(cfg Config) (*Server, error) {
	s := &Server{
		mode: cfg.Mode,
		log:  cfg.Logger,
		now:  time.Now,
	}
	// Through a func, so that a test's clock set on s.now applies too.
	clock := func() time.Time { return s.now() }
	s.warnPool = ratelog.Limiter{Every: warnEvery, Now: clock}
	s.warnUpstream = ratelog.Limiter{Every: warnEvery, Now: clock}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	switch cfg.Mode {
	case ModeOff:
		s.ctx, s.cancel = context.WithCancel(context.Background())
		return s, nil
	case ModeFakeIP, ModeRemote:
	default:
		return nil, fmt.Errorf("dns mode %v: unknown", cfg.Mode)
	}

	if cfg.Mode == ModeFakeIP {
		ttl := cfg.FakeTTL
		switch {
		case ttl == 0:
			ttl = defaultFakeTTL
		case ttl < 0 || ttl > time.Duration(1<<31-1)*time.Second:
			return nil, fmt.Errorf("fake ttl %v: want 0 to 2^31-1 seconds", ttl)
		}
		s.fakeTTL = uint32((ttl + time.Second - 1) / time.Second)
		ranges := cfg.FakeRanges
		if len(ranges) == 0 {
			ranges = defaultFakeRanges()
		}
		p, err := newPool(ranges, time.Duration(s.fakeTTL)*time.Second+fakeReuseMargin)
		if err != nil {
			return nil, err
		}
		s.pool = p
		for _, suffix := range cfg.DirectSuffixes {
			n := normaliseName(strings.TrimPrefix(suffix, "."))
			if n == "" {
				return nil, fmt.Errorf("direct suffix %q: empty", suffix)
			}
			s.direct = append(s.direct, n)
		}
		s.direct = append(s.direct, "localhost")
		s.resolver = cfg.DirectResolver
		if s.resolver == nil {
			s.resolver = net.DefaultResolver
		}
	}

	s.policy = cfg.Policy

	up, err := upstreamAddr(cfg.Upstream, resolvConfPath)
	if err != nil {
		return nil, err
	}
	s.upstream.Store(&up)
	s.dialer = cfg.Dialer
	if s.dialer == nil {
		s.dialer = &net.Dialer{}
	}
	if cfg.CacheSize < 0 {
		return nil, fmt.Errorf("dns cache size %d: negative", cfg.CacheSize)
	}
	size := cfg.CacheSize
	if size == 0 {
		size = defaultCacheSize
	}
	s.cache = newCache(size)
	s.sem = make(chan struct{}, maxUpstreamInFlight)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.log.Info("dns server", "mode", s.mode.String(), "upstream", up)
	return s, nil
}

// SetUpstream makes the forwarder ask upstream (as Config.Upstream: ""
// reads the first nameserver of /etc/resolv.conf again) from the next
// query on, and forgets the answers cached from the old one; a query in
// flight finishes with the old. A bad upstream changes nothing.
func (s *Server) SetUpstream(upstream string) error {
	up, err := upstreamAddr(upstream, resolvConfPath)
	if err != nil {
		return err
	}
	s.upstream.Store(&up)
	s.cache.clear()
	s.log.Info("dns upstream changed", "upstream", up)
	return nil
}

// Upstream is the resolver forwarded queries go to, "host:port".
func (s *Server) Upstream() string { return *s.upstream.Load() }

// upstreamAddr validates the configured upstream, or reads the first
// nameserver from resolvConf when it is empty.
func upstreamAddr(upstream, resolvConf string) (string, error) {
	if upstream == "" {
		cc, err := dns.ClientConfigFromFile(resolvConf)
		if err != nil {
			return "", fmt.Errorf("no dns upstream given, read %s: %w", resolvConf, err)
		}
		if len(cc.Servers) == 0 {
			return "", fmt.Errorf("no dns upstream given and no nameserver in %s", resolvConf)
		}
		return net.JoinHostPort(cc.Servers[0], "53"), nil
	}
	if host, port, err := net.SplitHostPort(upstream); err == nil {
		if host == "" || port == "" {
			return "", fmt.Errorf("dns upstream %q: want host:port", upstream)
		}
		return upstream, nil
	}
	if _, err := netip.ParseAddr(upstream); err == nil || !strings.Contains(upstream, ":") {
		return net.JoinHostPort(upstream, "53"), nil
	}
	return "", fmt.Errorf("dns upstream %q: want host:port", upstream)
}

// enter registers an Answer or ServeStream call, unless the server is
// closed.
func (s *Server) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.active.Add(1)
	return true
}

// Close stops the server: forwarded queries in flight are abandoned,
// ServeStream calls return, and later queries get no answer. It waits for
// the Answer and ServeStream calls in progress to return, and may be called
// more than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		s.cancel()
		s.active.Wait()
	})
	return nil
}

// Answer answers one DNS message and returns the reply, or nil when there
// is none to send: in ModeOff, for a message shorter than a DNS header, for
// a response (never answered, so that no two resolvers loop) and after
// Close. Over UDP (overTCP false) the reply fits the client's EDNS0 UDP
// size, or 512 bytes without EDNS0, capped at 1232; what does not fit is
// cut and TC set so that the client retries over TCP. A message that does
// not parse gets FORMERR. The reply's ID and question are the query's.
func (s *Server) Answer(ctx context.Context, query []byte, overTCP bool) []byte {
	if s.mode == ModeOff || len(query) < headerLen || query[2]&0x80 != 0 {
		return nil
	}
	if !s.enter() {
		return nil
	}
	defer s.active.Done()
	s.queries.Add(1)
	req := new(dns.Msg)
	if err := req.Unpack(query); err != nil {
		if s.log.Enabled(ctx, slog.LevelDebug) {
			s.log.Debug("dns query malformed", "err", err)
		}
		return rawReply(query, dns.RcodeFormatError)
	}
	limit := dns.MaxMsgSize
	if !overTCP {
		limit = udpLimit(req)
	}
	resp := s.handle(ctx, req)
	if s.log.Enabled(ctx, slog.LevelDebug) && len(resp.Question) > 0 {
		q := resp.Question[0]
		s.log.Debug("dns query", "name", q.Name, "qtype", dns.TypeToString[q.Qtype],
			"rcode", dns.RcodeToString[resp.Rcode], "answers", len(resp.Answer))
	}
	return pack(query, req, resp, limit)
}

// handle answers a parsed query. The reply has no OPT record yet.
func (s *Server) handle(ctx context.Context, req *dns.Msg) *dns.Msg {
	if req.Opcode != dns.OpcodeQuery {
		return reply(req, dns.RcodeNotImplemented)
	}
	opts := 0
	for _, rr := range req.Extra {
		if rr.Header().Rrtype == dns.TypeOPT {
			opts++
		}
	}
	if len(req.Question) != 1 || opts > 1 { // RFC 6891 §6.1.1
		return reply(req, dns.RcodeFormatError)
	}
	if opt := req.IsEdns0(); opt != nil && opt.Version() != 0 {
		return reply(req, dns.RcodeBadVers) // RFC 6891 §6.1.3
	}
	switch req.Question[0].Qtype {
	case dns.TypeOPT:
		return reply(req, dns.RcodeFormatError)
	case dns.TypeAXFR, dns.TypeIXFR:
		// Zone transfers span many messages; we relay one exchange.
		return reply(req, dns.RcodeRefused)
	}
	action := NameDefault
	if s.policy != nil {
		if name := normaliseName(req.Question[0].Name); name != "" {
			action = s.policy(name)
		}
	}
	if action == NameReject {
		s.answered[answerRejected].Add(1)
		return reply(req, dns.RcodeSuccess)
	}
	if s.mode == ModeFakeIP {
		return s.answerFake(ctx, req, action)
	}
	return s.forward(ctx, req)
}

// NameAction is what the routing rules decide for a name alone
// (Config.Policy).
type NameAction uint8

const (
	NameDefault NameAction = iota // no rule decides by the name alone
	NameDirect                    // its flows go direct: real addresses
	NameReject                    // its flows are rejected or dropped: an empty answer
)

// reply starts a reply to req with the given rcode.
func reply(req *dns.Msg, rcode int) *dns.Msg {
	m := new(dns.Msg)
	m.SetRcode(req, rcode)
	m.RecursionAvailable = true
	return m
}

// udpLimit is the largest reply the client of req takes over UDP.
func udpLimit(req *dns.Msg) int {
	opt := req.IsEdns0()
	if opt == nil {
		return dns.MinMsgSize
	}
	return min(max(int(opt.UDPSize()), dns.MinMsgSize), maxUDPPayload)
}

// pack adds our OPT record when the query had one, cuts resp to limit
// bytes and packs it. A reply that cannot be packed or cut degrades to one
// without records, then to a bare header built from the query.
func pack(query []byte, req, resp *dns.Msg, limit int) []byte {
	resp.Id = req.Id
	resp.Extra = slices.DeleteFunc(resp.Extra, func(rr dns.RR) bool {
		return rr == nil || rr.Header().Rrtype == dns.TypeOPT
	})
	if req.IsEdns0() != nil {
		// We do not validate DNSSEC (fake answers cannot be signed), so
		// the DO bit is not set (RFC 3225 §3 is for servers that do).
		opt := &dns.OPT{Hdr: dns.RR_Header{Name: ".", Rrtype: dns.TypeOPT}}
		opt.SetUDPSize(maxUDPPayload)
		resp.Extra = append(resp.Extra, opt)
	} else if resp.Rcode > 0xF {
		// An extended rcode needs an OPT record to travel in.
		resp = reply(req, dns.RcodeServerFailure)
	}
	resp.Truncate(limit)
	if b, err := resp.Pack(); err == nil && len(b) <= limit {
		return b
	}
	bare := reply(req, dns.RcodeServerFailure)
	if b, err := bare.Pack(); err == nil && len(b) <= limit {
		return b
	}
	return rawReply(query, dns.RcodeServerFailure)
}

// rawReply builds a reply of header only to a query whose header is the
// first 12 bytes of query: its ID, opcode and RD bit, with rcode.
func rawReply(query []byte, rcode int) []byte {
	b := make([]byte, headerLen)
	copy(b[:2], query[:2])
	b[2] = 0x80 | query[2]&0x79 // QR, opcode, RD
	b[3] = 0x80 | byte(rcode&0xF)
	return b
}

// Mode returns the mode the server was built with. In ModeOff the caller
// relays DNS as ordinary traffic; in the other modes it hands every DNS
// message to the server and drops those Answer returns nil for.
func (s *Server) Mode() Mode { return s.mode }

// Resolve returns the name mapped to a fake address, for the flow dialer to
// dial "name:port" instead. It reports false outside fake-ip mode, outside
// the fake ranges, and for an address no name maps to. Call it after Hold,
// so that the mapping cannot change in between.
func (s *Server) Resolve(addr netip.Addr) (name string, ok bool) {
	if s.pool == nil {
		return "", false
	}
	return s.pool.name(addr)
}

// IsFake reports whether addr is inside a fake range, mapped or not. A flow
// to an unmapped fake address has no name to dial and must be refused.
func (s *Server) IsFake(addr netip.Addr) bool {
	return s.pool != nil && s.pool.rangeFor(addr) != nil
}

// Hold pins the mapping of a fake address for the life of a flow: it is
// never recycled for another name until release is called, nor for the
// fake TTL plus a minute after, since the client may come back to it.
// Holds nest;
// release is idempotent. For an address that is not mapped Hold does
// nothing and release is a no-op.
func (s *Server) Hold(addr netip.Addr) (release func()) {
	if s.pool == nil {
		return func() {}
	}
	return s.pool.hold(addr)
}

// opContext bounds one upstream operation by upstreamTimeout and by Close.
func (s *Server) opContext(ctx context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithTimeout(ctx, upstreamTimeout)
	stop := context.AfterFunc(s.ctx, cancel)
	return ctx, func() { stop(); cancel() }
}
