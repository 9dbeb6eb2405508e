package main

import (
	"fmt"
	"net"
	"os"
)

// notify sends a state line to systemd's notification socket when run under
// a Type=notify unit, so systemd knows when the TUN is ready. Outside systemd
// it does nothing.
func notify(state string) error {
	path := os.Getenv("NOTIFY_SOCKET")
	if path == "" {
		return nil
	}
	if path[0] == '@' {
		path = "\x00" + path[1:] // abstract socket namespace
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return fmt.Errorf("dial notify socket: %w", err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("write %q to notify socket: %w", state, err)
	}
	return nil
}
