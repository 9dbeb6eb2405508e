package main_test

import (
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// TestIntegrationPublish serves a namespace with --netns and a published
// port: a connection to the port on netstackd's side reaches a server in
// the namespace, which sees it coming from the gateway address.
func TestIntegrationPublish(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	startNetstackd(t, tp, "--dns", "off", "--publish", "127.0.0.1:18080:9000", "--publish", "[::1]:18081:9000")

	// The server inside the namespace, on all its addresses.
	ln, err := tp.Client.Listen("tcp", "[::]:9000")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "inside, from "+r.RemoteAddr)
	}), ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })

	for _, url := range []string{"http://127.0.0.1:18080/", "http://[::1]:18081/"} {
		r := tp.Daemon.Exec(t, 15*time.Second, "curl", "-sS", "-g", "--max-time", "10", url)
		if r.Err != nil {
			t.Fatalf("GET %s from netstackd's side: %v\n%s", url, r.Err, r)
		}
		// Both listeners reach the namespace's IPv4 address, from the
		// gateway 198.18.0.2 (the default --dns-addr).
		if !strings.HasPrefix(r.Stdout, "inside, from 198.18.0.2:") {
			t.Errorf("GET %s: %q, want the server inside to see the gateway 198.18.0.2", url, r.Stdout)
		}
	}
	// A published port with nothing listening behind it is a reset, not a hang.
	srv.Close()
	<-done
	start := time.Now()
	r := tp.Daemon.Exec(t, 15*time.Second, "curl", "-sS", "--max-time", "10", "http://127.0.0.1:18080/")
	if r.Err == nil {
		t.Fatalf("GET with no server inside succeeded: %s", r)
	}
	if d := time.Since(start); d > 3*time.Second {
		t.Errorf("took %v to fail, want a reset within 3s", d)
	}
}
