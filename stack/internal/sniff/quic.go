package sniff

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
)

// quicVersion is what differs between the QUIC versions whose Initial
// packets we can open: RFC 9001 §5.2 and §5.4 for v1, RFC 9369 §3 for v2.
type quicVersion struct {
	id                         uint32
	salt                       []byte
	keyLabel, ivLabel, hpLabel string
	// initial and retry are the long-header packet type bits (RFC 9000
	// §17.2; RFC 9369 §3.2 permutes them).
	initial, retry byte
}

var quicVersions = [...]quicVersion{
	{
		id:       0x00000001,
		salt:     []byte{0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad, 0xcc, 0xbb, 0x7f, 0x0a},
		keyLabel: "quic key", ivLabel: "quic iv", hpLabel: "quic hp",
		initial: 0, retry: 3,
	},
	{
		id:       0x6b3343cf,
		salt:     []byte{0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb, 0xf9, 0xbd, 0x2e, 0xd9},
		keyLabel: "quicv2 key", ivLabel: "quicv2 iv", hpLabel: "quicv2 hp",
		initial: 1, retry: 0,
	},
}

// Bounds on what one QUIC flow can make us do.
const (
	// MaxDatagrams is how many datagrams QUIC.Feed takes before giving up
	// with ErrNotThis. A hello with a post-quantum key share spans two
	// Initial packets; a client's first flight is rarely more than three
	// datagrams.
	MaxDatagrams = 8
	// minInitialDatagram is the smallest datagram a client may carry an
	// Initial in (RFC 9000 §14.1); it also spares us decrypting every
	// small UDP datagram whose first byte looks like a long header.
	minInitialDatagram = 1200
	// minClientDCID is the shortest Destination Connection ID of a client's
	// first Initial (RFC 9000 §7.2).
	minClientDCID = 8
	maxConnID     = 20
	// maxCryptoSpans bounds the holes in the CRYPTO stream being
	// reassembled: Chrome cuts and shuffles its hello into a handful of
	// frames, nothing needs more than this.
	maxCryptoSpans = 32
	// maxKeys bounds the Destination Connection IDs whose keys are kept.
	maxKeys = 2
)

var (
	errQUICHeader   = fmt.Errorf("%w: not a quic long header of a known version", ErrNotThis)
	errQUICShort    = fmt.Errorf("%w: datagram shorter than %d bytes", ErrNotThis, minInitialDatagram)
	errQUICPacket   = fmt.Errorf("%w: malformed quic packet", ErrNotThis)
	errQUICAuth     = fmt.Errorf("%w: quic initial does not open with its initial keys", ErrNotThis)
	errQUICFrame    = fmt.Errorf("%w: frame not allowed in a client initial", ErrNotThis)
	errQUICCrypto   = fmt.Errorf("%w: crypto data beyond %d bytes or in more than %d pieces", ErrNotThis, MaxHello, maxCryptoSpans)
	errQUICTooMany  = fmt.Errorf("%w: no clienthello in %d datagrams", ErrNotThis, MaxDatagrams)
	errQUICNotFirst = fmt.Errorf("%w: datagram does not start with a client initial packet", ErrNotThis)
)

// QUIC takes the server_name from the ClientHello a QUIC client sends in
// its Initial packets (RFC 9001 §4.1.3 and §5.2), for QUIC v1 (RFC 9000) and
// v2 (RFC 9369). Feed it the client's datagrams one at a time, in the order
// they arrived: the hello may span several Initial packets, and their CRYPTO
// frames may come cut and out of order (Chrome shuffles them). The zero
// value is ready; a QUIC is for one flow and not safe for concurrent use.
//
// It holds at most MaxHello bytes of CRYPTO data and scratch space for one
// datagram, and derives keys once per Destination Connection ID.
type QUIC struct {
	fed    int
	keys   []*initialKeys
	crypto []byte // the CRYPTO stream from offset 0, holes included
	spans  []span // the parts of crypto received, sorted, not touching
	plain  []byte // scratch for one decrypted payload
	header []byte // scratch for one unprotected header
	// name and err are the answer once there is one.
	name string
	err  error
}

// span is the half-open range [start, end) of CRYPTO stream offsets.
type span struct{ start, end int }

