package dns

import (
	"net/netip"
	"testing"

	"github.com/miekg/dns"
)

// TestStatsAnswerKinds: Stats counts queries by how they were answered and
// the fake-ip pool's use (issue 16's metrics read these).
func TestStatsAnswerKinds(t *testing.T) {
	s := fakeServer(t, Config{FakeRanges: []netip.Prefix{netip.MustParsePrefix("198.19.0.0/29")}})
	answerAddr(t, fakeA(t, s, 1, "a.test"))
	answerAddr(t, fakeA(t, s, 2, "b.test"))
	answerAddr(t, fakeA(t, s, 3, "a.test")) // the same mapping again
	q := query(t, 4, "a.test", dns.TypeTXT, 0)
	s.Answer(t.Context(), q, false) // forwarded: the upstream refuses, SERVFAIL
	q = query(t, 5, "a.test", dns.TypeHTTPS, 0)
	s.Answer(t.Context(), q, false) // answered here, empty
	got := s.Stats()
	want := Stats{Queries: 5, Fake: 3, Forwarded: 1, FakeV4: 2, FakeV4Size: 5}
	if got != want {
		t.Errorf("Stats() = %+v, want %+v", got, want)
	}
}
