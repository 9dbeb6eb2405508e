// Command connrate measures short TCP connections per second for bench.sh,
// and serves the other end.
//
// Client (-c ADDR): for -d, one connection after another: connect, write a
// one-line request, read the reply to EOF (the server closes first, so the
// client keeps no TIME_WAIT and never runs out of ports), close. It prints
// one line of key=value pairs: connections completed, errors, conns/s, and
// the p50/p99 of the connect time and of the whole exchange. With -conc N,
// N clients do the same at once, and the line sums them.
//
// Client (-c ADDR -rr): opens one connection and, for -d, writes a 64-byte
// request and reads its 64-byte echo, one after another: the round trip of a
// small request and a small reply on an open flow. It prints "rr=N
// seconds=S rr_p50_ms=... rr_p99_ms=...".
//
// Client (-c ADDR -udp-probe): sends one datagram to the UDP echo and waits
// for it to come back. Exit status 0: echoed; 3: refused (ICMP port
// unreachable, what a TUN program that does not carry UDP answers); 1: no
// answer.
//
// Client (-c ADDR -hold N): opens N connections (100 at a time) that stay
// idle, prints "held=N seconds=S" once all are open, keeps them for -d, then
// closes them and exits. The bench reads the daemon's memory meanwhile.
//
// Server (-serve ADDR): answers each TCP connection's request line with
// -size bytes and closes, except a HOLD request, which it keeps open and
// silent until the client closes, and an RR request, after which it echoes
// whatever comes until the client closes; echoes every UDP datagram on the
// same port. It runs until killed.
package main

import (
	"bufio"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"
)

func main() {
	serve := flag.String("serve", "", "serve TCP request/reply and UDP echo on `HOST:PORT`")
	target := flag.String("c", "", "measure against the server at `HOST:PORT`")
	dur := flag.Duration("d", 5*time.Second, "how long the client measures")
	timeout := flag.Duration("timeout", 2*time.Second, "deadline for each connection (and the UDP probe)")
	size := flag.Int("size", 128, "reply size in bytes (server)")
	probe := flag.Bool("udp-probe", false, "with -c: check that a UDP datagram is echoed")
	hold := flag.Int("hold", 0, "with -c: open `N` idle connections and keep them for -d")
	conc := flag.Int("conc", 1, "with -c: `N` clients making short connections at once")
	rr := flag.Bool("rr", false, "with -c: round trips of small requests on one open connection")
	flag.Parse()

	switch {
	case *serve != "":
		if err := runServer(*serve, *size); err != nil {
			fmt.Fprintf(os.Stderr, "connrate: %v\n", err)
			os.Exit(1)
		}
	case *target != "" && *probe:
		os.Exit(udpProbe(*target, *timeout))
	case *target != "" && *hold > 0:
		os.Exit(holdIdle(*target, *hold, *dur, *timeout))
	case *target != "" && *rr:
		os.Exit(roundTrips(*target, *dur, *timeout))
	case *target != "":
		if *conc < 1 || *conc > 1000 {
			fmt.Fprintln(os.Stderr, "connrate: -conc wants 1..1000")
			os.Exit(2)
		}
		os.Exit(runClient(*target, *conc, *dur, *timeout))
	default:
		fmt.Fprintln(os.Stderr, "connrate: need -serve ADDR or -c ADDR")
		os.Exit(2)
	}
}

var (
	request     = []byte("GET / HTTP/1.0\r\n\r\n")
	holdRequest = []byte("HOLD\r\n\r\n")
	rrRequest   = []byte("RR\r\n\r\n")
)

// rrSize is the size of each request, and so of each reply, of -rr: a
// small message, one segment each way.
const rrSize = 64

func runServer(addr string, size int) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("listen tcp %s: %w", addr, err)
	}
	pc, err := net.ListenPacket("udp", addr)
	if err != nil {
		return fmt.Errorf("listen udp %s: %w", addr, err)
	}
	go udpEcho(pc)
	reply := bytes.Repeat([]byte("x"), size)
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				time.Sleep(10 * time.Millisecond)
				continue
			}
			return fmt.Errorf("accept: %w", err)
		}
		go answer(c, reply)
	}
}

// answer reads the request (up to its blank line), writes the reply and
// closes first.
func answer(c net.Conn, reply []byte) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	hold, echo := false, false
	for {
		line, err := r.ReadSlice('\n')
		if err != nil {
			return
		}
		switch string(bytes.TrimSpace(line)) {
		case "HOLD":
			hold = true
		case "RR":
			echo = true
		}
		if len(bytes.TrimSpace(line)) == 0 {
			break
		}
	}
	if hold {
		c.SetDeadline(time.Time{})
		io.Copy(io.Discard, r) // until the client closes
		return
	}
	if echo {
		c.SetDeadline(time.Time{})
		// Each read is written back at once: a request is one segment,
		// so its reply is one too. The bufio.Reader gives what it
		// already holds first.
		buf := make([]byte, 4096)
		for {
			n, err := r.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	}
	c.Write(reply)
}

// holdIdle opens n connections that stay open and silent, reports when all
// are, keeps them for d, and closes them.
func holdIdle(addr string, n int, d, timeout time.Duration) int {
	start := time.Now()
	conns := make([]net.Conn, n)
	errs := make([]error, n)
	sem := make(chan struct{}, 100)
	done := make(chan struct{})
	for i := range n {
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; done <- struct{}{} }()
			c, err := net.DialTimeout("tcp", addr, timeout)
			if err == nil {
				_, err = c.Write(holdRequest)
			}
			conns[i], errs[i] = c, err
		}()
	}
	for range n {
		<-done
	}
	held, failed := 0, 0
	var lastErr error
	for i := range n {
		if errs[i] != nil {
			failed++
			lastErr = errs[i]
		} else {
			held++
		}
	}
	fmt.Printf("held=%d failed=%d seconds=%.3f\n", held, failed, time.Since(start).Seconds())
	if lastErr != nil {
		fmt.Fprintf(os.Stderr, "connrate: %d connections failed, last: %v\n", failed, lastErr)
	}
	time.Sleep(d)
	for _, c := range conns {
		if c != nil {
			c.Close()
		}
	}
	if failed > 0 {
		return 1
	}
	return 0
}

