package sniff

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"os/exec"
	"sync"
	"testing"
	"time"
)

// sniffer is TLS, HTTP or Stream with the protocol dropped.
type sniffer func([]byte) (string, error)

// answer is what a sniffer said once it stopped asking for more, and the
// bytes it was shown, read by read.
type answer struct {
	name  string
	err   error
	reads [][]byte
}

// all returns every byte read, in order.
func (a answer) all() []byte {
	var b []byte
	for _, r := range a.reads {
		b = append(b, r...)
	}
	return b
}

// readUntilAnswer reads c in reads of at most chunk bytes, calling sniff
// with everything read so far after each, until it answers other than
// ErrMore, the peer stops sending, or MaxStream bytes are in. Every answer
// before the last must be ErrMore: that is what a prefix gives.
func readUntilAnswer(t testing.TB, c net.Conn, chunk int, sniff sniffer) answer {
	t.Helper()
	if err := c.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	var a answer
	var all []byte
	buf := make([]byte, chunk)
	for len(all) < MaxStream {
		n, err := c.Read(buf)
		if n > 0 {
			a.reads = append(a.reads, append([]byte(nil), buf[:n]...))
			all = append(all, buf[:n]...)
			if a.name, a.err = sniff(all); !errors.Is(a.err, ErrMore) {
				return a
			}
		}
		if err != nil {
			t.Fatalf("read the client's first bytes (%d in, sniffer said %v): %v", len(all), a.err, err)
		}
	}
	t.Fatalf("sniffer still asks for more after %d bytes", len(all))
	return a
}

// goTLSHello runs a crypto/tls client over a net.Pipe and returns what it
// sent until sniff answered, read in reads of at most chunk bytes (a pipe
// cuts a write at the reader's buffer, as TCP may).
func goTLSHello(t testing.TB, cfg *tls.Config, chunk int, sniff sniffer) answer {
	t.Helper()
	client, server := net.Pipe()
	var wg sync.WaitGroup
	wg.Go(func() {
		defer client.Close()
		// The handshake fails when we close our end: only its first
		// flight matters.
		_ = tls.Client(client, cfg).Handshake()
	})
	defer wg.Wait()
	defer server.Close()
	return readUntilAnswer(t, server, chunk, sniff)
}

// captureFromCommand listens on loopback (network "tcp4" or "tcp6"), runs
// the command built by cmd for the listener's port, and sniffs what its
// first connection sends. It skips the test if the program is missing.
func captureFromCommand(t *testing.T, network string, sniff sniffer, cmd func(ctx context.Context, port string) *exec.Cmd) answer {
	t.Helper()
	host := "127.0.0.1"
	if network == "tcp6" {
		host = "::1"
	}
	ln, err := net.Listen(network, net.JoinHostPort(host, "0"))
	if err != nil {
		t.Skipf("no %s loopback to listen on: %v", network, err)
	}
	defer ln.Close()
	_, port, err := net.SplitHostPort(ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 20*time.Second)
	defer cancel()
	c := cmd(ctx, port)
	if _, err := exec.LookPath(c.Path); err != nil {
		t.Skipf("%s not installed (Debian package %s): %v", c.Args[0], c.Args[0], err)
	}
	c.Stdin = nil // /dev/null: openssl s_client then sends nothing after the handshake
	var out lockedBuffer
	c.Stdout, c.Stderr = &out, &out
	if err := c.Start(); err != nil {
		t.Fatalf("start %s: %v", c.Args[0], err)
	}
	var wg sync.WaitGroup
	wg.Go(func() { _ = c.Wait() }) // it fails once we hang up: expected
	defer wg.Wait()
	defer cancel()
	conn, err := acceptCtx(ctx, ln)
	if err != nil {
		t.Fatalf("accept %s's connection: %v\n%s", c.Args[0], err, out.String())
	}
	defer conn.Close()
	return readUntilAnswer(t, conn, 4096, sniff)
}

// acceptCtx accepts one connection, giving up when ctx ends.
func acceptCtx(ctx context.Context, ln net.Listener) (net.Conn, error) {
	stop := context.AfterFunc(ctx, func() { ln.Close() })
	defer stop()
	return ln.Accept()
}

// lockedBuffer collects a command's output from its two pipes.
type lockedBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b = append(l.b, p...)
	return len(p), nil
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return string(l.b)
}

var _ io.Writer = (*lockedBuffer)(nil)
