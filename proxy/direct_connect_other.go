//go:build !linux

package proxy

import "syscall"

// connectEarly leaves every connect to net.Dialer: the early start that
// saves a wait for the poller is Linux-specific (see
// direct_connect_linux.go).
func connectEarly(network, address string, c syscall.RawConn) error { return nil }
