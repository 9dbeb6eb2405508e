package httpconnect

import (
	"bytes"
	"errors"
	"strings"
	"testing"
)

// FuzzParseResponse checks that ParseResponseHead never panics, never claims
// more than it was given or MaxHeadLen, ends the head at its first blank
// line, and reads the same head from every longer input; and that reading
// as the dialer does, one byte at a time until it stops saying
// ErrTruncated, stops at exactly that head. Seeds beyond these live in
// testdata/fuzz/FuzzParseResponse.
func FuzzParseResponse(f *testing.F) {
	f.Add([]byte("HTTP/1.0 200 Connection established\r\nProxy-agent: tinyproxy/1.11.1\r\n\r\nbanner"))
	f.Add([]byte("HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"x\"\r\n\r\n<html>"))
	f.Add([]byte("HTTP/1.1 200 OK\n\n"))
	f.Add([]byte("HTTP/1.1 502\r\n\r\n"))
	f.Add([]byte("HTTP/1.1 200 OK\r\nX: a\r\n"))
	f.Add([]byte("HTTP/1.1 2"))
	f.Add([]byte("\x05\x00"))
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, b []byte) {
		resp, n, err := ParseResponseHead(b)
		if err != nil {
			if n != 0 {
				t.Fatalf("failed (%v) with n = %d", err, n)
			}
			if errors.Is(err, ErrTruncated) && len(b) >= MaxHeadLen {
				t.Fatalf("ErrTruncated for %d bytes, past MaxHeadLen", len(b))
			}
			return
		}
		head := b[:n]
		if n > len(b) || n > MaxHeadLen || !bytes.HasSuffix(head, []byte("\n")) {
			t.Fatalf("head of %d bytes in %d: %q", n, len(b), head)
		}
		if end := bytes.Index(bytes.ReplaceAll(head, []byte("\r\n"), []byte("\n")), []byte("\n\n")); end < 0 {
			t.Fatalf("head %q has no blank line", head)
		}
		if resp.StatusCode < 100 || resp.StatusCode > 599 || !strings.HasPrefix(resp.Proto, "HTTP/") {
			t.Fatalf("parsed %+v", resp)
		}
		if strings.ContainsAny(resp.Reason+resp.ProxyAuthenticate, "\r\n") {
			t.Fatalf("line break in %+v", resp)
		}
		again, m, err := ParseResponseHead(head)
		if err != nil || m != n || again != resp {
			t.Fatalf("head alone parses as %+v, %d, %v; with what follows %+v, %d", again, m, err, resp, n)
		}
		for k := range n {
			if _, _, err := ParseResponseHead(head[:k]); !errors.Is(err, ErrTruncated) {
				t.Fatalf("prefix of %d of %d bytes = %v, want ErrTruncated", k, n, err)
			}
		}
	})
}