// initialKeys are the client's Initial packet protection keys for one
// Destination Connection ID and version (RFC 9001 §5.2).
type initialKeys struct {
	version uint32
	dcid    []byte
	aead    cipher.AEAD
	iv      [12]byte
	hp      cipher.Block
}

// Feed takes the next datagram the client sent and returns the name once
// the whole ClientHello is in, ErrMore while it needs more datagrams, and
// ErrNotThis when the flow is not a QUIC client's Initial or a bound was
// passed. Once it has answered other than ErrMore it gives the same answer
// for ever. The datagram is not modified or kept.
func (q *QUIC) Feed(datagram []byte) (string, error) {
	if q.err != nil || q.name != "" {
		return q.name, q.err
	}
	q.fed++
	if err := q.datagram(datagram); err != nil {
		q.err = err
		return "", err
	}
	name, err := q.hello()
	switch {
	case err == ErrMore && q.fed >= MaxDatagrams:
		err = errQUICTooMany
	case err == ErrMore:
		return "", err
	}
	q.name, q.err = name, err
	return name, err
}

// hello parses the ClientHello if the CRYPTO stream holds all of it.
func (q *QUIC) hello() (string, error) {
	if len(q.spans) == 0 || q.spans[0].start != 0 {
		return "", ErrMore
	}
	have := q.spans[0].end
	if have < handshakeHeaderLen {
		return "", ErrMore
	}
	need, err := helloLen(q.crypto)
	if err != nil {
		return "", err
	}
	if have < need {
		return "", ErrMore
	}
	return helloName(q.crypto[:need])
}

// datagram opens the Initial packets coalesced in one datagram (RFC 9000
// §12.2) and takes in their frames. The first packet must be a client
// Initial that opens: a client's first flight starts every datagram with
// one, since coalesced packets go in order of encryption level. What
// follows it is read as RFC 9000 §12.2 lets a receiver: further Initials
// with the same Destination Connection ID are opened, 0-RTT packets
// stepped over, and anything else (a short header, padding, a packet that
// is malformed, does not open or names another connection) ends the
// datagram without spoiling what came before.
func (q *QUIC) datagram(d []byte) error {
	if len(d) < minInitialDatagram {
		return errQUICShort
	}
	if d[0]&0x80 == 0 { // a short header, or not QUIC at all
		return errQUICNotFirst
	}
	var dcid []byte
	for first := true; len(d) > 0 && d[0]&0x80 != 0; first = false {
		v, typ, hdr, pkt, err := longHeader(d)
		if err != nil && first {
			return err
		}
		if err != nil {
			return nil
		}
		d = d[len(pkt):]
		if typ != v.initial && first {
			// 0-RTT comes after an Initial; Handshake only once the
			// server answered, which it has not; a client sends no Retry.
			return errQUICNotFirst
		}
		if typ != v.initial {
			continue
		}
		id := hdr[6 : 6+int(hdr[5])]
		if !first && !bytes.Equal(id, dcid) {
			return nil
		}
		dcid = id
		plain, err := q.open(v, hdr, pkt)
		if err != nil && first {
			return err
		}
		if err != nil {
			return nil
		}
		if err := q.frames(plain); err != nil {
			return err
		}
	}
	return nil
}

// longHeader parses the long header at the start of d up to the packet
// number (RFC 9000 §17.2). It returns the version, the packet type, the
// header (a slice of pkt ending where the packet number begins) and the
// packet, a prefix of d.
func longHeader(d []byte) (v *quicVersion, typ byte, hdr, pkt []byte, err error) {
	r := reader{b: d}
	b0 := r.u8()
	if b0&0x40 == 0 { // the fixed bit
		return nil, 0, nil, nil, errQUICHeader
	}
	ver := r.take(4)
	if r.bad {
		return nil, 0, nil, nil, errQUICHeader
	}
	id := binary.BigEndian.Uint32(ver)
	for i := range quicVersions {
		if quicVersions[i].id == id {
			v = &quicVersions[i]
		}
	}
	if v == nil {
		return nil, 0, nil, nil, errQUICHeader
	}
	typ = byte(b0>>4) & 3
	dcid := r.vec8()
	scid := r.vec8()
	if len(dcid) > maxConnID || len(scid) > maxConnID {
		return nil, 0, nil, nil, errQUICPacket
	}
	if typ == v.initial {
		if len(dcid) < minClientDCID {
			return nil, 0, nil, nil, errQUICPacket
		}
		r.take(r.length()) // the token
	}
	if typ == v.retry { // no length field, and no client sends one
		return nil, 0, nil, nil, errQUICNotFirst
	}
	n := r.varint()
	if r.bad || n > uint64(len(r.b)) {
		return nil, 0, nil, nil, errQUICPacket
	}
	end := len(d) - len(r.b)
	return v, typ, d[:end], d[:end+int(n)], nil
}

