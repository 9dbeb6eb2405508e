package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"slices"
	"time"

	"github.com/netstackd/netstackd/proxy/socks5"
)

// SOCKS5 dials through a SOCKS5 server with the CONNECT command (RFC 1928),
// authenticating with a username and password (RFC 1929) when Username is
// set. A domain name in the address goes to the server unresolved.
type SOCKS5 struct {
	// Server is the proxy's "host:port".
	Server string
	// Username, when not empty, is offered with Password alongside no
	// authentication; the server picks. Empty means no authentication.
	Username string
	// Password goes with Username. String and LogValue never show it.
	Password string
	// Forward reaches Server. nil means Direct{}. For UDP ASSOCIATE, its
	// ListenPacket, when it has one, also opens the socket that talks to
	// the relay; otherwise Direct{} does.
	Forward Dialer
	// HandshakeTimeout bounds the handshake once the server is reached; the
	// context's deadline applies too, the earlier one wins. 0 means 10s.
	HandshakeTimeout time.Duration
}

// DialContext connects to Server through Forward, runs the handshake and
// returns the conn from Forward itself (the *net.TCPConn for Direct), with no
// deadline set, positioned at the first byte from address. The handshake
// stops at the earlier of the context's deadline and HandshakeTimeout, and
// at once when the context is cancelled. On failure the conn is closed and
// the error says what failed; a refused or unreachable target unwraps to the
// same errno a direct dial would (see socks5.ReplyError).
func (s SOCKS5) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := s.dial(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial %s via socks5 %s: %w", address, s.Server, err)
	}
	return c, nil
}

func (s SOCKS5) dial(ctx context.Context, network, address string) (net.Conn, error) {
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
	if s.Username == "" && s.Password != "" {
		return nil, errors.New("password set without a username")
	}
	return dialHandshake(ctx, s.Forward, s.Server, s.HandshakeTimeout, func(c net.Conn) error {
		_, err := s.handshake(c, socks5.CommandConnect, dst)
		return err
	})
}

// handshake negotiates a method, authenticates if the server asks to, sends
// the request and returns the successful reply (RFC 1928 §§3, 4, 6; RFC 1929
// §2). It reads exactly the bytes of each server message, so whatever the
// target sends first stays in c.
func (s SOCKS5) handshake(c net.Conn, cmd socks5.Command, dst socks5.Addr) (socks5.Reply, error) {
	// The longest message either way is the username/password request:
	// 3 octets and two strings of up to 255.
	buf := make([]byte, 0, 3+255+255)
	if err := s.negotiate(c, buf); err != nil {
		return socks5.Reply{}, err
	}
	buf, err := socks5.AppendRequest(buf[:0], cmd, dst)
	if err != nil {
		return socks5.Reply{}, fmt.Errorf("encode %s: %w", dst, err)
	}
	if _, err := c.Write(buf); err != nil {
		return socks5.Reply{}, fmt.Errorf("send %s: %w", cmd, err)
	}
	reply, err := readReply(c, buf[:0])
	if err != nil {
		return socks5.Reply{}, fmt.Errorf("read reply: %w", err)
	}
	return reply, reply.Err()
}

// negotiate agrees on a method and authenticates if the server asks to
// (RFC 1928 §3, RFC 1929 §2), using buf as scratch space.
func (s SOCKS5) negotiate(c net.Conn, buf []byte) error {
	methods := []byte{socks5.MethodNoAuth}
	if s.Username != "" {
		methods = append(methods, socks5.MethodUserPass)
	}
	buf, err := socks5.AppendGreeting(buf[:0], methods...)
	if err != nil {
		return err
	}
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("send greeting: %w", err)
	}
	buf = buf[:socks5.MethodSelectionLen]
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read method selection: %w", err)
	}
	method, err := socks5.ParseMethodSelection(buf)
	switch {
	case err != nil && s.Username == "" && errors.Is(err, socks5.ErrNoAcceptableMethods):
		return fmt.Errorf("%w (offered no authentication only; does the server need a username?)", err)
	case err != nil:
		return fmt.Errorf("method selection: %w", err)
	case method == socks5.MethodUserPass && s.Username != "":
		if err := s.authenticate(c, buf); err != nil {
			return fmt.Errorf("authenticate as %q: %w", s.Username, err)
		}
	case method != socks5.MethodNoAuth:
		return fmt.Errorf("server chose method %#02x, which was not offered", method)
	}
	return nil
}

// Probe checks that Server answers as a SOCKS5 server and takes the
// credentials, without asking it to reach anything: the greeting and, when
// the server picks it, the username/password sub-negotiation.
func (s SOCKS5) Probe(ctx context.Context) error {
	return probe(ctx, s.Forward, "socks5", s.Server, s.HandshakeTimeout, func(c net.Conn) error {
		return s.negotiate(c, make([]byte, 0, 3+255+255))
	})
}

// authenticate runs the username/password sub-negotiation (RFC 1929 §2),
// using buf as scratch space.
func (s SOCKS5) authenticate(c net.Conn, buf []byte) error {
	buf, err := socks5.AppendUserPassRequest(buf[:0], s.Username, s.Password)
	if err != nil {
		return err
	}
	if _, err := c.Write(buf); err != nil {
		return fmt.Errorf("send credentials: %w", err)
	}
	buf = buf[:socks5.UserPassResponseLen]
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read response: %w", err)
	}
	return socks5.ParseUserPassResponse(buf)
}

// readReply reads one reply into buf and no further: the head and ATYP
// first, then as many bytes as the address type says (RFC 1928 §§5, 6).
func readReply(c net.Conn, buf []byte) (socks5.Reply, error) {
	for {
		need, err := socks5.ReplyLen(buf)
		if err != nil {
			return socks5.Reply{}, err
		}
		if need <= len(buf) {
			break
		}
		have := len(buf)
		buf = slices.Grow(buf, need-have)[:need]
		if _, err := io.ReadFull(c, buf[have:]); err != nil {
			return socks5.Reply{}, err
		}
	}
	reply, _, err := socks5.ParseReply(buf)
	return reply, err
}

// checkFamily refuses an IP literal of the wrong family for "tcp4" or
// "tcp6", as net.Dial does; a domain name cannot be held to one, since the
// server resolves it.
func checkFamily(network string, dst socks5.Addr) error {
	if dst.IsName() {
		return nil
	}
	if (network == "tcp4" && !dst.IP.Is4()) || (network == "tcp6" && dst.IP.Is4()) {
		return &net.AddrError{Err: "no suitable address", Addr: dst.IP.String()}
	}
	return nil
}

// String describes the dialer for logs, without the password:
// "socks5://user@host:port".
func (s SOCKS5) String() string {
	u := url.URL{Scheme: "socks5", Host: s.Server}
	if s.Username != "" {
		u.User = url.User(s.Username)
	}
	return u.String()
}

// LogValue logs the dialer as String does, so that handlers which would
// otherwise print every field (slog.JSONHandler) never show the password.
func (s SOCKS5) LogValue() slog.Value {
	return slog.StringValue(s.String())
}
