package sniff

import (
	"bytes"
	"crypto/tls"
	"errors"
	"testing"
)

// checkAnswer checks what any sniffer may answer: a valid name and no
// error, or no name and an error that is one of the three sentinels.
func checkAnswer(t *testing.T, name string, err error) {
	t.Helper()
	if err == nil {
		if got, herr := hostName([]byte(name)); herr != nil || got != name {
			t.Fatalf("name %q is not a lower-case host name (%q, %v)", name, got, herr)
		}
		return
	}
	if name != "" {
		t.Fatalf("name %q with error %v", name, err)
	}
	if !errors.Is(err, ErrMore) && !errors.Is(err, ErrNotThis) && !errors.Is(err, ErrNoName) {
		t.Fatalf("error %v is none of ErrMore, ErrNotThis, ErrNoName", err)
	}
}

// checkStreamPrefixes checks that no prefix of b gives an answer that b
// contradicts: a prefix answers ErrMore or what b answers (a name, or the
// same refusal once the refused part is in).
func checkStreamPrefixes(t *testing.T, sniff sniffer, b []byte, name string, err error) {
	t.Helper()
	step := max(1, len(b)/256) // long inputs: a sample of the prefixes
	for i := 0; i < len(b); i += step {
		pn, perr := sniff(b[:i])
		checkAnswer(t, pn, perr)
		if errors.Is(perr, ErrMore) {
			continue
		}
		if err == nil && (perr != nil || pn != name) {
			t.Fatalf("prefix of %d of %d bytes: %q, %v; the whole gives %q", i, len(b), pn, perr, name)
		}
		if errors.Is(err, ErrMore) {
			t.Fatalf("prefix of %d of %d bytes answers %q, %v; the whole asks for more", i, len(b), pn, perr)
		}
	}
}

// fuzzStream runs sniff on b and checks the answer, that b is left as it
// was, and the prefixes of b.
func fuzzStream(t *testing.T, sniff sniffer, b []byte) (string, error) {
	t.Helper()
	in := bytes.Clone(b)
	name, err := sniff(b)
	checkAnswer(t, name, err)
	if !bytes.Equal(in, b) {
		t.Fatal("the sniffer modified its input")
	}
	checkStreamPrefixes(t, sniff, b, name, err)
	return name, err
}

func FuzzTLS(f *testing.F) {
	f.Add(goTLSHello(f, &tls.Config{ServerName: "f.x.test"}, 4096, TLS).all())
	f.Add(goTLSHello(f, &tls.Config{ServerName: "old.x.test", MaxVersion: tls.VersionTLS12}, 4096, TLS).all())
	f.Add(goTLSHello(f, &tls.Config{InsecureSkipVerify: true}, 4096, TLS).all())
	f.Add([]byte("\x16\x03\x01\x00\x05\x01\x00\x00\x01\x03"))
	f.Fuzz(func(t *testing.T, b []byte) { fuzzStream(t, TLS, b) })
}

func FuzzHTTP(f *testing.F) {
	f.Add([]byte("GET / HTTP/1.1\r\nHost: x.test:8080\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n"))
	f.Add([]byte("POST /form HTTP/1.0\nhost: [::1]:80\n\n"))
	f.Add([]byte("CONNECT a.test:443 HTTP/1.1\r\nHost: a.test:443\r\n\r\n"))
	f.Add([]byte("GET / HTTP/1.1\r\nX: y\r\n\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		name, err := fuzzStream(t, HTTP, b)
		sname, p, serr := Stream(b)
		checkAnswer(t, sname, serr)
		if len(b) > 0 && b[0] != recordHandshake && (p != ProtoHTTP || sname != name || !errors.Is(serr, errorsSentinel(err))) {
			t.Fatalf("Stream = %q, %v, %v; HTTP = %q, %v", sname, p, serr, name, err)
		}
	})
}

// errorsSentinel returns the sentinel err wraps, or nil.
func errorsSentinel(err error) error {
	for _, s := range []error{ErrMore, ErrNotThis, ErrNoName} {
		if errors.Is(err, s) {
			return s
		}
	}
	return nil
}

