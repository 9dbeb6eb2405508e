package proxy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"time"

	"github.com/netstackd/netstackd/proxy/httpconnect"
	"github.com/netstackd/netstackd/proxy/socks5"
)

// HTTPConnect dials through an HTTP proxy with the CONNECT method (RFC 9110
// §9.3.6), over plain TCP to the proxy, authenticating with Basic (RFC
// 7617) when Username is set. A domain name in the address goes to the
// proxy unresolved.
type HTTPConnect struct {
	// Server is the proxy's "host:port".
	Server string
	// Username, when not empty, is sent with Password in a
	// Proxy-Authorization header. It cannot hold a colon.
	Username string
	// Password goes with Username. String and LogValue never show it.
	Password string
	// Forward reaches Server. nil means Direct{}.
	Forward Dialer
	// HandshakeTimeout bounds the request and the response head once the
	// server is reached; the context's deadline applies too, the earlier
	// one wins. 0 means 10s.
	HandshakeTimeout time.Duration
}

// DialContext connects to Server through Forward, sends CONNECT and returns
// the conn from Forward itself (the *net.TCPConn for Direct), with no
// deadline set, positioned at the first byte after the response head, so
// that data the proxy passes on from the target right behind the head is
// not lost. Deadlines and cancellation work as for SOCKS5. On failure the
// conn is closed and the error quotes the status; a proxy that could not
// reach the target (502, 503, 504, or a reason saying so) unwraps to
// syscall.ECONNREFUSED (see httpconnect.StatusError).
func (h HTTPConnect) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	c, err := h.dial(ctx, network, address)
	if err != nil {
		return nil, fmt.Errorf("dial %s via http %s: %w", address, h.Server, err)
	}
	return c, nil
}

func (h HTTPConnect) dial(ctx context.Context, network, address string) (net.Conn, error) {
	if err := checkNetwork(network); err != nil {
		return nil, err
	}
	// Parsed as SOCKS5 would, so an IPv4-mapped address goes as IPv4.
	dst, err := socks5.ParseAddr(address)
	if err != nil {
		return nil, err
	}
	if err := checkFamily(network, dst); err != nil {
		return nil, err
	}
	if h.Username == "" && h.Password != "" {
		return nil, errors.New("password set without a username")
	}
	req, err := httpconnect.AppendRequest(nil, dst.String(), h.Username, h.Password)
	if err != nil {
		return nil, err
	}
	return dialHandshake(ctx, h.Forward, h.Server, h.HandshakeTimeout, func(c net.Conn) error {
		if _, err := c.Write(req); err != nil {
			return fmt.Errorf("send CONNECT: %w", err)
		}
		resp, err := readResponseHead(c)
		if err != nil {
			return fmt.Errorf("read response: %w", err)
		}
		err = resp.Err()
		if resp.StatusCode == 401 || resp.StatusCode == 407 {
			if h.Username == "" {
				return fmt.Errorf("%w (sent no credentials; does the proxy need a username?)", err)
			}
			return fmt.Errorf("%w (as %q)", err, h.Username)
		}
		return err
	})
}

// readResponseHead reads the response head one byte at a time, so that it
// stops at exactly the blank line that ends it: the proxy may send the
// tunnel's first bytes in the same segment, and a buffered reader would
// take them along, out of the conn handed back. A head is a few dozen
// bytes, read once per dial, and never more than httpconnect.MaxHeadLen.
func readResponseHead(c net.Conn) (httpconnect.Response, error) {
	buf := make([]byte, 0, 128)
	var b [1]byte
	for {
		if _, err := io.ReadFull(c, b[:]); err != nil {
			if err == io.EOF && len(buf) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return httpconnect.Response{}, err
		}
		buf = append(buf, b[0])
		// Parse after each line, and byte by byte while the first bytes
		// may show that the server does not speak HTTP.
		if b[0] != '\n' && len(buf) > len("HTTP/") && len(buf) < httpconnect.MaxHeadLen {
			continue
		}
		resp, _, err := httpconnect.ParseResponseHead(buf)
		if errors.Is(err, httpconnect.ErrTruncated) {
			continue
		}
		return resp, err
	}
}

// Probe checks that Server accepts a connection; a CONNECT would ask it to
// reach somewhere.
func (h HTTPConnect) Probe(ctx context.Context) error {
	return probe(ctx, h.Forward, "http", h.Server, h.HandshakeTimeout, nil)
}

// String describes the dialer for logs, without the password:
// "http://user@host:port".
func (h HTTPConnect) String() string {
	u := url.URL{Scheme: "http", Host: h.Server}
	if h.Username != "" {
		u.User = url.User(h.Username)
	}
	return u.String()
}

// LogValue logs the dialer as String does, so that handlers which would
// otherwise print every field never show the password.
func (h HTTPConnect) LogValue() slog.Value {
	return slog.StringValue(h.String())
}
