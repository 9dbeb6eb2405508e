package stack

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"testing"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func TestClassifyDial(t *testing.T) {
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close()
	_, refused := net.Dial("tcp4", closed)
	tests := []struct {
		err  error
		want DialReason
	}{
		{refused, DialRefused},
		{fmt.Errorf("dial x via socks5 y: %w", syscall.ECONNREFUSED), DialRefused},
		{fmt.Errorf("dial: %w", context.DeadlineExceeded), DialTimeout},
		{&net.OpError{Op: "dial", Err: syscall.EHOSTUNREACH}, DialUnreachable},
		{fmt.Errorf("read reply: %w", syscall.ECONNRESET), DialReset},
		{&net.DNSError{Err: "no such host", Name: "nx.test", IsNotFound: true}, DialNoName},
		{fmt.Errorf("dial: %w", syscall.EPERM), DialNotPermitted},
		{errors.New("proxy said no"), DialOther},
	}
	for _, tc := range tests {
		if got := classifyDial(tc.err); got != tc.want {
			t.Errorf("classifyDial(%v) = %s, want %s", tc.err, got, tc.want)
		}
	}
}

// TestDialFailedSaidOnce: flows to an upstream that refuses are counted,
// and said at info level with the address and the reason, once per period
// however many there are (issue 15: only debug level said it).
func TestDialFailedSaidOnce(t *testing.T) {
	var logs lockedBuffer
	p := newPeer(t, Config{Logger: slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelInfo}))})
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closedPort := uint16(ln.Addr().(*net.TCPAddr).Port)
	ln.Close()
	const n = 5
	for range n {
		c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.7"), closedPort))
		if err == nil {
			c.Close()
			t.Fatal("a flow to a closed port opened")
		}
	}
	if err := echoFlow(t, p, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.8"), listen(t, echo)), 1, 100); err != nil {
		t.Fatal(err)
	}
	st := p.st.Stats()
	if st.TCPDialFailed != n || st.TCPFlows != 1 {
		t.Errorf("Stats %+v, want %d dial failures and 1 flow", st, n)
	}
	lines := strings.Count(logs.String(), "upstream refused")
	if lines != 1 || !strings.Contains(logs.String(), "level=INFO") || !strings.Contains(logs.String(), fmt.Sprintf("192.0.2.7:%d", closedPort)) {
		t.Errorf("%d lines saying the upstream refused, want 1 at info naming the address:\n%s", lines, logs.String())
	}
}
