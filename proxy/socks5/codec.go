// Package socks5 owns the SOCKS version 5 wire format (RFC 1928) and its
// username/password sub-negotiation (RFC 1929), as pure functions on bytes.
//
// It does no I/O, keeps no state and sets no deadlines: the dialer in package
// proxy owns the socket and decides what to read next. Keeping the two apart
// lets every parser here be fuzzed on its own. Encoders append to a caller's
// slice and return it unchanged when they fail; parsers take a byte slice,
// never index past it, and report ErrTruncated when it is too short.
// Variable-length messages come with a length function (ReplyLen, AddrLen)
// that tells from a prefix how many bytes the whole message needs, so a
// reader can take exactly one message off a stream and leave the data after
// it in the socket.
//
// The command is a parameter of requests, so CONNECT and UDP ASSOCIATE
// share one request codec; the header of each relayed datagram (RFC 1928
// §7) uses the same address codec.
package socks5

import (
	"errors"
	"fmt"
)

// Version is the protocol version, the first octet of every RFC 1928 message.
const Version byte = 0x05

// Authentication methods (RFC 1928 §3).
const (
	MethodNoAuth       byte = 0x00
	MethodUserPass     byte = 0x02 // RFC 1929
	MethodNoAcceptable byte = 0xFF
)

// Command is the CMD field of a request (RFC 1928 §4).
type Command byte

// Commands (RFC 1928 §4).
const (
	CommandConnect      Command = 0x01
	CommandBind         Command = 0x02
	CommandUDPAssociate Command = 0x03
)

// String returns the command's name as RFC 1928 §4 spells it.
func (c Command) String() string {
	switch c {
	case CommandConnect:
		return "CONNECT"
	case CommandBind:
		return "BIND"
	case CommandUDPAssociate:
		return "UDP ASSOCIATE"
	}
	return fmt.Sprintf("command %#02x", byte(c))
}

// userPassVersion is the VER of the username/password sub-negotiation
// (RFC 1929 §2); it is not the SOCKS version.
const userPassVersion byte = 0x01

// Fixed message lengths.
const (
	// MethodSelectionLen is the length of the server's method selection:
	// VER, METHOD (RFC 1928 §3).
	MethodSelectionLen = 2
	// UserPassResponseLen is the length of the username/password response:
	// VER, STATUS (RFC 1929 §2).
	UserPassResponseLen = 2
)

// AppendGreeting appends the client's version identifier/method selection
// message: VER, NMETHODS, METHODS (RFC 1928 §3). It fails for no methods or
// more than 255.
func AppendGreeting(b []byte, methods ...byte) ([]byte, error) {
	if len(methods) == 0 || len(methods) > 255 {
		return b, fmt.Errorf("%d authentication methods offered, want 1 to 255", len(methods))
	}
	b = append(b, Version, byte(len(methods)))
	return append(b, methods...), nil
}

// ParseGreeting parses the client's greeting at the start of b and returns
// the methods offered (aliasing b) and the number of bytes it took.
func ParseGreeting(b []byte) (methods []byte, n int, err error) {
	if len(b) < 2 {
		return nil, 0, ErrTruncated
	}
	if err := checkVersion(b[0], Version); err != nil {
		return nil, 0, err
	}
	if b[1] == 0 {
		return nil, 0, errors.New("greeting offers no authentication method")
	}
	n = 2 + int(b[1])
	if len(b) < n {
		return nil, 0, ErrTruncated
	}
	return b[2:n], n, nil
}

// AppendMethodSelection appends the server's choice of method (RFC 1928 §3).
func AppendMethodSelection(b []byte, method byte) []byte {
	return append(b, Version, method)
}

// ParseMethodSelection parses the server's choice of method, which must be
// exactly MethodSelectionLen bytes. It returns ErrNoAcceptableMethods for
// 0xFF; checking that the method is one the client offered is the caller's
// job.
func ParseMethodSelection(b []byte) (method byte, err error) {
	if err := checkLen(b, MethodSelectionLen); err != nil {
		return 0, err
	}
	if err := checkVersion(b[0], Version); err != nil {
		return 0, err
	}
	if b[1] == MethodNoAcceptable {
		return b[1], ErrNoAcceptableMethods
	}
	return b[1], nil
}

// AppendUserPassRequest appends the username/password request: VER 0x01,
// ULEN, UNAME, PLEN, PASSWD (RFC 1929 §2). The username must be 1 to 255
// bytes. The RFC says the same of the password, but an empty one is let
// through: curl sends it and servers compare it like any other.
func AppendUserPassRequest(b []byte, username, password string) ([]byte, error) {
	if len(username) == 0 || len(username) > 255 {
		return b, fmt.Errorf("username of %d bytes, want 1 to 255", len(username))
	}
	if len(password) > 255 {
		return b, fmt.Errorf("password of %d bytes, want at most 255", len(password))
	}
	b = append(b, userPassVersion, byte(len(username)))
	b = append(b, username...)
	b = append(b, byte(len(password)))
	return append(b, password...), nil
}

