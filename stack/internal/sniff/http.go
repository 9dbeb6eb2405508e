package sniff

import (
	"bytes"
	"fmt"
	"strings"
)

// methods are the request methods recognised (RFC 9110 §9 and PATCH, RFC
// 5789). A stream that starts with anything else is not taken for HTTP.
var methods = [...]string{"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}

var (
	errMethod     = fmt.Errorf("%w: no http method", ErrNotThis)
	errReqLine    = fmt.Errorf("%w: malformed http/1 request line", ErrNotThis)
	errHeaderLine = fmt.Errorf("%w: malformed http header line", ErrNotThis)
	errHeadLarge  = fmt.Errorf("%w: no host header in the first %d bytes", ErrNotThis, MaxHeader)
	errNoHost     = fmt.Errorf("%w: request without a host header", ErrNoName)
	errHostPort   = fmt.Errorf("%w: malformed port in host header", ErrNoName)
)

// HTTP takes the name from the Host header of the HTTP/1.x request at the
// start of b (RFC 9112 §3.2), without its port. Only whole lines are read,
// so a prefix of a request gives ErrMore until the Host line has ended. An
// address in Host gives ErrNoName; so does a request head that ends
// without a Host header. b is not modified or kept.
func HTTP(b []byte) (string, error) {
	if len(b) > MaxHeader {
		b = b[:MaxHeader]
	}
	if err := method(b); err != nil {
		return "", err
	}
	line, rest, ok := cutLine(b)
	if !ok {
		if len(b) == MaxHeader {
			return "", errHeadLarge
		}
		return "", ErrMore
	}
	if !requestLine(line) {
		return "", errReqLine
	}
	for {
		line, rest, ok = cutLine(rest)
		if !ok {
			if len(b) == MaxHeader {
				return "", errHeadLarge
			}
			return "", ErrMore
		}
		if len(line) == 0 {
			return "", errNoHost // the end of the head
		}
		name, value, ok := bytes.Cut(line, []byte(":"))
		if !ok || len(name) == 0 || !token(name) {
			return "", errHeaderLine // obs-fold lines included: they start with a space
		}
		if len(name) == 4 && bytes.EqualFold(name, []byte("host")) {
			return hostHeader(bytes.Trim(value, " \t"))
		}
	}
}

// method checks that b starts with a known method and a space, or is a
// prefix of one.
func method(b []byte) error {
	for _, m := range methods {
		n := min(len(b), len(m)+1)
		if string(b[:min(n, len(m))]) != m[:min(n, len(m))] {
			continue
		}
		if n <= len(m) {
			return ErrMore
		}
		if b[len(m)] == ' ' {
			return nil
		}
	}
	return errMethod
}

// cutLine cuts b at its first LF, dropping a CR before it (RFC 9112 §2.2
// lets a recipient take a bare LF as a line end).
func cutLine(b []byte) (line, rest []byte, ok bool) {
	i := bytes.IndexByte(b, '\n')
	if i < 0 {
		return nil, b, false
	}
	line, rest = b[:i], b[i+1:]
	if n := len(line); n > 0 && line[n-1] == '\r' {
		line = line[:n-1]
	}
	return line, rest, true
}

// requestLine checks method SP request-target SP HTTP/1.x, the method
// being checked already.
func requestLine(line []byte) bool {
	sp := bytes.IndexByte(line, ' ')
	last := bytes.LastIndexByte(line, ' ')
	if sp < 0 || last <= sp+1 {
		return false
	}
	for _, c := range line[sp+1 : last] {
		if c <= ' ' || c == 0x7f {
			return false
		}
	}
	v := line[last+1:]
	return len(v) == 8 && string(v[:7]) == "HTTP/1." && (v[7] == '0' || v[7] == '1')
}

// token reports whether b is an RFC 9110 §5.6.2 token, as field names are.
func token(b []byte) bool {
	for _, c := range b {
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		case strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0:
		default:
			return false
		}
	}
	return true
}

// hostHeader takes the host from a Host value, uri-host [ ":" port ]
// (RFC 9110 §7.2). A bracketed IPv6 literal is an address, not a name.
func hostHeader(v []byte) (string, error) {
	if len(v) == 0 {
		return "", errNoHost
	}
	host, port := v, []byte(nil)
	if v[0] == '[' {
		end := bytes.IndexByte(v, ']')
		if end < 0 {
			return "", errBadName
		}
		host, port = v[:end+1], v[end+1:]
		if len(port) > 0 && port[0] != ':' {
			return "", errHostPort
		}
	} else if i := bytes.LastIndexByte(v, ':'); i >= 0 {
		host, port = v[:i], v[i:]
	}
	if len(port) > 0 {
		port = port[1:] // the colon
		if len(port) > 5 {
			return "", errHostPort
		}
		for _, c := range port {
			if c < '0' || c > '9' {
				return "", errHostPort
			}
		}
	}
	if len(host) == 0 {
		return "", errBadName
	}
	if host[0] == '[' {
		return "", errAddrName
	}
	return hostName(host)
}
