package netnstest

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Ports of the servers StartServers runs on ServerIPv4 and ServerIPv6.
const (
	HTTPPort      = 8080 // GET /, GET /bytes?n=N, POST /sha256
	EchoPort      = 7007 // writes back what it reads, then half-closes at EOF
	HalfClosePort = 7008 // reads to EOF, then answers HalfCloseReply and closes
	ClosedPort    = 7009 // nothing listens: connections are refused
	SocksPort     = 1080 // where StartMicrosocks is usually asked to listen
)

// HelloBody is the body of GET / on the HTTP server.
const HelloBody = "hello from the netnstest server\n"

// HalfCloseTrailerSize is how many bytes of Bytes the half-close server sends
// after the digest, so that the reply is more than one segment.
const HalfCloseTrailerSize = 64 << 10

// MaxBytes bounds n in GET /bytes?n=N.
const MaxBytes = 1 << 30

// serverConnTimeout bounds the life of every connection the servers accept.
const serverConnTimeout = 3 * time.Minute

// bytesSeed fixes the stream Bytes returns.
var bytesSeed = [32]byte{'n', 'e', 't', 's', 't', 'a', 'c', 'k', 'd'}

// Bytes returns the first n bytes of a fixed pseudo-random stream: the body
// of GET /bytes?n=N, and test data the client side can regenerate.
func Bytes(n int64) io.Reader {
	return io.LimitReader(rand.NewChaCha8(bytesSeed), n)
}

// BytesSHA256 is the hex SHA-256 of Bytes(n).
func BytesSHA256(n int64) string {
	h := sha256.New()
	if _, err := io.Copy(h, Bytes(n)); err != nil {
		panic(err) // reading a ChaCha8 stream cannot fail
	}
	return hex.EncodeToString(h.Sum(nil))
}

// HalfCloseReply is what the half-close server answers to a client that
// sent sent and then shut down its write side: the hex SHA-256 of sent, a
// newline, and HalfCloseTrailerSize bytes of Bytes.
func HalfCloseReply(sent []byte) []byte {
	sum := sha256.Sum256(sent)
	reply := []byte(hex.EncodeToString(sum[:]) + "\n")
	trailer, _ := io.ReadAll(Bytes(HalfCloseTrailerSize))
	return append(reply, trailer...)
}

// Servers are the HTTP, echo and half-close servers StartServers runs.
type Servers struct {
	http *http.Server
	wg   sync.WaitGroup

	mu     sync.Mutex
	closed bool
	lns    []net.Listener
	conns  map[net.Conn]struct{}
}

// StartServers listens in the server namespace on ServerIPv4 and ServerIPv6
// at HTTPPort, EchoPort and HalfClosePort, and serves them until t's
// cleanup, which closes every listener and connection and waits for the
// server goroutines.
func (tp *Topology) StartServers(t testing.TB) *Servers {
	t.Helper()
	s := &Servers{conns: make(map[net.Conn]struct{})}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, HelloBody)
	})
	mux.HandleFunc("GET /bytes", serveBytes)
	mux.HandleFunc("POST /sha256", serveSHA256)
	s.http = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		// Logging to t after the test ends panics; errors here show up as
		// failures on the client side anyway.
		ErrorLog: log.New(io.Discard, "", 0),
	}
	t.Cleanup(s.close)

	for _, ip := range []netip.Addr{ServerIPv4, ServerIPv6} {
		for _, port := range []uint16{HTTPPort, EchoPort, HalfClosePort} {
			addr := netip.AddrPortFrom(ip, port).String()
			ln, err := tp.Server.Listen("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			s.mu.Lock()
			s.lns = append(s.lns, ln)
			s.mu.Unlock()
			switch port {
			case HTTPPort:
				s.wg.Go(func() { s.http.Serve(ln) })
			case EchoPort:
				s.wg.Go(func() { s.acceptLoop(ln, echo) })
			case HalfClosePort:
				s.wg.Go(func() { s.acceptLoop(ln, halfClose) })
			}
		}
	}
	return s
}

func serveBytes(w http.ResponseWriter, r *http.Request) {
	n, err := strconv.ParseInt(r.URL.Query().Get("n"), 10, 64)
	if err != nil || n < 0 || n > MaxBytes {
		http.Error(w, fmt.Sprintf("want n between 0 and %d", MaxBytes), http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", strconv.FormatInt(n, 10))
	io.Copy(w, Bytes(n))
}

func serveSHA256(w http.ResponseWriter, r *http.Request) {
	h := sha256.New()
	if _, err := io.Copy(h, r.Body); err != nil {
		http.Error(w, "read body: "+err.Error(), http.StatusBadRequest)
		return
	}
	io.WriteString(w, hex.EncodeToString(h.Sum(nil)))
}

// acceptLoop runs handle on every connection ln accepts, each on a goroutine
// counted in s.wg, until ln is closed.
func (s *Servers) acceptLoop(ln net.Listener, handle func(*net.TCPConn)) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1) // before close sets closed, so before its Wait
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			defer s.forget(c)
			c.SetDeadline(time.Now().Add(serverConnTimeout))
			handle(c.(*net.TCPConn))
		}()
	}
}

// OpenConns is how many connections the echo and half-close servers hold
// open.
func (s *Servers) OpenConns() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

func (s *Servers) forget(c net.Conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	c.Close()
}

// echo writes back what it reads and half-closes at EOF, so that a client
// reads exactly what it sent and then EOF.
func echo(c *net.TCPConn) {
	if _, err := io.Copy(c, c); err != nil {
		return
	}
	c.CloseWrite()
}

// halfClose reads to EOF, then answers HalfCloseReply of what it read.
func halfClose(c *net.TCPConn) {
	got, err := io.ReadAll(io.LimitReader(c, MaxBytes))
	if err != nil {
		return
	}
	if _, err := c.Write(HalfCloseReply(got)); err != nil {
		return
	}
	c.CloseWrite()
}

func (s *Servers) close() {
	s.mu.Lock()
	s.closed = true
	for _, ln := range s.lns {
		ln.Close()
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()

	// Shutdown waits for handlers to finish; Close then drops whatever
	// is still open after the grace period.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s.http.Shutdown(ctx)
	s.http.Close()
	s.wg.Wait()
}
