package sniff

import "fmt"

// TLS record layer (RFC 8446 §5.1) and the ClientHello (§4.1.2).
const (
	recordHandshake    = 0x16
	recordHeaderLen    = 5
	maxRecordLen       = 1 << 14 // TLSPlaintext.length
	handshakeHello     = 1
	handshakeHeaderLen = 4
	extServerName      = 0
	serverNameHost     = 0
	// maxRecords bounds how many records the hello may be cut into. Real
	// clients use one; some censorship-evasion tools cut the hello into a
	// few small records on purpose, which must still be sniffed.
	maxRecords = 64
)

var (
	errRecord     = fmt.Errorf("%w: not a tls handshake record", ErrNotThis)
	errTooMany    = fmt.Errorf("%w: clienthello cut into more than %d records", ErrNotThis, maxRecords)
	errNotHello   = fmt.Errorf("%w: handshake message is not a clienthello", ErrNotThis)
	errHelloLarge = fmt.Errorf("%w: clienthello larger than %d bytes", ErrNotThis, MaxHello)
	errHelloBad   = fmt.Errorf("%w: malformed clienthello", ErrNotThis)
	errNoSNI      = fmt.Errorf("%w: clienthello without server_name", ErrNoName)
)

// TLS takes the server_name from the ClientHello at the start of b, the
// first bytes a TLS client sent on a stream. The hello may span several
// records and b may end anywhere: a prefix of a valid hello gives ErrMore.
// b is not modified or kept.
func TLS(b []byte) (string, error) {
	msg, err := helloFromRecords(b)
	if err != nil {
		return "", err
	}
	return helloName(msg)
}

// helloFromRecords returns the ClientHello handshake message, header
// included, from the handshake records at the start of b. When the hello is
// in the first record it is a slice of b; only a hello cut into several
// records is copied.
func helloFromRecords(b []byte) ([]byte, error) {
	var first, joined []byte
	need := 0 // the message's length with its header, once known
	for records := 0; ; records++ {
		if records == maxRecords {
			return nil, errTooMany
		}
		// Check what there is of the header before asking for more, so
		// that a stream that is not TLS is let go at its first byte.
		if len(b) >= 1 && b[0] != recordHandshake ||
			len(b) >= 2 && b[1] != 3 ||
			len(b) >= 3 && b[2] > 4 {
			return nil, errRecord
		}
		if len(b) < recordHeaderLen {
			return nil, ErrMore
		}
		n := int(b[3])<<8 | int(b[4])
		if n == 0 || n > maxRecordLen { // RFC 8446 §5.1: no empty handshake fragments
			return nil, errRecord
		}
		frag := b[recordHeaderLen:]
		if len(frag) > n {
			frag = frag[:n]
		}
		b = b[recordHeaderLen+len(frag):]
		have := frag
		if records == 0 {
			first = frag
		} else {
			if joined == nil {
				joined = make([]byte, 0, max(need, len(first)+len(frag)))
				joined = append(joined, first...)
			}
			joined = append(joined, frag...)
			have = joined
		}
		if need == 0 && len(have) >= handshakeHeaderLen {
			l, err := helloLen(have)
			if err != nil {
				return nil, err
			}
			need = l
		}
		if need > 0 && len(have) >= need {
			return have[:need], nil
		}
		if len(frag) < n {
			return nil, ErrMore
		}
	}
}

// helloLen checks the handshake header at the start of b (at least four
// bytes) and returns the length of the whole message.
func helloLen(b []byte) (int, error) {
	if b[0] != handshakeHello {
		return 0, errNotHello
	}
	n := handshakeHeaderLen + (int(b[1])<<16 | int(b[2])<<8 | int(b[3]))
	if n > MaxHello {
		return 0, errHelloLarge
	}
	return n, nil
}

// helloName takes the host_name from a whole ClientHello handshake message,
// header included, as TLS records or QUIC CRYPTO frames carry it. The
// whole message is checked for structure, not only up to the name, so that
// bytes that merely look like a hello are refused.
func helloName(msg []byte) (string, error) {
	r := reader{b: msg[handshakeHeaderLen:]}
	r.skip(2 + 32)                  // legacy_version, random
	if s := r.vec8(); len(s) > 32 { // legacy_session_id
		return "", errHelloBad
	}
	if cs := r.vec16(); len(cs) < 2 || len(cs)%2 != 0 { // cipher_suites
		return "", errHelloBad
	}
	if cm := r.vec8(); len(cm) < 1 { // legacy_compression_methods
		return "", errHelloBad
	}
	if r.bad {
		return "", errHelloBad
	}
	if len(r.b) == 0 { // a hello of TLS 1.0-1.2 may carry no extensions
		return "", errNoSNI
	}
	exts := reader{b: r.vec16()}
	if r.bad || len(r.b) != 0 {
		return "", errHelloBad
	}
	var sni []byte
	found := false
	for len(exts.b) > 0 {
		typ := exts.u16()
		data := exts.vec16()
		if exts.bad {
			return "", errHelloBad
		}
		if typ != extServerName || found {
			continue
		}
		found = true
		name, err := serverName(data)
		if err != nil {
			return "", err
		}
		sni = name
	}
	if sni == nil {
		return "", errNoSNI
	}
	return hostName(sni)
}

// serverName returns the first host_name of a server_name extension's
// ServerNameList (RFC 6066 §3), or nil if it has none.
func serverName(data []byte) ([]byte, error) {
	r := reader{b: data}
	list := reader{b: r.vec16()}
	if r.bad || len(r.b) != 0 || len(list.b) == 0 {
		return nil, errHelloBad
	}
	var host []byte
	for len(list.b) > 0 {
		typ := list.u8()
		name := list.vec16()
		if list.bad {
			return nil, errHelloBad
		}
		if typ == serverNameHost && host == nil {
			host = name
		}
	}
	return host, nil
}

// reader reads big-endian fields from b. A read past the end sets bad and
// returns zeros, so a parser checks once after a run of reads.
type reader struct {
	b   []byte
	bad bool
}

func (r *reader) take(n int) []byte {
	if r.bad || n < 0 || n > len(r.b) {
		r.bad = true
		r.b = nil
		return nil
	}
	s := r.b[:n:n]
	r.b = r.b[n:]
	return s
}

func (r *reader) skip(n int) { r.take(n) }

func (r *reader) u8() int {
	s := r.take(1)
	if s == nil {
		return 0
	}
	return int(s[0])
}

func (r *reader) u16() int {
	s := r.take(2)
	if s == nil {
		return 0
	}
	return int(s[0])<<8 | int(s[1])
}

func (r *reader) vec8() []byte  { return r.take(r.u8()) }
func (r *reader) vec16() []byte { return r.take(r.u16()) }

// varint reads a QUIC variable-length integer (RFC 9000 §16).
func (r *reader) varint() uint64 {
	if r.bad || len(r.b) == 0 {
		r.bad = true
		return 0
	}
	s := r.take(1 << (r.b[0] >> 6))
	if s == nil {
		return 0
	}
	v := uint64(s[0] & 0x3f)
	for _, c := range s[1:] {
		v = v<<8 | uint64(c)
	}
	return v
}
