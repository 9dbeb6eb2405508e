package socks5

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParseReply checks that ParseReply and ReplyLen agree on every input
// and that a parsed reply is exactly the bytes it was parsed from: the
// dialer reads by ReplyLen and parses with ParseReply, so a disagreement
// would over-read into the data stream or stall. Seeds beyond these live in
// testdata/fuzz/FuzzParseReply.
func FuzzParseReply(f *testing.F) {
	f.Add([]byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x05, 0x00, 0x00, 0x01, 127, 0, 0, 1, 0x04, 0x38, 'd', 'a', 't', 'a'})
	f.Add([]byte{0x05, 0x00, 0x00, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x04, 0x38})
	f.Add(append(append([]byte{0x05, 0x00, 0x00, 0x03, 9}, "proxy.lan"...), 0x04, 0x38))
	f.Add([]byte{0x05, 0x05, 0x00, 0x01, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x05, 0x00, 0x00, 0x03})
	f.Add([]byte{0x05, 0x00, 0x00, 0x03, 0, 0, 80})
	f.Add([]byte{0x05, 0x00, 0x00, 0x04, 0, 0})
	f.Add([]byte{0x05, 0x00})
	f.Add([]byte{})
	f.Add([]byte("HTTP/1.1 400 Bad Request\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		reply, n, err := ParseReply(b)
		need, lenErr := ReplyLen(b)
		if err != nil {
			truncated := errors.Is(err, ErrTruncated)
			switch {
			case truncated && (lenErr != nil || need <= len(b)):
				t.Fatalf("ParseReply says truncated, ReplyLen = %d, %v for %d bytes", need, lenErr, len(b))
			case !truncated && lenErr == nil:
				t.Fatalf("ParseReply = %v, but ReplyLen = %d with no error", err, need)
			}
			return
		}
		if n <= 0 || n > len(b) {
			t.Fatalf("ParseReply took %d of %d bytes", n, len(b))
		}
		if lenErr != nil || need != n {
			t.Fatalf("ParseReply took %d bytes, ReplyLen = %d, %v", n, need, lenErr)
		}
		enc, err := AppendReply(nil, reply)
		if err != nil {
			t.Fatalf("AppendReply(%+v) = %v", reply, err)
		}
		if !bytes.Equal(enc, b[:n]) {
			t.Fatalf("re-encoded %x, parsed from %x", enc, b[:n])
		}
		// Reading as the dialer does, growing the prefix to what ReplyLen
		// asks for, must arrive at exactly n and never ask past it.
		for k := 0; k < n; {
			need, err := ReplyLen(b[:k])
			if err != nil || need <= k || need > n {
				t.Fatalf("ReplyLen of %d-byte prefix = %d, %v; reply is %d bytes", k, need, err, n)
			}
			if _, _, err := ParseReply(b[:k]); !errors.Is(err, ErrTruncated) {
				t.Fatalf("ParseReply of %d-byte prefix = %v, want ErrTruncated", k, err)
			}
			k = need
		}
		if (reply.Err() == nil) != (reply.Code == ReplySucceeded) {
			t.Fatalf("code %d gave Err() = %v", reply.Code, reply.Err())
		}
	})
}

// FuzzParseUDPHeader checks that a datagram from a relay never makes
// ParseUDPHeader panic or claim more than the datagram holds, and that a
// header it accepts is exactly the bytes it was parsed from, so the data
// handed on starts where the relay put it. Seeds beyond these live in
// testdata/fuzz/FuzzParseUDPHeader.
func FuzzParseUDPHeader(f *testing.F) {
	f.Add([]byte{0, 0, 0, 0x01, 127, 0, 0, 1, 0, 53, 'd', 'n', 's'})
	f.Add([]byte{0, 0, 0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0x01, 0xBB})
	f.Add(append(append([]byte{0, 0, 0, 0x03, 9}, "localhost"...), 0, 7, 'x'))
	f.Add([]byte{0, 0, 1, 0x01, 127, 0, 0, 1, 0, 53})
	f.Add([]byte{0, 0, 0, 0x03, 0, 0, 53})
	f.Add([]byte{0, 0, 0, 0x03, 200, 'a'})
	f.Add([]byte{0, 1, 0, 0x01, 127, 0, 0, 1, 0, 53})
	f.Add([]byte{0, 0, 0})
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, n, err := ParseUDPHeader(b)
		if err != nil {
			if n != 0 {
				t.Fatalf("ParseUDPHeader failed (%v) but reported %d bytes", err, n)
			}
			return
		}
		if n < udpHeadLen+1+2 || n > len(b) || n > MaxUDPHeaderLen {
			t.Fatalf("header of %d bytes in a %d-byte datagram", n, len(b))
		}
		enc, err := AppendUDPHeader(nil, h)
		if err != nil {
			t.Fatalf("AppendUDPHeader(%+v) = %v", h, err)
		}
		if !bytes.Equal(enc, b[:n]) {
			t.Fatalf("re-encoded %x, parsed from %x", enc, b[:n])
		}
		// The header does not depend on the data after it.
		again, m, err := ParseUDPHeader(b[:n])
		if err != nil || m != n || again != h {
			t.Fatalf("header alone parses as %+v, %d, %v; with data %+v, %d", again, m, err, h, n)
		}
	})
}
