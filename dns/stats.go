package dns

// answerKind is the path a query took to its answer.
type answerKind int

const (
	answerFake      answerKind = iota // a fake address (fake-ip mode)
	answerDirect                      // real addresses from the direct resolver (--dns-direct)
	answerForwarded                   // forwarded to the upstream, or its cached answer
	answerRejected                    // an empty answer for a name the rules reject (Config.Policy)
	numAnswerKinds
)

// Stats are a Server's counters since New, read at once by Stats; none is
// updated per packet beyond one atomic add per query.
type Stats struct {
	Queries uint64 // queries answered, whatever the answer
	// Fake, Direct and Forwarded count the queries answered each way.
	// The rest (Queries less the three) were answered by the server
	// itself: malformed queries, refused zone transfers, HTTPS and SVCB
	// records left empty, families with no fake range, an exhausted pool.
	Fake, Direct, Forwarded uint64
	// Rejected counts the queries for names the rules reject, answered
	// empty.
	Rejected      uint64
	PoolExhausted uint64 // fake A and AAAA queries answered SERVFAIL: no address free
	// FakeV4 and FakeV6 are the names each fake range holds now; their
	// sizes are the addresses the ranges can give (0 without a range).
	FakeV4, FakeV6         int
	FakeV4Size, FakeV6Size uint64
}

// Stats reads the counters; it takes the pool's lock once, in fake-ip mode.
func (s *Server) Stats() Stats {
	st := Stats{
		Queries:       s.queries.Load(),
		Fake:          s.answered[answerFake].Load(),
		Direct:        s.answered[answerDirect].Load(),
		Forwarded:     s.answered[answerForwarded].Load(),
		Rejected:      s.answered[answerRejected].Load(),
		PoolExhausted: s.poolExhausted.Load(),
	}
	if s.pool != nil {
		st.FakeV4, st.FakeV6 = s.pool.mappings()
		if s.pool.v4 != nil {
			st.FakeV4Size = s.pool.v4.size
		}
		if s.pool.v6 != nil {
			st.FakeV6Size = s.pool.v6.size
		}
	}
	return st
}
