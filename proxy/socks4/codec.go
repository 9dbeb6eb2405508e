// Package socks4 owns the SOCKS version 4 wire format and its 4A extension
// for domain names, as pure functions on bytes.
//
// SOCKS4 has no RFC; the references are Ying-Da Lee's "SOCKS: A protocol for
// TCP proxy across firewalls" (SOCKS4.protocol) and "SOCKS 4A: A Simple
// Extension to SOCKS 4 Protocol" (SOCKS4A.protocol). Like package socks5 it
// does no I/O: the dialer in package proxy owns the socket. Encoders append
// to a caller's slice and return it unchanged when they fail; parsers never
// index past the slice they are given and report ErrTruncated when it is
// too short. Every reply is ReplyLen bytes, so a reader takes exactly that
// and leaves the data after it in the socket.
package socks4

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
)

// Version is VN in a request. A reply's VN is 0 (SOCKS4.protocol).
const Version byte = 0x04

// Command is the CD field of a request.
type Command byte

// Commands (SOCKS4.protocol).
const (
	CommandConnect Command = 0x01
	CommandBind    Command = 0x02
)

// Reply codes, the CD field of a reply (SOCKS4.protocol).
const (
	ReplyGranted          byte = 90
	ReplyRejected         byte = 91
	ReplyIdentUnreachable byte = 92
	ReplyIdentMismatch    byte = 93
)

// ReplyLen is the length of every reply: VN, CD, DSTPORT, DSTIP.
const ReplyLen = 8

// Neither protocol text bounds USERID or the host name; servers read them
// into fixed buffers (OpenSSH allows 1024 bytes in all), so keep each to
// what SOCKS5 allows.
const (
	MaxUserIDLen = 255
	MaxNameLen   = 255
)

// requestHeadLen is VN, CD, DSTPORT, DSTIP: the part before USERID.
const requestHeadLen = 8

// ErrTruncated means a message ended before its last field.
var ErrTruncated = errors.New("truncated message")

// Request is a client's request. With Name set it is a SOCKS4A request: the
// server resolves Name and IP is not sent.
type Request struct {
	Command Command
	// IP is the IPv4 destination when Name is empty.
	IP netip.Addr
	// Name is a domain name for the server to resolve (SOCKS4A).
	Name string
	Port uint16
	// UserID identifies the user; it may be empty.
	UserID string
}

// AppendRequest appends r: VN, CD, DSTPORT, DSTIP, USERID, NUL and, for
// SOCKS4A, the name and NUL with DSTIP 0.0.0.1. It fails for an IP that is
// not IPv4 (SOCKS4 has no other), for 0.0.0.x, which SOCKS4A servers read
// as "a name follows", and for a user ID or name that holds a NUL or is too
// long.
func AppendRequest(b []byte, r Request) ([]byte, error) {
	if err := checkString("user ID", r.UserID, MaxUserIDLen); err != nil {
		return b, err
	}
	ip := [4]byte{0, 0, 0, 1}
	if r.Name != "" {
		if err := checkString("name", r.Name, MaxNameLen); err != nil {
			return b, err
		}
	} else {
		switch {
		case !r.IP.Is4():
			return b, fmt.Errorf("SOCKS4 carries only IPv4 addresses, not %v", r.IP)
		case isSOCKS4AMarker(r.IP.As4()):
			return b, fmt.Errorf("address %v means a SOCKS4A name follows", r.IP)
		}
		ip = r.IP.As4()
	}
	b = append(b, Version, byte(r.Command))
	b = binary.BigEndian.AppendUint16(b, r.Port)
	b = append(b, ip[:]...)
	b = append(append(b, r.UserID...), 0)
	if r.Name != "" {
		b = append(append(b, r.Name...), 0)
	}
	return b, nil
}

// ParseRequest parses a request at the start of b and returns it with the
// number of bytes it took. For SOCKS4A the IP is left unset.
func ParseRequest(b []byte) (Request, int, error) {
	if len(b) < requestHeadLen {
		return Request{}, 0, ErrTruncated
	}
	if b[0] != Version {
		return Request{}, 0, fmt.Errorf("version %#02x, want %#02x", b[0], Version)
	}
	r := Request{Command: Command(b[1]), Port: binary.BigEndian.Uint16(b[2:4])}
	ip := [4]byte(b[4:8])
	userID, n, err := cString(b, requestHeadLen, MaxUserIDLen)
	if err != nil {
		return Request{}, 0, fmt.Errorf("user ID: %w", err)
	}
	r.UserID = userID
	if !isSOCKS4AMarker(ip) {
		r.IP = netip.AddrFrom4(ip)
		return r, n, nil
	}
	name, n, err := cString(b, n, MaxNameLen)
	if err != nil {
		return Request{}, 0, fmt.Errorf("name: %w", err)
	}
	if name == "" {
		return Request{}, 0, errors.New("empty name")
	}
	r.Name = name
	return r, n, nil
}

