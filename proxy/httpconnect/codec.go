// Package httpconnect owns the HTTP CONNECT tunnel handshake (RFC 9110
// §9.3.6) as pure functions on bytes: the request a client sends to a proxy
// and the head of the proxy's response.
//
// Like packages socks4 and socks5 it does no I/O. ParseResponseHead works on
// a prefix of the stream and reports ErrTruncated until the blank line that
// ends the head has arrived, so a reader can stop at exactly the end of the
// head and leave the first bytes of the tunnel in the socket. It never looks
// past MaxHeadLen bytes.
package httpconnect

import (
	"bytes"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
)

// MaxHeadLen bounds the response head, status line to blank line: a proxy
// that sends more is not answering CONNECT.
const MaxHeadLen = 8 << 10

var (
	// ErrTruncated means the head has not ended yet: read more.
	ErrTruncated = errors.New("truncated response head")
	// ErrHeadTooLong means MaxHeadLen bytes held no end of head.
	ErrHeadTooLong = fmt.Errorf("response head longer than %d bytes", MaxHeadLen)
)

// AppendRequest appends a CONNECT request for target, "host:port" with an
// IPv6 host in brackets, with a Proxy-Authorization header for Basic
// authentication (RFC 7617) when username is not empty. It fails for a
// target that is not an IP literal or a plain host name, so nothing from
// the network can add a header line, and for credentials Basic cannot
// carry: a colon in the username, or a control character in either.
func AppendRequest(b []byte, target, username, password string) ([]byte, error) {
	if err := checkTarget(target); err != nil {
		return b, err
	}
	if err := CheckCredentials(username, password); err != nil {
		return b, err
	}
	b = append(b, "CONNECT "...)
	b = append(b, target...)
	b = append(b, " HTTP/1.1\r\nHost: "...)
	b = append(b, target...)
	b = append(b, "\r\n"...)
	if username != "" {
		b = append(b, "Proxy-Authorization: Basic "...)
		b = base64.StdEncoding.AppendEncode(b, []byte(username+":"+password))
		b = append(b, "\r\n"...)
	}
	return append(b, "\r\n"...), nil
}

// CheckCredentials reports whether Basic authentication can carry username
// and password: the username cannot hold a colon, and neither may hold a
// control character (RFC 7617 §2).
func CheckCredentials(username, password string) error {
	if strings.Contains(username, ":") {
		return errors.New(`username holds a ":", which Basic authentication cannot carry`)
	}
	if hasCTL(username) || hasCTL(password) || strings.ContainsRune(username+password, '\t') {
		return errors.New("control character in the username or password")
	}
	return nil
}

// checkTarget accepts "host:port" where host is an IP literal (IPv6 in
// brackets, no zone) or a name of letters, digits, '-', '_' and '.', of at
// most 255 bytes, and port is a decimal number up to 65535.
func checkTarget(target string) error {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		// Quote the target: the *net.AddrError would show it raw.
		if ae, ok := errors.AsType[*net.AddrError](err); ok {
			return fmt.Errorf("target %q: %s", target, ae.Err)
		}
		return fmt.Errorf("target %q: %w", target, err)
	}
	if p, err := strconv.ParseUint(port, 10, 16); err != nil || strconv.FormatUint(p, 10) != port {
		return fmt.Errorf("target %q: invalid port %q", target, port)
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		if ip.Zone() != "" {
			return fmt.Errorf("target %q: zoned IPv6 address cannot be sent to a proxy", target)
		}
		if ip.Is6() && !strings.HasPrefix(target, "[") {
			return fmt.Errorf("target %q: IPv6 address must be in brackets", target)
		}
		return nil
	}
	if host == "" || len(host) > 255 {
		return fmt.Errorf("target %q: host of %d bytes, want 1 to 255", target, len(host))
	}
	for _, r := range host {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9', r == '-', r == '.', r == '_':
		default:
			return fmt.Errorf("target %q: %q in host name", target, r)
		}
	}
	return nil
}

// Response is the head of a proxy's response to CONNECT.
type Response struct {
	// Proto is "HTTP/" and the version, as sent: "HTTP/1.0" or "HTTP/1.1".
	Proto string
	// StatusCode is the three-digit status, 100 to 599.
	StatusCode int
	// Reason is the reason phrase, possibly empty.
	Reason string
	// ProxyAuthenticate is the first Proxy-Authenticate header's value:
	// the authentication scheme a 407 asks for.
	ProxyAuthenticate string
}

