package sniff

import (
	"context"
	"crypto/tls"
	"errors"
	"os/exec"
	"testing"
)

// TestTLSGoClient sniffs the ClientHellos of Go's crypto/tls client, whose
// default key shares include X25519MLKEM768 (a hello of about 1.8 KB), read
// in pieces as TCP may deliver them.
func TestTLSGoClient(t *testing.T) {
	for _, tc := range []struct {
		name   string
		cfg    *tls.Config
		chunk  int
		want   string
		errIs  error
		minLen int
	}{
		{name: "sni", cfg: &tls.Config{ServerName: "x.test"}, chunk: 4096, want: "x.test", minLen: 1400},
		{name: "sni-upper-case", cfg: &tls.Config{ServerName: "WWW.Example.TEST"}, chunk: 4096, want: "www.example.test"},
		{name: "sni-read-in-97-byte-pieces", cfg: &tls.Config{ServerName: "pieces.x.test"}, chunk: 97, want: "pieces.x.test"},
		{name: "sni-read-byte-by-byte", cfg: &tls.Config{ServerName: "b.x.test"}, chunk: 1, want: "b.x.test"},
		{name: "tls12-only", cfg: &tls.Config{ServerName: "old.x.test", MaxVersion: tls.VersionTLS12}, chunk: 4096, want: "old.x.test"},
		// Go sends no server_name for an address (RFC 6066 §3).
		{name: "no-sni-address", cfg: &tls.Config{ServerName: "192.0.2.1"}, chunk: 4096, errIs: ErrNoName},
		{name: "no-sni", cfg: &tls.Config{InsecureSkipVerify: true}, chunk: 4096, errIs: ErrNoName},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := goTLSHello(t, tc.cfg, tc.chunk, TLS)
			if tc.errIs != nil {
				if !errors.Is(a.err, tc.errIs) {
					t.Fatalf("TLS = %q, %v; want %v", a.name, a.err, tc.errIs)
				}
				return
			}
			if a.err != nil || a.name != tc.want {
				t.Fatalf("TLS = %q, %v; want %q", a.name, a.err, tc.want)
			}
			if n := len(a.all()); n < tc.minLen {
				t.Fatalf("hello of %d bytes; want at least %d (a post-quantum key share)", n, tc.minLen)
			}
			if tc.chunk < 100 && len(a.reads) < 10 {
				t.Fatalf("hello came in %d reads; the test wants it cut", len(a.reads))
			}
		})
	}
}

// TestTLSRecordsSplit cuts a real hello into many records, as some
// censorship-evasion tools do, and checks each cut and every prefix.
func TestTLSRecordsSplit(t *testing.T) {
	hello := goTLSHello(t, &tls.Config{ServerName: "split.x.test"}, 4096, TLS).all()
	msg := hello[recordHeaderLen:]
	for _, size := range []int{1, 2, 3, 5, 100, 517, len(msg) - 1} {
		b := splitRecords(hello, size)
		name, err := TLS(b)
		records := (len(msg) + size - 1) / size
		if records > maxRecords {
			if !errors.Is(err, ErrNotThis) {
				t.Errorf("%d records of %d: TLS = %q, %v; want ErrNotThis past %d records", records, size, name, err, maxRecords)
			}
			continue
		}
		if err != nil || name != "split.x.test" {
			t.Errorf("%d records of %d: TLS = %q, %v", records, size, name, err)
		}
		checkPrefixes(t, TLS, b, "split.x.test")
	}
}

// splitRecords re-frames the hello in a one-record stream into records of
// at most size bytes.
func splitRecords(stream []byte, size int) []byte {
	var b []byte
	for rest := stream[recordHeaderLen:]; len(rest) > 0; {
		n := min(size, len(rest))
		b = append(b, recordHandshake, 3, 1, byte(n>>8), byte(n))
		b = append(b, rest[:n]...)
		rest = rest[n:]
	}
	return b
}

// checkPrefixes checks that every prefix of b gives ErrMore or want.
func checkPrefixes(t *testing.T, sniff sniffer, b []byte, want string) {
	t.Helper()
	for i := range len(b) {
		name, err := sniff(b[:i])
		if !errors.Is(err, ErrMore) && (err != nil || name != want) {
			t.Fatalf("prefix of %d of %d bytes: %q, %v; want ErrMore or %q", i, len(b), name, err, want)
		}
	}
}

// TestTLSOpenSSL sniffs the hello of `openssl s_client -servername`.
func TestTLSOpenSSL(t *testing.T) {
	for _, tc := range []struct{ name, flag string }{
		{"tls13", "-tls1_3"},
		{"tls12", "-tls1_2"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := captureFromCommand(t, "tcp4", TLS, func(ctx context.Context, port string) *exec.Cmd {
				return exec.CommandContext(ctx, "openssl", "s_client", tc.flag, "-servername", "x.test", "-connect", "127.0.0.1:"+port)
			})
			if a.err != nil || a.name != "x.test" {
				t.Fatalf("TLS = %q, %v; want x.test", a.name, a.err)
			}
		})
	}
}

// TestTLSCurl sniffs the hello of curl reaching a name it resolves to
// loopback with --resolve, and of curl reaching an address.
func TestTLSCurl(t *testing.T) {
	t.Run("name", func(t *testing.T) {
		a := captureFromCommand(t, "tcp4", TLS, func(ctx context.Context, port string) *exec.Cmd {
			return exec.CommandContext(ctx, "curl", "-sk", "--max-time", "10",
				"--resolve", "x.test:"+port+":127.0.0.1", "https://x.test:"+port+"/")
		})
		if a.err != nil || a.name != "x.test" {
			t.Fatalf("TLS = %q, %v; want x.test", a.name, a.err)
		}
	})
	t.Run("address", func(t *testing.T) {
		a := captureFromCommand(t, "tcp4", TLS, func(ctx context.Context, port string) *exec.Cmd {
			return exec.CommandContext(ctx, "curl", "-sk", "--max-time", "10", "https://127.0.0.1:"+port+"/")
		})
		if !errors.Is(a.err, ErrNoName) {
			t.Fatalf("TLS = %q, %v; want ErrNoName", a.name, a.err)
		}
	})
}

// TestTLSNotTLS checks that other protocols are let go at once.
func TestTLSNotTLS(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   string
		err  error
	}{
		{"empty", "", ErrMore},
		{"record-type-only", "\x16", ErrMore},
		{"http", "GET / HTTP/1.1\r\n", ErrNotThis},
		{"ssh", "SSH-2.0-OpenSSH_9.2\r\n", ErrNotThis},
		{"alert", "\x15\x03\x03\x00\x02\x02\x28", ErrNotThis},
		{"bad-version", "\x16\x02\x00", ErrNotThis},
		{"empty-record", "\x16\x03\x01\x00\x00", ErrNotThis},
		{"huge-record", "\x16\x03\x01\x40\x01", ErrNotThis},
		{"server-hello", "\x16\x03\x03\x00\x04\x02\x00\x00\x00", ErrNotThis},
		{"hello-too-large", "\x16\x03\x01\x00\x04\x01\x00\x40\x00", ErrNotThis},
		{"hello-truncated-body", "\x16\x03\x01\x00\x08\x01\x00\x00\x04\x03\x03\x00\x00", ErrNotThis},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if name, err := TLS([]byte(tc.in)); !errors.Is(err, tc.err) {
				t.Fatalf("TLS = %q, %v; want %v", name, err, tc.err)
			}
		})
	}
}
