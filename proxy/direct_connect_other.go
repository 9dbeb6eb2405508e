//go:build !linux

package proxy

import (
	"context"
	"net"
	"syscall"
)

// connectEarly leaves every connect to net.Dialer: the early start that
// saves a wait for the poller is Linux-specific (see
// direct_connect_linux.go).
func connectEarly(network, address string, c syscall.RawConn) error { return nil }

// dialAddr leaves every dial to net.Dialer: sockets of Direct's own are
// Linux-specific (see direct_socket_linux.go).
func (Direct) dialAddr(context.Context, string, string) (net.Conn, bool, error) {
	return nil, false, nil
}
