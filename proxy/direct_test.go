package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

// roundTrip sends msg on c and checks that the echo comes back whole.
func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatalf("write: %v", err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("read echo: %v", err)
	}
	if string(got) != msg {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

func TestDirect(t *testing.T) {
	port := strconv.Itoa(startEcho(t))
	refused := strconv.Itoa(freePort(t))
	tests := []struct {
		name    string
		network string
		address string
		wantErr error
		errText string
	}{
		{name: "ipv4", network: "tcp", address: "127.0.0.1:" + port},
		{name: "tcp4", network: "tcp4", address: "127.0.0.1:" + port},
		{name: "refused", network: "tcp", address: "127.0.0.1:" + refused, wantErr: syscall.ECONNREFUSED, errText: "dial 127.0.0.1:" + refused + " direct: "},
		{name: "udp not carried", network: "udp", address: "127.0.0.1:" + port, errText: "unknown network udp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Direct{}.DialContext(t.Context(), tt.network, tt.address)
			if tt.wantErr != nil || tt.errText != "" {
				if err == nil {
					c.Close()
					t.Fatal("dial succeeded, want an error")
				}
				if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
					t.Errorf("err = %v, want errors.Is %v", err, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.errText) {
					t.Errorf("err = %q, want it to contain %q", err, tt.errText)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, ok := c.(socket); !ok {
				t.Fatalf("conn is %T, want a socket (CloseWrite, SetLinger, SyscallConn)", c)
			}
			roundTrip(t, c, "hello")
		})
	}
}

func TestDirectControl(t *testing.T) {
	port := strconv.Itoa(startEcho(t))
	t.Run("called", func(t *testing.T) {
		var called string
		d := Direct{Control: func(network, address string, _ syscall.RawConn) error {
			called = network + " " + address
			return nil
		}}
		c, err := d.DialContext(t.Context(), "tcp", "127.0.0.1:"+port)
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if want := "tcp4 127.0.0.1:" + port; called != want {
			t.Errorf("Control got %q, want %q", called, want)
		}
	})
	t.Run("error aborts", func(t *testing.T) {
		errMark := errors.New("no mark for you")
		d := Direct{Control: func(string, string, syscall.RawConn) error { return errMark }}
		c, err := d.DialContext(t.Context(), "tcp", "127.0.0.1:"+port)
		if err == nil {
			c.Close()
		}
		if !errors.Is(err, errMark) {
			t.Errorf("err = %v, want %v", err, errMark)
		}
	})
}

func TestDirectCancelled(t *testing.T) {
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	c, err := Direct{}.DialContext(ctx, "tcp", "127.0.0.1:"+strconv.Itoa(startEcho(t)))
	if err == nil {
		c.Close()
	}
	if !errors.Is(err, context.Canceled) {
		t.Errorf("err = %v, want context.Canceled", err)
	}
}
