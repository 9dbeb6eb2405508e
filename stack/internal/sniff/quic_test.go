package sniff

import (
	"bytes"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"strings"
	"testing"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// rfcPacket reads a protected packet published as a test vector, hex with
// # comments.
func rfcPacket(t testing.TB, file string) []byte {
	t.Helper()
	raw, err := os.ReadFile("testdata/" + file)
	if err != nil {
		t.Fatal(err)
	}
	var h strings.Builder
	for line := range strings.Lines(string(raw)) {
		if !strings.HasPrefix(line, "#") {
			h.WriteString(strings.TrimSpace(line))
		}
	}
	b, err := hex.DecodeString(h.String())
	if err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	return b
}

// rfcPayload is the unprotected payload of the client Initial of RFC 9001
// A.2 and RFC 9369 A.2: one CRYPTO frame with a ClientHello for
// example.com, then PADDING to 1162 bytes.
func rfcPayload(t testing.TB) []byte {
	t.Helper()
	frame, err := hex.DecodeString("" +
		"060040f1010000ed0303ebf8fa56f12939b9584a3896472ec40bb863cfd3e868" +
		"04fe3a47f06a2b69484c00000413011302010000c000000010000e00000b6578" +
		"616d706c652e636f6dff01000100000a00080006001d00170018001000070005" +
		"04616c706e000500050100000000003300260024001d00209370b2c9caa47fba" +
		"baf4559fedba753de171fa71f50f1ce15d43e994ec74d748002b000302030400" +
		"0d0010000e0403050306030203080408050806002d00020101001c0002400100" +
		"3900320408ffffffffffffffff05048000ffff07048000ffff08011001048000" +
		"75300901100f088394c8f03e51570806048000ffff")
	if err != nil {
		t.Fatal(err)
	}
	return append(frame, make([]byte, 1162-len(frame))...)
}

var rfcDCID = []byte{0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08}

// TestQUICRFCVectors opens the client Initials published in RFC 9001 A.2
// (v1) and RFC 9369 A.2 (v2), and checks that sealInitial, which the other
// tests build packets with, makes exactly those bytes.
func TestQUICRFCVectors(t *testing.T) {
	for _, tc := range []struct {
		name string
		file string
		v    *quicVersion
	}{
		{"v1", "rfc9001-a2-client-initial.hex", &quicVersions[0]},
		{"v2", "rfc9369-a2-client-initial.hex", &quicVersions[1]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := rfcPacket(t, tc.file)
			var q QUIC
			if name, err := q.Feed(pkt); err != nil || name != "example.com" {
				t.Fatalf("Feed = %q, %v; want example.com", name, err)
			}
			if got := sealInitial(t, tc.v, rfcDCID, 2, rfcPayload(t)); !bytes.Equal(got, pkt) {
				t.Fatalf("sealInitial does not reproduce the RFC's packet:\n got %x\nwant %x", got[:64], pkt[:64])
			}
			// A flipped bit anywhere must fail: the header through the
			// protection, the payload through the AEAD tag.
			for _, i := range []int{0, 5, 17, 20, 100, len(pkt) - 1} {
				bad := bytes.Clone(pkt)
				bad[i] ^= 0x10
				var q QUIC
				if name, err := q.Feed(bad); !errors.Is(err, ErrNotThis) {
					t.Errorf("bit flipped at %d: Feed = %q, %v; want ErrNotThis", i, name, err)
				}
			}
		})
	}
}

