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
