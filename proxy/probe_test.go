package proxy

import (
	"context"
	"errors"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestProbe: each proxy kind's Probe against a real server that answers,
// a port nobody listens on, and a listener that accepts and never speaks.
func TestProbe(t *testing.T) {
	micro := startMicrosocks(t, "", "")
	microAuth := startMicrosocks(t, "alice", "secret")
	tiny := startTinyproxy(t, "", "")
	closed := "127.0.0.1:" + strconv.Itoa(freePort(t))
	silent := listen(t, "tcp4", "127.0.0.1:0")
	serve(t, silent, func(c net.Conn) { <-t.Context().Done() })
	mute := silent.Addr().String()

	tests := []struct {
		name    string
		d       Dialer
		wantErr string // "" means no error
	}{
		{"direct", Direct{}, ""},
		{"socks5", SOCKS5{Server: micro}, ""},
		{"socks5-credentials", SOCKS5{Server: microAuth, Username: "alice", Password: "secret"}, ""},
		{"socks5-wrong-password", SOCKS5{Server: microAuth, Username: "alice", Password: "wrong"}, `authenticate as "alice"`},
		{"socks5-needs-username", SOCKS5{Server: microAuth}, "does the server need a username?"},
		{"socks5-refused", SOCKS5{Server: closed}, "connection refused"},
		{"socks5-silent", SOCKS5{Server: mute, HandshakeTimeout: 300 * time.Millisecond}, "i/o timeout"},
		{"socks4", SOCKS4{Server: micro}, ""},
		{"socks4-refused", SOCKS4{Server: closed}, "connection refused"},
		{"http", HTTPConnect{Server: tiny}, ""},
		{"http-refused", HTTPConnect{Server: closed}, "connection refused"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			defer cancel()
			err := Probe(ctx, tc.d)
			switch {
			case tc.wantErr == "" && err != nil:
				t.Fatalf("Probe: %v", err)
			case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
				t.Fatalf("Probe: %v, want an error containing %q", err, tc.wantErr)
			}
			if tc.wantErr == "connection refused" && !errors.Is(err, syscall.ECONNREFUSED) {
				t.Errorf("Probe error %v does not unwrap to ECONNREFUSED", err)
			}
		})
	}
}