// ParseResponseHead parses the response head at the start of b, from the
// status line to the blank line after the headers, and returns it with its
// length; b[n:] is the first data of the tunnel or of an error body. Lines
// may end in CRLF or a bare LF. It reports ErrTruncated while the head has
// not ended and b is shorter than MaxHeadLen, and fails as soon as a
// complete line, or the first bytes, show that b is no HTTP response.
func ParseResponseHead(b []byte) (Response, int, error) {
	// Something other than an HTTP server (a SOCKS server, say) is seen
	// at its first byte rather than after MaxHeadLen or a timeout.
	const prefix = "HTTP/"
	if k := min(len(b), len(prefix)); string(b[:k]) != prefix[:k] {
		return Response{}, 0, fmt.Errorf("response starts %q, want %q", b[:k], prefix)
	}
	var r Response
	for pos := 0; ; {
		i := bytes.IndexByte(b[pos:min(len(b), MaxHeadLen)], '\n')
		if i < 0 {
			if len(b) >= MaxHeadLen {
				return Response{}, 0, ErrHeadTooLong
			}
			return Response{}, 0, ErrTruncated
		}
		line := b[pos : pos+i]
		line = bytes.TrimSuffix(line, []byte("\r"))
		end := pos + i + 1
		switch {
		case pos == 0:
			if err := r.parseStatusLine(line); err != nil {
				return Response{}, 0, err
			}
		case len(line) == 0:
			return r, end, nil
		default:
			r.parseHeader(line)
		}
		pos = end
	}
}

// parseStatusLine parses "HTTP/x.y SP 3DIGIT [SP reason]" (RFC 9112 §4).
// The space before an empty reason may be missing, as Go's net/http allows.
func (r *Response) parseStatusLine(line []byte) error {
	if hasCTL(string(line)) {
		return fmt.Errorf("control character in status line %q", line)
	}
	proto, rest, _ := bytes.Cut(line, []byte(" "))
	code, reason, _ := bytes.Cut(rest, []byte(" "))
	if len(proto) != len("HTTP/1.1") || !isDigit(proto[5]) || proto[6] != '.' || !isDigit(proto[7]) {
		return fmt.Errorf("malformed status line %q", line)
	}
	if len(code) != 3 || !isDigit(code[0]) || !isDigit(code[1]) || !isDigit(code[2]) || code[0] < '1' || code[0] > '5' {
		return fmt.Errorf("malformed status code in %q", line)
	}
	r.Proto = string(proto)
	r.StatusCode = int(code[0]-'0')*100 + int(code[1]-'0')*10 + int(code[2]-'0')
	r.Reason = string(reason)
	return nil
}

// parseHeader keeps what the dialer uses and ignores every other line,
// well-formed or not: CONNECT needs nothing else from the head.
func (r *Response) parseHeader(line []byte) {
	name, value, ok := bytes.Cut(line, []byte(":"))
	if !ok || r.ProxyAuthenticate != "" || !strings.EqualFold(string(name), "Proxy-Authenticate") {
		return
	}
	r.ProxyAuthenticate = strings.TrimSpace(strings.Map(func(r rune) rune {
		if r < 0x20 || r == 0x7f {
			return -1
		}
		return r
	}, string(value)))
}

// Err returns nil for a 2xx response, which opens the tunnel, and a
// *StatusError otherwise.
func (r Response) Err() error {
	if r.StatusCode >= 200 && r.StatusCode <= 299 {
		return nil
	}
	return &StatusError{Code: r.StatusCode, Reason: r.Reason, ProxyAuthenticate: r.ProxyAuthenticate}
}

// StatusError is a response that did not open the tunnel. When it says the
// proxy could not reach the target it unwraps to syscall.ECONNREFUSED, as a
// failed direct dial would: for 502 Bad Gateway, 503 Service Unavailable
// (squid's answer to a refused connect), 504 Gateway Timeout, and any
// status whose reason says "refused" or "unable to connect" (tinyproxy
// answers a refused connect with 500 Unable to connect).
type StatusError struct {
	Code              int
	Reason            string
	ProxyAuthenticate string
}

func (e *StatusError) Error() string {
	status := strconv.Itoa(e.Code)
	if e.Reason != "" {
		status += " " + e.Reason
	}
	switch e.Code {
	case 407:
		if e.ProxyAuthenticate != "" {
			return fmt.Sprintf("proxy authentication required (%s; proxy asks for %s)", status, e.ProxyAuthenticate)
		}
		return fmt.Sprintf("proxy authentication required (%s)", status)
	case 401:
		return fmt.Sprintf("proxy refused the credentials (%s)", status)
	}
	return "proxy answered " + status
}

// Unwrap returns syscall.ECONNREFUSED when the proxy could not reach the
// target, and nil otherwise.
func (e *StatusError) Unwrap() error {
	reason := strings.ToLower(e.Reason)
	switch {
	case e.Code == 502, e.Code == 503, e.Code == 504,
		strings.Contains(reason, "refused"), strings.Contains(reason, "unable to connect"):
		return syscall.ECONNREFUSED
	}
	return nil
}

// hasCTL reports whether s holds an ASCII control character other than
// horizontal tab (RFC 9110 §5.5 field values; RFC 7617 §2 credentials).
func hasCTL(s string) bool {
	for i := range len(s) {
		if c := s[i]; (c < 0x20 && c != '\t') || c == 0x7f {
			return true
		}
	}
	return false
}

func isDigit(c byte) bool { return '0' <= c && c <= '9' }