// sealInitial protects payload as a client Initial packet of version v
// with a four-byte packet number (RFC 9001 §5.3 and §5.4), the inverse of
// what QUIC.Feed opens. TestQUICRFCVectors checks it against the RFCs.
func sealInitial(t testing.TB, v *quicVersion, dcid []byte, pn uint32, payload []byte) []byte {
	t.Helper()
	k, err := deriveKeys(v, dcid)
	if err != nil {
		t.Fatal(err)
	}
	n := 4 + len(payload) + 16
	hdr := []byte{0xc0 | v.initial<<4 | 3, byte(v.id >> 24), byte(v.id >> 16), byte(v.id >> 8), byte(v.id)}
	hdr = append(hdr, byte(len(dcid)))
	hdr = append(hdr, dcid...)
	hdr = append(hdr, 0, 0, 0x40|byte(n>>8), byte(n)) // no SCID, no token, two-byte length
	pnOff := len(hdr)
	hdr = append(hdr, byte(pn>>24), byte(pn>>16), byte(pn>>8), byte(pn))
	nonce := k.iv
	for i := range 4 {
		nonce[11-i] ^= byte(pn >> (8 * i))
	}
	pkt := k.aead.Seal(bytes.Clone(hdr), nonce[:], payload, hdr)
	var mask [16]byte
	k.hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+20])
	pkt[0] ^= mask[0] & 0x0f
	for i := range 4 {
		pkt[pnOff+i] ^= mask[1+i]
	}
	return pkt
}

// quicFirstFlight has a real QUIC client (golang.org/x/net/quic) send its
// first datagrams to a socket that never answers, and returns those it sent
// until the sniffer answered, with the answer.
func quicFirstFlight(t testing.TB, serverName string) ([][]byte, string, error) {
	t.Helper()
	var (
		q    QUIC
		name string
		err  error
	)
	grams := netnstest.QUICFirstFlight(t, serverName, func(grams [][]byte) bool {
		name, err = q.Feed(grams[len(grams)-1])
		return !errors.Is(err, ErrMore)
	})
	return grams, name, err
}

// TestQUICClient sniffs the Initials of a real QUIC client, whose hello
// with an X25519MLKEM768 key share spans two datagrams, fed in the order
// sent and in reverse.
func TestQUICClient(t *testing.T) {
	grams, name, err := quicFirstFlight(t, "q.x.test")
	if err != nil || name != "q.x.test" {
		t.Fatalf("Feed = %q, %v; want q.x.test", name, err)
	}
	if len(grams) < 2 {
		t.Fatalf("hello in %d datagram; the test wants one that spans two (post-quantum key share)", len(grams))
	}
	t.Logf("hello in %d datagrams of %d, %d bytes", len(grams), len(grams[0]), len(grams[1]))
	var q QUIC
	for i := len(grams) - 1; i >= 0; i-- {
		name, err := q.Feed(grams[i])
		if i > 0 && !errors.Is(err, ErrMore) {
			t.Fatalf("reversed, datagram %d: Feed = %q, %v; want ErrMore", i, name, err)
		}
		if i == 0 && (err != nil || name != "q.x.test") {
			t.Fatalf("reversed, last: Feed = %q, %v; want q.x.test", name, err)
		}
	}
	// Once answered, the answer stays.
	if name, err := q.Feed([]byte("junk")); err != nil || name != "q.x.test" {
		t.Fatalf("after the answer: Feed = %q, %v", name, err)
	}
}

// TestQUICClientNoName dials an address: the client sends no server_name.
func TestQUICClientNoName(t *testing.T) {
	if _, name, err := quicFirstFlight(t, ""); !errors.Is(err, ErrNoName) {
		t.Fatalf("Feed = %q, %v; want ErrNoName", name, err)
	}
}

// realQUICHello returns the ClientHello a real QUIC client sent, as the
// CRYPTO stream carried it.
func realQUICHello(t testing.TB, serverName string) []byte {
	t.Helper()
	grams, _, err := quicFirstFlight(t, serverName)
	if err != nil {
		t.Fatal(err)
	}
	var q QUIC
	for _, g := range grams {
		_, _ = q.Feed(g)
	}
	n, err := helloLen(q.crypto)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Clone(q.crypto[:n])
}