// Reply is a server's reply. DSTPORT and DSTIP are meaningful only for BIND;
// servers answering CONNECT often send zeros.
type Reply struct {
	Code byte
	Port uint16
	IP   netip.Addr
}

// Err returns nil for a granted request and a *ReplyError otherwise.
func (r Reply) Err() error {
	if r.Code == ReplyGranted {
		return nil
	}
	return &ReplyError{Code: r.Code}
}

// AppendReply appends r with VN 0. An IP that is not IPv4 goes as 0.0.0.0.
func AppendReply(b []byte, r Reply) []byte {
	var ip [4]byte
	if r.IP.Is4() {
		ip = r.IP.As4()
	}
	b = append(b, 0x00, r.Code)
	b = binary.BigEndian.AppendUint16(b, r.Port)
	return append(b, ip[:]...)
}

// ParseReply parses a reply, which must be exactly ReplyLen bytes. VN should
// be 0; 4 is accepted too, since some servers echo the request's version.
// A reply with a code other than ReplyGranted parses without error; its Err
// method returns the *ReplyError.
func ParseReply(b []byte) (Reply, error) {
	switch {
	case len(b) < ReplyLen:
		return Reply{}, ErrTruncated
	case len(b) > ReplyLen:
		return Reply{}, fmt.Errorf("message of %d bytes, want %d", len(b), ReplyLen)
	case b[0] != 0x00 && b[0] != Version:
		return Reply{}, fmt.Errorf("reply version %#02x, want 0x00", b[0])
	}
	return Reply{
		Code: b[1],
		Port: binary.BigEndian.Uint16(b[2:4]),
		IP:   netip.AddrFrom4([4]byte(b[4:8])),
	}, nil
}

// ReplyError is a reply whose code is not ReplyGranted. Code 91 ("request
// rejected or failed") is what servers send when their connect fails, so it
// unwraps to syscall.ECONNREFUSED, as a refused direct dial would.
type ReplyError struct {
	Code byte
}

func (e *ReplyError) Error() string {
	var msg string
	switch e.Code {
	case ReplyRejected:
		msg = "request rejected or failed"
	case ReplyIdentUnreachable:
		msg = "rejected: the server cannot reach identd on the client"
	case ReplyIdentMismatch:
		msg = "rejected: identd on the client reports a different user ID"
	default:
		return fmt.Sprintf("unknown reply code %d", e.Code)
	}
	return fmt.Sprintf("%s (reply code %d)", msg, e.Code)
}

// Unwrap returns syscall.ECONNREFUSED for code 91 and nil otherwise.
func (e *ReplyError) Unwrap() error {
	if e.Code == ReplyRejected {
		return syscall.ECONNREFUSED
	}
	return nil
}

// isSOCKS4AMarker reports whether ip is 0.0.0.x with x not zero: the DSTIP
// with which a SOCKS4A request says that a name follows USERID.
func isSOCKS4AMarker(ip [4]byte) bool {
	return ip[0] == 0 && ip[1] == 0 && ip[2] == 0 && ip[3] != 0
}

func checkString(what, s string, maxLen int) error {
	switch {
	case len(s) > maxLen:
		return fmt.Errorf("%s of %d bytes, want at most %d", what, len(s), maxLen)
	case strings.IndexByte(s, 0) >= 0:
		return fmt.Errorf("%s holds a NUL byte", what)
	}
	return nil
}

// cString reads the NUL-terminated string at b[start:] of at most maxLen
// bytes and returns it with the offset after the NUL.
func cString(b []byte, start, maxLen int) (string, int, error) {
	i := bytes.IndexByte(b[start:], 0)
	switch {
	case i > maxLen || (i < 0 && len(b)-start > maxLen):
		return "", 0, fmt.Errorf("longer than %d bytes", maxLen)
	case i < 0:
		return "", 0, ErrTruncated
	}
	return string(b[start : start+i]), start + i + 1, nil
}
