package socks4

import (
	"bytes"
	"errors"
	"testing"
)

// FuzzParseReply checks that ParseReply accepts exactly the 8-byte messages
// with VN 0 or 4, that what it accepts re-encodes to the same bytes (VN
// aside), and that only code 90 reads as success. Seeds beyond these live
// in testdata/fuzz/FuzzParseReply.
func FuzzParseReply(f *testing.F) {
	f.Add([]byte{0x00, 90, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x00, 91, 0x1F, 0x90, 127, 0, 0, 1})
	f.Add([]byte{0x04, 92, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x05, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0})
	f.Add([]byte{0x00, 90, 0})
	f.Add([]byte{})
	f.Add([]byte("HTTP/1.1 400 Bad Request\r\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		reply, err := ParseReply(b)
		valid := len(b) == ReplyLen && (b[0] == 0x00 || b[0] == Version)
		if (err == nil) != valid {
			t.Fatalf("ParseReply(%x) = %v", b, err)
		}
		if errors.Is(err, ErrTruncated) != (len(b) < ReplyLen) {
			t.Fatalf("ParseReply of %d bytes = %v", len(b), err)
		}
		if err != nil {
			return
		}
		enc := AppendReply(nil, reply)
		if len(enc) != ReplyLen || enc[0] != 0x00 || !bytes.Equal(enc[1:], b[1:]) {
			t.Fatalf("re-encoded %x, parsed from %x", enc, b)
		}
		if (reply.Err() == nil) != (reply.Code == ReplyGranted) {
			t.Fatalf("code %d gave Err() = %v", reply.Code, reply.Err())
		}
	})
}
