package gverr

import (
	"errors"
	"os"
	"syscall"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// TestError: gVisor's errors come out as the errnos a kernel socket gives,
// testable with errors.Is, and the resets are told apart from the rest.
func TestError(t *testing.T) {
	for _, tc := range []struct {
		in    tcpip.Error
		want  error
		reset bool
	}{
		{&tcpip.ErrConnectionReset{}, syscall.ECONNRESET, true},
		{&tcpip.ErrConnectionRefused{}, syscall.ECONNREFUSED, false},
		{&tcpip.ErrConnectionAborted{}, syscall.ECONNABORTED, true},
		{&tcpip.ErrTimeout{}, syscall.ETIMEDOUT, true},
		{&tcpip.ErrClosedForSend{}, syscall.EPIPE, true},
		{&tcpip.ErrNotConnected{}, syscall.ENOTCONN, false},
		{&tcpip.ErrNoBufferSpace{}, syscall.ENOBUFS, false},
		{&tcpip.ErrHostUnreachable{}, syscall.EHOSTUNREACH, false},
		{&tcpip.ErrNetworkUnreachable{}, syscall.ENETUNREACH, false},
		{&tcpip.ErrInvalidEndpointState{}, os.ErrClosed, false},
	} {
		err := Error("op", tc.in)
		if !errors.Is(err, tc.want) {
			t.Errorf("Error(%T) = %v, want one matching %v", tc.in, err, tc.want)
		}
		if IsReset(err) != tc.reset {
			t.Errorf("IsReset(Error(%T)) = %v, want %v", tc.in, !tc.reset, tc.reset)
		}
	}
	if Error("op", nil) != nil {
		t.Error("Error(nil) is not nil")
	}
	if err := Error("bind", &tcpip.ErrPortInUse{}); err == nil || IsReset(err) {
		t.Errorf("an unmapped error = %v", err)
	}
}
