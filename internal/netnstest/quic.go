package netnstest

import (
	"bytes"
	"context"
	"crypto/tls"
	"net"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/quic"
)

// QUICFirstFlight has a real QUIC client (golang.org/x/net/quic) dial a
// UDP socket on 127.0.0.1 that never answers, for serverName, and returns
// the datagrams it sends, in order, until done says it has enough (done
// sees every datagram so far) or 10 s pass, which fails t. A ClientHello
// with Go's post-quantum key share spans two datagrams.
func QUICFirstFlight(t testing.TB, serverName string, done func(grams [][]byte) bool) [][]byte {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	ep, err := quic.Listen("udp4", "127.0.0.1:0", nil)
	if err != nil {
		t.Fatalf("quic endpoint: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	var wg sync.WaitGroup
	wg.Go(func() {
		cfg := &quic.Config{TLSConfig: &tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS13}}
		if c, err := ep.Dial(ctx, "udp4", pc.LocalAddr().String(), cfg); err == nil {
			c.Abort(nil) // cannot happen: nothing answers
		}
	})
	defer func() {
		cancel()
		wg.Wait()
		// Nothing answers: abandon the connection, do not wait to drain.
		closeCtx, stop := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer stop()
		_ = ep.Close(closeCtx)
	}()
	if err := pc.SetReadDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	var grams [][]byte
	buf := make([]byte, 65536)
	for {
		n, _, err := pc.ReadFrom(buf)
		if err != nil {
			t.Fatalf("read the QUIC client's datagram %d: %v", len(grams)+1, err)
		}
		grams = append(grams, bytes.Clone(buf[:n]))
		if done(grams) {
			return grams
		}
	}
}
