package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/url"
	"time"

	"github.com/netstackd/netstackd/proxy/socks4"
	"github.com/netstackd/netstackd/proxy/socks5"
)

// SOCKS4 dials through a SOCKS4 server with CONNECT. An IPv4 destination
// goes as SOCKS4; a domain name goes unresolved with the SOCKS4A extension,
// which not every SOCKS4 server has (dante 1.4.2 lacks it and answers code
// 91). SOCKS4 carries no IPv6 destination and no password.
type SOCKS4 struct {
	// Server is the proxy's "host:port".
	Server string
	// UserID is sent as USERID; empty sends none. Servers may check it
	// against identd on the client, or use it as a plain user name.
	UserID string
	// Forward reaches Server. nil means Direct{}.
	Forward Dialer
	// HandshakeTimeout bounds the handshake once the server is reached; the
	// context's deadline applies too, the earlier one wins. 0 means 10s.
	HandshakeTimeout time.Duration
}

// DialContext connects to Server through Forward, sends CONNECT and returns
// the conn from Forward itself (the *net.TCPConn for Direct), with no
// deadline set, positioned at the first byte from address. Deadlines and
// cancellation work as for SOCKS5. On failure the conn is closed; a request
// the server rejected or failed (code 91) unwraps to syscall.ECONNREFUSED.
func (s SOCKS4) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := s.dial(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial %s via socks4 %s: %w", address, s.Server, err)
	}
	return c, nil
}

func (s SOCKS4) dial(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	dst, err := socks5.ParseAddr(address)
	if err != nil {
		return nil, err
	}
	if err := checkFamily(network, dst); err != nil {
		return nil, err
	}
	req := socks4.Request{Command: socks4.CommandConnect, Name: dst.Name, IP: dst.IP, Port: dst.Port, UserID: s.UserID}
	if !dst.IsName() && !dst.IP.Is4() {
		return nil, fmt.Errorf("SOCKS4 has no IPv6: cannot reach %v", dst.IP)
	}
	msg, err := socks4.AppendRequest(nil, req)
	if err != nil {
		return nil, err
	}
	return dialHandshake(ctx, s.Forward, s.Server, s.HandshakeTimeout, func(c net.Conn) error {
		if _, err := c.Write(msg); err != nil {
			return fmt.Errorf("send connect: %w", err)
		}
		// Exactly one reply: what the target sends first stays in c.
		buf := make([]byte, socks4.ReplyLen)
		if _, err := io.ReadFull(c, buf); err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		reply, err := socks4.ParseReply(buf)
		if err != nil {
			return fmt.Errorf("read reply: %w", err)
		}
		return reply.Err()
	})
}

// Probe checks that Server accepts a connection. SOCKS4 has no request
// that asks nothing of the server, so that is all it can check.
func (s SOCKS4) Probe(ctx context.Context) error {
	return probe(ctx, s.Forward, "socks4", s.Server, s.HandshakeTimeout, nil)
}

// String describes the dialer for logs: "socks4://userid@host:port".
func (s SOCKS4) String() string {
	u := url.URL{Scheme: "socks4", Host: s.Server}
	if s.UserID != "" {
		u.User = url.User(s.UserID)
	}
	return u.String()
}
