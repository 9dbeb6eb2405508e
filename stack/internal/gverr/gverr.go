// Package gverr turns gVisor's tcpip.Error, which is deliberately not a Go
// error (google/gvisor#5314), into Go errors that callers test with
// errors.Is against syscall errnos, as the kernel's own would be.
package gverr

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"gvisor.dev/gvisor/pkg/tcpip"
)

// Error turns a tcpip.Error, which is deliberately not a Go error
// (google/gvisor#5314), into one that callers outside this package can test
// with errors.Is against the syscall errno they already know from real
// sockets. It is the only place where that conversion happens.
func Error(op string, e tcpip.Error) error {
	if e == nil {
		return nil
	}
	var errno syscall.Errno
	switch e.(type) {
	case *tcpip.ErrConnectionReset:
		errno = syscall.ECONNRESET
	case *tcpip.ErrConnectionRefused:
		errno = syscall.ECONNREFUSED
	case *tcpip.ErrConnectionAborted:
		errno = syscall.ECONNABORTED
	case *tcpip.ErrTimeout:
		errno = syscall.ETIMEDOUT
	case *tcpip.ErrClosedForSend:
		errno = syscall.EPIPE
	case *tcpip.ErrNotConnected:
		errno = syscall.ENOTCONN
	case *tcpip.ErrNoBufferSpace:
		errno = syscall.ENOBUFS
	case *tcpip.ErrHostUnreachable:
		errno = syscall.EHOSTUNREACH
	case *tcpip.ErrNetworkUnreachable:
		errno = syscall.ENETUNREACH
	case *tcpip.ErrInvalidEndpointState:
		return fmt.Errorf("%s: %w", op, os.ErrClosed)
	default:
		return fmt.Errorf("%s: %s", op, e)
	}
	return &os.SyscallError{Syscall: op, Err: errno}
}

// IsReset reports whether err means the peer reset the connection, so that the
// relay carries a reset on instead of a FIN.
func IsReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNABORTED) ||
		errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ETIMEDOUT)
}