// checkQUICBounds checks what a QUIC holds after any input.
func checkQUICBounds(t *testing.T, q *QUIC, largest int) {
	t.Helper()
	if len(q.crypto) > MaxHello || len(q.spans) > maxCryptoSpans || len(q.keys) > maxKeys || q.fed > MaxDatagrams {
		t.Fatalf("bounds passed: crypto %d, spans %d, keys %d, fed %d", len(q.crypto), len(q.spans), len(q.keys), q.fed)
	}
	if cap(q.plain) > largest || cap(q.header) > largest {
		t.Fatalf("scratch of %d and %d bytes for datagrams of at most %d", cap(q.plain), cap(q.header), largest)
	}
	for i, s := range q.spans {
		if s.start >= s.end || s.end > len(q.crypto) || i > 0 && q.spans[i-1].end >= s.start {
			t.Fatalf("spans out of order, empty, touching or past the data: %v (data %d)", q.spans, len(q.crypto))
		}
	}
}

// feedAll feeds datagrams, checking that answers before the last are
// ErrMore or the last answer, and the bounds.
func feedAll(t *testing.T, grams [][]byte) {
	t.Helper()
	var q QUIC
	largest := 0
	var answers []error
	var names []string
	for _, g := range grams {
		largest = max(largest, len(g))
		in := bytes.Clone(g)
		name, err := q.Feed(g)
		checkAnswer(t, name, err)
		checkQUICBounds(t, &q, largest)
		if !bytes.Equal(in, g) {
			t.Fatal("Feed modified its input")
		}
		answers, names = append(answers, err), append(names, name)
	}
	last := len(answers) - 1
	for i := range last {
		if !errors.Is(answers[i], ErrMore) && (names[i] != names[last] || errorsSentinel(answers[i]) != errorsSentinel(answers[last])) {
			t.Fatalf("datagram %d answered %q, %v, the last %q, %v", i, names[i], answers[i], names[last], answers[last])
		}
	}
}

// cut splits b into up to three datagrams at the two offsets.
func cut(b []byte, a, c uint16) [][]byte {
	i, j := min(int(a), len(b)), min(int(c), len(b))
	if i > j {
		i, j = j, i
	}
	var out [][]byte
	for _, g := range [][]byte{b[:i], b[i:j], b[j:]} {
		if len(g) > 0 {
			out = append(out, g)
		}
	}
	return out
}

// FuzzQUIC feeds datagrams as they come off the wire. Mutated ciphertext
// does not open, so this reaches the header parsing and the AEAD check;
// FuzzQUICPayload reaches the frames.
func FuzzQUIC(f *testing.F) {
	v1 := rfcPacket(f, "rfc9001-a2-client-initial.hex")
	v2 := rfcPacket(f, "rfc9369-a2-client-initial.hex")
	f.Add(v1, uint16(len(v1)), uint16(len(v1)))
	f.Add(append(bytes.Clone(v2), v1...), uint16(len(v2)), uint16(len(v2)+len(v1)))
	grams, _, _ := quicFirstFlight(f, "f.x.test")
	all := bytes.Join(grams, nil)
	f.Add(all, uint16(len(grams[0])), uint16(len(all)))
	f.Fuzz(func(t *testing.T, b []byte, a, c uint16) {
		feedAll(t, cut(b, a, c))
	})
}

// FuzzQUICPayload seals fuzzed payloads as real Initial packets, so that
// the frame parser and CRYPTO reassembly see every input the fuzzer makes.
func FuzzQUICPayload(f *testing.F) {
	hello := realQUICHello(f, "f.x.test")
	whole := cryptoFrames(hello, [][2]int{{0, len(hello)}}, 0)
	f.Add(whole, uint16(len(whole)/2), uint16(len(whole)), false)
	shuffled := cryptoFrames(hello, [][2]int{{900, len(hello)}, {0, 400}, {400, 900}}, 0)
	f.Add(shuffled, uint16(len(shuffled)/3), uint16(len(shuffled)*2/3), true)
	f.Add([]byte{frameAckECN, 5, 0, 1, 0, 1, 1, 0, 0, 0, framePing, frameConnClose, 1, 0, 0}, uint16(3), uint16(9), false)
	f.Fuzz(func(t *testing.T, payload []byte, a, c uint16, v2 bool) {
		v := &quicVersions[0]
		if v2 {
			v = &quicVersions[1]
		}
		var grams [][]byte
		for i, p := range cut(payload, a, c) {
			// Pad each datagram as a client must, with PADDING frames.
			p = append(bytes.Clone(p), make([]byte, max(0, minInitialDatagram-len(p))+8)...)
			grams = append(grams, sealInitial(t, v, rfcDCID, uint32(i), p))
		}
		if len(grams) == 0 {
			return
		}
		feedAll(t, grams)
	})
}
