package socks5

import (
	"errors"
	"fmt"
	"syscall"
)

var (
	// ErrTruncated means a message ended before its last field: the caller
	// should read more bytes, or the peer closed mid-message.
	ErrTruncated = errors.New("truncated message")
	// ErrNoAcceptableMethods is the server's method selection 0xFF: it
	// accepts none of the methods offered (RFC 1928 §3).
	ErrNoAcceptableMethods = errors.New("server accepts none of the offered authentication methods")
	// ErrAuthFailed is a non-zero STATUS in the username/password response
	// (RFC 1929 §2).
	ErrAuthFailed = errors.New("username/password rejected")
)

// Reply codes, the REP field of a reply (RFC 1928 §6).
const (
	ReplySucceeded               byte = 0x00
	ReplyGeneralFailure          byte = 0x01
	ReplyNotAllowed              byte = 0x02
	ReplyNetworkUnreachable      byte = 0x03
	ReplyHostUnreachable         byte = 0x04
	ReplyConnectionRefused       byte = 0x05
	ReplyTTLExpired              byte = 0x06
	ReplyCommandNotSupported     byte = 0x07
	ReplyAddressTypeNotSupported byte = 0x08
)

// ReplyError is a reply whose REP is not ReplySucceeded: the server could
// not carry out the request. Codes that mirror a socket error unwrap to that
// errno, so errors.Is(err, syscall.ECONNREFUSED) holds for a refused target
// whether it was dialed directly or through the proxy.
type ReplyError struct {
	Code byte
}

// replyMessages are the meanings RFC 1928 §6 gives the reply codes.
var replyMessages = [...]string{
	ReplySucceeded:               "succeeded",
	ReplyGeneralFailure:          "general failure",
	ReplyNotAllowed:              "not allowed by ruleset",
	ReplyNetworkUnreachable:      "network unreachable",
	ReplyHostUnreachable:         "host unreachable",
	ReplyConnectionRefused:       "connection refused",
	ReplyTTLExpired:              "TTL expired",
	ReplyCommandNotSupported:     "command not supported",
	ReplyAddressTypeNotSupported: "address type not supported",
}

func (e *ReplyError) Error() string {
	if int(e.Code) < len(replyMessages) {
		return fmt.Sprintf("%s (reply code %d)", replyMessages[e.Code], e.Code)
	}
	return fmt.Sprintf("unassigned reply code %#02x", e.Code)
}

// Unwrap returns the errno that a direct connect would have failed with, or
// nil. TTL expired maps to ETIMEDOUT because servers send it when their own
// connect times out (microsocks maps ETIMEDOUT to it).
func (e *ReplyError) Unwrap() error {
	switch e.Code {
	case ReplyNetworkUnreachable:
		return syscall.ENETUNREACH
	case ReplyHostUnreachable:
		return syscall.EHOSTUNREACH
	case ReplyConnectionRefused:
		return syscall.ECONNREFUSED
	case ReplyTTLExpired:
		return syscall.ETIMEDOUT
	}
	return nil
}