// TestQUICShuffled cuts a real hello into CRYPTO frames in shuffled order,
// as Chrome sends them, with PING and PADDING between, over two Initial
// packets in v1 and v2, sent as two datagrams or coalesced in one, in
// either order.
func TestQUICShuffled(t *testing.T) {
	hello := realQUICHello(t, "shuffle.x.test")
	rng := rand.New(rand.NewPCG(1, 2))
	for _, v := range []*quicVersion{&quicVersions[0], &quicVersions[1]} {
		for trial := range 20 {
			// Cut into pieces at random offsets, then shuffle them.
			var pieces [][2]int
			for off := 0; off < len(hello); {
				n := min(1+rng.IntN(400), len(hello)-off)
				pieces = append(pieces, [2]int{off, off + n})
				off += n
			}
			rng.Shuffle(len(pieces), func(i, j int) { pieces[i], pieces[j] = pieces[j], pieces[i] })
			half := len(pieces) / 2
			payloads := [2][]byte{
				cryptoFrames(hello, pieces[:half], 1200),
				cryptoFrames(hello, pieces[half:], 1200),
			}
			dcid := []byte{byte(trial), 1, 2, 3, 4, 5, 6, 7, 8}
			p0 := sealInitial(t, v, dcid, 0, payloads[0])
			p1 := sealInitial(t, v, dcid, 1, payloads[1])
			for _, feed := range [][][]byte{
				{p0, p1},
				{p1, p0},
				{append(bytes.Clone(p0), p1...)},
				{append(bytes.Clone(p1), p0...)},
			} {
				var q QUIC
				var name string
				var err error
				for i, d := range feed {
					name, err = q.Feed(d)
					if i < len(feed)-1 && !errors.Is(err, ErrMore) {
						t.Fatalf("v%x trial %d: datagram %d: %q, %v; want ErrMore", v.id, trial, i, name, err)
					}
				}
				if err != nil || name != "shuffle.x.test" {
					t.Fatalf("v%x trial %d: Feed = %q, %v", v.id, trial, name, err)
				}
			}
		}
	}
}

// cryptoFrames writes CRYPTO frames for the pieces of data, with a PING
// first and PADDING to size.
func cryptoFrames(data []byte, pieces [][2]int, size int) []byte {
	b := []byte{framePing}
	for _, p := range pieces {
		b = append(b, frameCrypto)
		b = appendVarint(b, uint64(p[0]))
		b = appendVarint(b, uint64(p[1]-p[0]))
		b = append(b, data[p[0]:p[1]]...)
	}
	if len(b) < size {
		b = append(b, make([]byte, size-len(b))...)
	}
	return b
}

// appendVarint appends v as a QUIC varint of two or four bytes.
func appendVarint(b []byte, v uint64) []byte {
	if v < 1<<14 {
		return append(b, 0x40|byte(v>>8), byte(v))
	}
	return append(b, 0x80|byte(v>>24), byte(v>>16), byte(v>>8), byte(v))
}