// open removes the protection of one Initial packet (RFC 9001 §5.4 and
// §5.3) and returns its payload, in scratch space reused by the next call.
// hdr is the header up to the packet number, pkt the packet.
func (q *QUIC) open(v *quicVersion, hdr, pkt []byte) ([]byte, error) {
	dcid := hdr[6 : 6+int(hdr[5])]
	k, err := q.keysFor(v, dcid)
	if err != nil {
		return nil, err
	}
	// The sample starts four bytes into the packet number field, whatever
	// its length (RFC 9001 §5.4.2); a packet too short for it is invalid.
	pnOff := len(hdr)
	if len(pkt) < pnOff+4+16 {
		return nil, errQUICPacket
	}
	var mask [16]byte
	k.hp.Encrypt(mask[:], pkt[pnOff+4:pnOff+4+16])
	// Scratch grows to exactly what a datagram needs, never by append's
	// rounding: what a flow holds stays within its largest datagram.
	if cap(q.header) < pnOff+4 {
		q.header = make([]byte, 0, pnOff+4)
	}
	if n := len(pkt) - pnOff; cap(q.plain) < n {
		q.plain = make([]byte, 0, n)
	}
	h := append(q.header[:0], pkt[:pnOff+4]...)
	h[0] ^= mask[0] & 0x0f
	if h[0]&0x0c != 0 { // reserved bits, zero once unprotected (RFC 9000 §17.2)
		return nil, errQUICAuth
	}
	pnLen := int(h[0]&3) + 1
	var pn uint64
	for i := range pnLen {
		h[pnOff+i] ^= mask[1+i]
		pn = pn<<8 | uint64(h[pnOff+i])
	}
	h = h[:pnOff+pnLen]
	// The first flight's packet numbers are small, so the truncated number
	// is the full one (RFC 9000 §17.1 with no packet received yet).
	nonce := k.iv
	for i := range 8 {
		nonce[11-i] ^= byte(pn >> (8 * i))
	}
	plain, err := k.aead.Open(q.plain[:0], nonce[:], pkt[pnOff+pnLen:], h)
	if err != nil {
		return nil, errQUICAuth
	}
	q.plain = plain
	return plain, nil
}

// keysFor returns the client Initial keys for dcid, deriving them the
// first time (RFC 9001 §5.2; RFC 9369 §3.3 for v2's salt and labels).
func (q *QUIC) keysFor(v *quicVersion, dcid []byte) (*initialKeys, error) {
	for _, k := range q.keys {
		if k.version == v.id && bytes.Equal(k.dcid, dcid) {
			return k, nil
		}
	}
	if len(q.keys) == maxKeys {
		return nil, errQUICPacket
	}
	k, err := deriveKeys(v, dcid)
	if err != nil {
		return nil, err
	}
	q.keys = append(q.keys, k)
	return k, nil
}

func deriveKeys(v *quicVersion, dcid []byte) (*initialKeys, error) {
	initial, err := hkdf.Extract(sha256.New, dcid, v.salt)
	if err != nil {
		return nil, fmt.Errorf("quic initial secret: %w", err)
	}
	client, err1 := expandLabel(initial, "client in", sha256.Size)
	key, err2 := expandLabel(client, v.keyLabel, 16)
	iv, err3 := expandLabel(client, v.ivLabel, 12)
	hp, err4 := expandLabel(client, v.hpLabel, 16)
	for _, err := range []error{err1, err2, err3, err4} {
		if err != nil {
			return nil, fmt.Errorf("quic initial keys: %w", err)
		}
	}
	block, err := aes.NewCipher(key)
	if err != nil {
		return nil, fmt.Errorf("quic initial key: %w", err)
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, fmt.Errorf("quic initial aead: %w", err)
	}
	hpBlock, err := aes.NewCipher(hp)
	if err != nil {
		return nil, fmt.Errorf("quic header protection key: %w", err)
	}
	k := &initialKeys{version: v.id, dcid: bytes.Clone(dcid), aead: aead, hp: hpBlock}
	copy(k.iv[:], iv)
	return k, nil
}