// ParseUserPassRequest parses a username/password request at the start of b
// and returns the credentials with the number of bytes it took.
func ParseUserPassRequest(b []byte) (username, password string, n int, err error) {
	if len(b) < 2 {
		return "", "", 0, ErrTruncated
	}
	if err := checkVersion(b[0], userPassVersion); err != nil {
		return "", "", 0, err
	}
	ulen := int(b[1])
	if len(b) < 2+ulen+1 {
		return "", "", 0, ErrTruncated
	}
	plen := int(b[2+ulen])
	n = 2 + ulen + 1 + plen
	if len(b) < n {
		return "", "", 0, ErrTruncated
	}
	return string(b[2 : 2+ulen]), string(b[3+ulen : n]), n, nil
}

// AppendUserPassResponse appends the server's verdict: VER 0x01, STATUS,
// where 0x00 is success (RFC 1929 §2).
func AppendUserPassResponse(b []byte, status byte) []byte {
	return append(b, userPassVersion, status)
}

// ParseUserPassResponse parses the server's verdict, which must be exactly
// UserPassResponseLen bytes, and returns ErrAuthFailed for any status but 0.
func ParseUserPassResponse(b []byte) error {
	if err := checkLen(b, UserPassResponseLen); err != nil {
		return err
	}
	if err := checkVersion(b[0], userPassVersion); err != nil {
		return err
	}
	if b[1] != 0x00 {
		return ErrAuthFailed
	}
	return nil
}

// Request is a client's request: CMD and DST.ADDR, DST.PORT (RFC 1928 §4).
type Request struct {
	Command Command
	Addr    Addr
}

// AppendRequest appends a request: VER, CMD, RSV, then the address
// (RFC 1928 §4).
func AppendRequest(b []byte, cmd Command, dst Addr) ([]byte, error) {
	out, err := AppendAddr(append(b, Version, byte(cmd), 0x00), dst)
	if err != nil {
		return b, err
	}
	return out, nil
}

// ParseRequest parses a request at the start of b and returns it with the
// number of bytes it took.
func ParseRequest(b []byte) (Request, int, error) {
	code, addr, n, err := parseHeadAddr(b)
	return Request{Command: Command(code), Addr: addr}, n, err
}

// Reply is a server's reply: REP and BND.ADDR, BND.PORT (RFC 1928 §6).
type Reply struct {
	Code byte
	Addr Addr
}

// Err returns nil for a successful reply and a *ReplyError otherwise.
func (r Reply) Err() error {
	if r.Code == ReplySucceeded {
		return nil
	}
	return &ReplyError{Code: r.Code}
}

// AppendReply appends a reply: VER, REP, RSV, then the address (RFC 1928
// §6).
func AppendReply(b []byte, r Reply) ([]byte, error) {
	out, err := AppendAddr(append(b, Version, r.Code, 0x00), r.Addr)
	if err != nil {
		return b, err
	}
	return out, nil
}

// replyHeadLen is VER, REP and RSV: the part of a reply before its address.
const replyHeadLen = 3

// ReplyLen reports how many bytes the reply at the start of b needs, as far
// as the prefix b tells: 4 (VER, REP, RSV, ATYP) until those have arrived,
// then 10 for IPv4, 22 for IPv6, 5 for a domain until its length octet has
// arrived and then 7 plus the length. Reading until len(b) reaches the
// returned value, and asking again, takes exactly one reply off a stream.
// It fails as soon as the prefix shows a bad version, RSV or ATYP.
func ReplyLen(b []byte) (int, error) {
	if err := checkHead(b); err != nil {
		return 0, err
	}
	if len(b) < replyHeadLen {
		// Ask for ATYP with the head: it decides everything after.
		return replyHeadLen + 1, nil
	}
	n, err := AddrLen(b[replyHeadLen:])
	if err != nil {
		return 0, err
	}
	return replyHeadLen + n, nil
}

// ParseReply parses a reply at the start of b and returns it with the number
// of bytes it took. A reply with a failure code parses without error; its
// Err method returns the *ReplyError.
func ParseReply(b []byte) (Reply, int, error) {
	code, addr, n, err := parseHeadAddr(b)
	return Reply{Code: code, Addr: addr}, n, err
}

// parseHeadAddr parses VER, a code octet (CMD or REP), RSV and an address:
// the shape shared by requests and replies (RFC 1928 §§4, 6).
func parseHeadAddr(b []byte) (code byte, a Addr, n int, err error) {
	if err := checkHead(b); err != nil {
		return 0, Addr{}, 0, err
	}
	if len(b) < replyHeadLen {
		return 0, Addr{}, 0, ErrTruncated
	}
	a, n, err = DecodeAddr(b[replyHeadLen:])
	if err != nil {
		return 0, Addr{}, 0, err
	}
	return b[1], a, replyHeadLen + n, nil
}

// checkHead checks whatever of VER and RSV the prefix b holds. RSV must be
// 0x00 (RFC 1928 §§4, 6); holding servers to it keeps a desynchronised
// stream from passing as a reply.
func checkHead(b []byte) error {
	if len(b) >= 1 {
		if err := checkVersion(b[0], Version); err != nil {
			return err
		}
	}
	if len(b) >= 3 && b[2] != 0x00 {
		return fmt.Errorf("reserved octet is %#02x, want 0x00", b[2])
	}
	return nil
}

func checkVersion(got, want byte) error {
	if got != want {
		return fmt.Errorf("version %#02x, want %#02x", got, want)
	}
	return nil
}

func checkLen(b []byte, want int) error {
	if len(b) < want {
		return ErrTruncated
	}
	if len(b) > want {
		return fmt.Errorf("message of %d bytes, want %d", len(b), want)
	}
	return nil
}