func udpEcho(pc net.PacketConn) {
	buf := make([]byte, 65536)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				continue
			}
			return
		}
		pc.WriteTo(buf[:n], from)
	}
}

func runClient(addr string, conc int, dur, timeout time.Duration) int {
	type result struct {
		connect, txn []time.Duration
		errs         int
		lastErr      error
	}
	results := make([]result, conc)
	start := time.Now()
	end := start.Add(dur)
	var wg sync.WaitGroup
	for i := range results {
		res := &results[i]
		wg.Go(func() {
			for time.Now().Before(end) {
				c, t, err := exchange(addr, timeout)
				if err != nil {
					res.errs++
					res.lastErr = err
					continue
				}
				res.connect = append(res.connect, c)
				res.txn = append(res.txn, t)
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var connect, txn []time.Duration
	var errs int
	var lastErr error
	for _, res := range results {
		connect = append(connect, res.connect...)
		txn = append(txn, res.txn...)
		errs += res.errs
		if res.lastErr != nil {
			lastErr = res.lastErr
		}
	}
	n := len(txn)
	fmt.Printf("conns=%d errors=%d seconds=%.3f conns_per_s=%.1f connect_p50_ms=%.3f connect_p99_ms=%.3f txn_p50_ms=%.3f txn_p99_ms=%.3f\n",
		n, errs, elapsed, float64(n)/elapsed,
		ms(quantile(connect, 0.50)), ms(quantile(connect, 0.99)),
		ms(quantile(txn, 0.50)), ms(quantile(txn, 0.99)))
	if lastErr != nil {
		fmt.Fprintf(os.Stderr, "connrate: %d errors, last: %v\n", errs, lastErr)
	}
	if n == 0 {
		return 1
	}
	return 0
}

// roundTrips opens one connection, asks the server to echo, and times
// rrSize-byte requests and their echoes one after another for dur.
func roundTrips(addr string, dur, timeout time.Duration) int {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		fmt.Fprintf(os.Stderr, "connrate: rr: %v\n", err)
		return 1
	}
	defer c.Close()
	if _, err := c.Write(rrRequest); err != nil {
		fmt.Fprintf(os.Stderr, "connrate: rr: write: %v\n", err)
		return 1
	}
	req := bytes.Repeat([]byte("r"), rrSize)
	reply := make([]byte, rrSize)
	var rtt []time.Duration
	start := time.Now()
	end := start.Add(dur)
	for t0 := start; t0.Before(end); t0 = time.Now() {
		c.SetDeadline(t0.Add(timeout))
		if _, err := c.Write(req); err != nil {
			fmt.Fprintf(os.Stderr, "connrate: rr: write: %v\n", err)
			return 1
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			fmt.Fprintf(os.Stderr, "connrate: rr: read: %v\n", err)
			return 1
		}
		rtt = append(rtt, time.Since(t0))
	}
	// The first round trips warm caches and the flow's state up; the
	// median barely notices them, and there are thousands.
	fmt.Printf("rr=%d seconds=%.3f rr_p50_ms=%.3f rr_p99_ms=%.3f\n",
		len(rtt), time.Since(start).Seconds(), ms(quantile(rtt, 0.50)), ms(quantile(rtt, 0.99)))
	return 0
}

// exchange runs one short connection and returns the connect time and the
// time of the whole exchange.
func exchange(addr string, timeout time.Duration) (connect, total time.Duration, err error) {
	t0 := time.Now()
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return 0, 0, err
	}
	defer c.Close()
	connect = time.Since(t0)
	c.SetDeadline(t0.Add(timeout))
	if _, err := c.Write(request); err != nil {
		return 0, 0, fmt.Errorf("write: %w", err)
	}
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		return 0, 0, fmt.Errorf("read: %w", err)
	}
	if n == 0 {
		return 0, 0, errors.New("read: empty reply")
	}
	return connect, time.Since(t0), nil
}

func quantile(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }

// udpProbe sends a datagram on a connected socket and waits for its echo.
// A connected UDP socket reports an ICMP port unreachable as ECONNREFUSED.
func udpProbe(addr string, timeout time.Duration) int {
	c, err := net.Dial("udp", addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "connrate: udp probe: %v\n", err)
		return 1
	}
	defer c.Close()
	msg := []byte("connrate-udp-probe")
	buf := make([]byte, 1500)
	// A few tries: the first datagram may wait for an association to open.
	for try := 0; try < 3; try++ {
		c.SetDeadline(time.Now().Add(timeout / 3))
		if _, err := c.Write(msg); err != nil {
			if errors.Is(err, syscall.ECONNREFUSED) {
				fmt.Println("udp refused")
				return 3
			}
			fmt.Fprintf(os.Stderr, "connrate: udp probe write: %v\n", err)
			return 1
		}
		n, err := c.Read(buf)
		if errors.Is(err, syscall.ECONNREFUSED) {
			fmt.Println("udp refused")
			return 3
		}
		if err == nil && bytes.Equal(buf[:n], msg) {
			fmt.Println("udp ok")
			return 0
		}
	}
	fmt.Println("udp no answer")
	return 1
}