// expandLabel is TLS 1.3's HKDF-Expand-Label with an empty context (RFC
// 8446 §7.1), as RFC 9001 §5.1 uses it.
func expandLabel(secret []byte, label string, n int) ([]byte, error) {
	info := make([]byte, 0, 4+len("tls13 ")+len(label))
	info = append(info, byte(n>>8), byte(n), byte(len("tls13 ")+len(label)))
	info = append(info, "tls13 "...)
	info = append(info, label...)
	info = append(info, 0)
	return hkdf.Expand(sha256.New, secret, string(info), n)
}

// Frame types a client may send in an Initial packet (RFC 9000 §12.4,
// table 3).
const (
	framePadding    = 0x00
	framePing       = 0x01
	frameAck        = 0x02
	frameAckECN     = 0x03
	frameCrypto     = 0x06
	frameConnClose  = 0x1c
	maxAckRangeSize = 2 // the smallest encoding of a gap and a range
)

// frames takes in the frames of one decrypted Initial payload.
func (q *QUIC) frames(p []byte) error {
	r := reader{b: p}
	for len(r.b) > 0 {
		if r.b[0] == framePadding { // by far the most bytes: skip them fast
			i := 0
			for i < len(r.b) && r.b[i] == framePadding {
				i++
			}
			r.b = r.b[i:]
			continue
		}
		switch t := r.varint(); t {
		case framePing:
		case frameAck, frameAckECN:
			r.varint() // largest acknowledged
			r.varint() // ack delay
			ranges := r.varint()
			r.varint() // first range
			if ranges > uint64(len(r.b)/maxAckRangeSize) {
				return errQUICPacket
			}
			for range ranges {
				r.varint() // gap
				r.varint() // range length
			}
			if t == frameAckECN {
				r.varint()
				r.varint()
				r.varint()
			}
		case frameCrypto:
			off := r.varint()
			data := r.take(r.length())
			if r.bad {
				return errQUICPacket
			}
			if err := q.addCrypto(off, data); err != nil {
				return err
			}
		case frameConnClose:
			r.varint()         // error code
			r.varint()         // frame type
			r.take(r.length()) // reason phrase
		default:
			return errQUICFrame
		}
		if r.bad {
			return errQUICPacket
		}
	}
	return nil
}

// addCrypto puts data at offset off of the CRYPTO stream and records the
// span. Data sent again over what is already in replaces it: a client
// resends the same bytes.
func (q *QUIC) addCrypto(off uint64, data []byte) error {
	if off > MaxHello || off+uint64(len(data)) > MaxHello {
		return errQUICCrypto
	}
	if len(data) == 0 {
		return nil
	}
	start, end := int(off), int(off)+len(data)
	if end > len(q.crypto) {
		q.crypto = append(q.crypto, make([]byte, end-len(q.crypto))...)
	}
	copy(q.crypto[start:], data)
	// Insert the span, then merge it with the ones it touches.
	i := 0
	for i < len(q.spans) && q.spans[i].end < start {
		i++
	}
	j := i
	for j < len(q.spans) && q.spans[j].start <= end {
		start = min(start, q.spans[j].start)
		end = max(end, q.spans[j].end)
		j++
	}
	if i == j && len(q.spans) == maxCryptoSpans {
		return errQUICCrypto
	}
	q.spans = append(q.spans[:i], append([]span{{start, end}}, q.spans[j:]...)...)
	return nil
}

// length reads a varint that counts the bytes that follow, capped so that
// it converts to int safely: a length past the end makes take fail.
func (r *reader) length() int {
	n := r.varint()
	return int(min(n, uint64(len(r.b))+1))
}
