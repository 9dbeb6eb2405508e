// Package sniff takes the name a client is reaching from the first bytes it
// sends: the server_name of a TLS ClientHello (RFC 6066 §3), the Host header
// of an HTTP/1 request (RFC 9112 §3.2), or the server_name of the
// ClientHello carried in QUIC Initial packets (RFC 9001 §5, v1 and v2).
//
// It is pure: functions on bytes, no sockets, no clocks, no logging. The
// stack owns the reading, the time bound and what a name is then used for;
// this package only says one of four things about what it was shown: here is
// the name, show me more (ErrMore), this is not the protocol (ErrNotThis), or
// this is the protocol but it names nothing (ErrNoName). Every input is
// bounded: a caller never needs to buffer more than MaxStream bytes of a
// stream or feed more than MaxDatagrams datagrams before it gets an answer.
//
// Names come back in lower case without a trailing dot. An address literal
// (an IP in the Host header, or in a server_name, which RFC 6066 forbids but
// some clients send) is not a name: the caller has the address already.
package sniff

import (
	"errors"
	"fmt"
)

// The answers other than a name. Test with errors.Is: the errors returned
// wrap these with what was wrong.
var (
	// ErrMore means the bytes are a prefix of what the protocol allows and
	// the name is not in them yet: read more and call again with all of it.
	ErrMore = errors.New("sniff: need more bytes")
	// ErrNotThis means the bytes are not the protocol asked about, are
	// malformed, or exceed a bound: stop trying this protocol on the flow.
	ErrNotThis = errors.New("sniff: not this protocol")
	// ErrNoName means a complete hello or request header that carries no
	// host name: no SNI, no Host header, or an address instead of a name.
	ErrNoName = errors.New("sniff: no host name")
)

// Bounds. A modern ClientHello with a post-quantum key share
// (X25519MLKEM768) is about 1.8 KB; 16 KiB leaves room for large ticket and
// padding extensions while capping what one flow can make us hold.
const (
	// MaxHello is the largest ClientHello handshake message accepted, its
	// four-byte header included, from TLS records or QUIC CRYPTO frames.
	MaxHello = 16 << 10
	// MaxHeader is how many bytes of an HTTP request head are read looking
	// for the Host header before giving up.
	MaxHeader = 8 << 10
	// MaxStream is the most a caller ever needs to buffer of a stream: TLS
	// records carrying MaxHello bytes in up to maxRecords fragments.
	MaxStream = MaxHello + maxRecords*recordHeaderLen
)

// Proto names where a name came from, for logs and rules.
type Proto uint8

// The protocols names are sniffed from; ProtoNone when none was tried.
const (
	ProtoNone Proto = iota
	ProtoTLS
	ProtoHTTP
	ProtoQUIC
)

// String returns the protocol's name as logs and metrics show it: "tls",
// "http", "quic" or "none".
func (p Proto) String() string {
	switch p {
	case ProtoTLS:
		return "tls"
	case ProtoHTTP:
		return "http"
	case ProtoQUIC:
		return "quic"
	}
	return "none"
}

// Stream sniffs the first bytes of a TCP stream as TLS or HTTP/1, choosing
// by the first byte: 0x16 (a TLS handshake record) is TLS, anything else is
// tried as an HTTP request line. It returns ErrMore for an empty b. The
// stack calls it after each read with everything read so far.
func Stream(b []byte) (name string, p Proto, err error) {
	if len(b) == 0 {
		return "", ProtoNone, ErrMore
	}
	if b[0] == recordHandshake {
		name, err = TLS(b)
		return name, ProtoTLS, err
	}
	name, err = HTTP(b)
	return name, ProtoHTTP, err
}

// Errors naming what was not a name; package-level so that refusing costs
// no allocation.
var (
	errBadName  = fmt.Errorf("%w: not a dns host name", ErrNoName)
	errAddrName = fmt.Errorf("%w: an address, not a name", ErrNoName)
)

// maxName is the longest DNS name in its text form without the trailing
// dot (RFC 1035 §2.3.4: 255 octets on the wire).
const maxName = 253

// hostName checks that b is a DNS host name and returns it in lower case
// without a trailing dot. Underscores are let through: they are common in
// real names though RFC 952 forbids them. A name whose last label is all
// digits is an IPv4 address (no top-level domain is numeric, RFC 3696 §2)
// and is refused with errAddrName; anything with a character outside
// [A-Za-z0-9._-] (IPv6 literals included) with errBadName.
func hostName(b []byte) (string, error) {
	if n := len(b); n > 0 && b[n-1] == '.' {
		b = b[:n-1]
	}
	if len(b) == 0 || len(b) > maxName {
		return "", errBadName
	}
	upper, label, digits := false, 0, true
	for _, c := range b {
		switch {
		case c == '.':
			if label == 0 {
				return "", errBadName
			}
			label, digits = 0, true
			continue
		case '0' <= c && c <= '9':
		case 'A' <= c && c <= 'Z':
			upper, digits = true, false
		case 'a' <= c && c <= 'z', c == '-', c == '_':
			digits = false
		default:
			return "", errBadName
		}
		if label++; label > 63 {
			return "", errBadName
		}
	}
	if label == 0 {
		return "", errBadName
	}
	if digits {
		return "", errAddrName
	}
	if !upper {
		return string(b), nil
	}
	low := make([]byte, len(b))
	for i, c := range b {
		if 'A' <= c && c <= 'Z' {
			c += 'a' - 'A'
		}
		low[i] = c
	}
	return string(low), nil
}