// TestQUICNotInitial checks what is let go at once and the bounds.
func TestQUICNotInitial(t *testing.T) {
	v1 := rfcPacket(t, "rfc9001-a2-client-initial.hex")
	pad := func(b []byte) []byte { return append(b, make([]byte, 1200)...) }
	for _, tc := range []struct {
		name string
		in   []byte
	}{
		{"short", v1[:1199]},
		{"dns-like", pad([]byte{0x12, 0x34, 0x01, 0x00})},
		{"short-header", pad([]byte{0x40, 1, 2, 3})},
		{"version-negotiation", pad([]byte{0xc0, 0, 0, 0, 0, 8})},
		{"unknown-version", pad([]byte{0xc0, 0xff, 0, 0, 0x1d, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x41, 0})},
		{"dcid-too-short", pad([]byte{0xc0, 0, 0, 0, 1, 4, 1, 2, 3, 4, 0, 0, 0x41, 0})},
		{"dcid-too-long", pad(append([]byte{0xc0, 0, 0, 0, 1, 21}, make([]byte, 30)...))},
		{"retry", pad([]byte{0xf0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0})},
		{"zero-rtt-only", pad([]byte{0xd0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x41, 0})},
		{"handshake-first", pad([]byte{0xe0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x41, 0})},
		{"length-past-end", pad([]byte{0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x7f, 0xff})},
		{"does-not-open", pad([]byte{0xc0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x44, 0})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var q QUIC
			if name, err := q.Feed(tc.in); !errors.Is(err, ErrNotThis) {
				t.Fatalf("Feed = %q, %v; want ErrNotThis", name, err)
			}
		})
	}
	t.Run("frames", func(t *testing.T) {
		for _, tc := range []struct {
			name    string
			payload []byte
			err     error
		}{
			{"stream-frame", []byte{0x08, 0, 1, 'x'}, ErrNotThis},
			{"crypto-past-bound", append([]byte{frameCrypto, 0x80, 0, 0x40, 0}, 1), ErrNotThis},
			{"crypto-past-end", []byte{frameCrypto, 0, 5, 1}, ErrNotThis},
			{"ack", []byte{frameAckECN, 5, 0, 1, 0, 1, 1, 0, 0, 0, framePing}, ErrMore},
			{"ack-too-many-ranges", []byte{frameAck, 5, 0, 0x80, 0x10, 0, 0, 0}, ErrNotThis},
			{"not-a-hello", []byte{frameCrypto, 0, 4, 2, 0, 0, 0}, ErrNotThis},
			{"hello-too-large", []byte{frameCrypto, 0, 4, 1, 0, 0x40, 0}, ErrNotThis},
			{"conn-close", []byte{frameConnClose, 1, 0, 2, 'h', 'i'}, ErrMore},
		} {
			var q QUIC
			name, err := q.Feed(sealInitial(t, &quicVersions[0], rfcDCID, 0, append(tc.payload, make([]byte, 1200)...)))
			if !errors.Is(err, tc.err) {
				t.Errorf("%s: Feed = %q, %v; want %v", tc.name, name, err, tc.err)
			}
		}
	})
	t.Run("datagram-bound", func(t *testing.T) {
		var q QUIC
		ping := sealInitial(t, &quicVersions[0], rfcDCID, 0, append([]byte{framePing}, make([]byte, 1200)...))
		for i := range MaxDatagrams {
			name, err := q.Feed(ping)
			want := ErrMore
			if i == MaxDatagrams-1 {
				want = ErrNotThis
			}
			if !errors.Is(err, want) {
				t.Fatalf("datagram %d: Feed = %q, %v; want %v", i+1, name, err, want)
			}
		}
	})
}

// TestQUICCoalescedTail checks what may follow the first Initial of a
// datagram: what RFC 9000 §12.2 lets a receiver ignore is ignored, while
// an authenticated Initial of the same connection is held to the rules.
func TestQUICCoalescedTail(t *testing.T) {
	v1 := rfcPacket(t, "rfc9001-a2-client-initial.hex")
	stream := append([]byte{0x08, 0, 1, 'x'}, make([]byte, 40)...) // a STREAM frame: never in an Initial
	otherDCID := []byte{9, 9, 9, 9, 9, 9, 9, 9}
	zeroRTT := []byte{0xd0, 0, 0, 0, 1, 8, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0x41, 0}
	for _, tc := range []struct {
		name string
		tail []byte
		err  error
	}{
		{"garbage-with-long-header-bit", bytes.Repeat([]byte{0xff}, 40), nil},
		{"short-header", []byte{0x40, 1, 2, 3}, nil},
		{"zero-rtt", append(zeroRTT, make([]byte, 0x100)...), nil},
		{"initial-of-another-connection", sealInitial(t, &quicVersions[0], otherDCID, 3, stream), nil},
		{"initial-that-does-not-open", func() []byte {
			p := sealInitial(t, &quicVersions[0], rfcDCID, 3, stream)
			p[len(p)-1] ^= 1
			return p
		}(), nil},
		{"initial-with-stream-frame", sealInitial(t, &quicVersions[0], rfcDCID, 3, stream), ErrNotThis},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var q QUIC
			name, err := q.Feed(append(bytes.Clone(v1), tc.tail...))
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Fatalf("Feed = %q, %v; want %v", name, err, tc.err)
				}
				return
			}
			if err != nil || name != "example.com" {
				t.Fatalf("Feed = %q, %v; want example.com", name, err)
			}
		})
	}
}
