// Package pcap records what crosses the TUN as pcapng (the format of
// tcpdump -w and Wireshark), for --pcap. Tap wraps a device so that every
// packet read from it and written to it is recorded, as the packets are:
// with offloads on, a read can be one TCP segment of up to 64 KiB, and its
// checksum may still be partial, as tcpdump shows on a TSO interface.
//
// Recording never holds up or fails the data path: a write error (a full
// disk) is reported once and recording stops. A file that reaches its size
// limit is renamed to FILE.1 (replacing the previous one) and a new FILE
// is started, so a capture left on for months holds the most recent 2×
// the limit.
package pcap

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// pcapng block types and constants (draft-ietf-opsawg-pcapng, sections 4.1,
// 4.2 and 4.3).
const (
	blockSHB       = 0x0A0D0D0A
	blockIDB       = 0x00000001
	blockEPB       = 0x00000006
	byteOrderMagic = 0x1A2B3C4D
	// linkTypeRaw is LINKTYPE_RAW: each packet starts with its IPv4 or
	// IPv6 header, as on a TUN without packet information.
	linkTypeRaw = 101
	snapLen     = 1 << 16
	optEnd      = 0
	optIfName   = 2 // if_name, in an IDB
	optEPBFlags = 2 // epb_flags, in an EPB: the direction
)

// Direction is which way a packet crossed the TUN, seen from netstackd:
// In was read from the device (sent by the clients), Out was written to it.
type Direction uint8

const (
	In Direction = iota + 1
	Out
)

// DefaultMaxSize is the size at which a capture file is rotated when
// Config.MaxSize is 0.
const DefaultMaxSize = 100 << 20

// Config configures a Writer.
type Config struct {
	// Path is the capture file; created, or truncated if it exists.
	Path string
	// Interface names the interface in the file (tcpdump -r shows it).
	Interface string
	// MaxSize rotates the file once it is this large. 0 means DefaultMaxSize.
	MaxSize int64
	// Logger hears about rotations and the first write error; nil discards.
	Logger *slog.Logger
	// now is the clock of the timestamps; tests set it.
	now func() time.Time
}

// Writer appends packets to a pcapng file. It is safe for concurrent use:
// the device's queues record from their own goroutines.
type Writer struct {
	cfg Config
	log *slog.Logger

	mu      sync.Mutex
	f       *os.File
	w       *bufio.Writer
	size    int64 // bytes in the current file
	failed  bool  // a write failed: recording has stopped
	closed  bool
	scratch []byte
}

// Create opens cfg.Path and writes the file's header.
func Create(cfg Config) (*Writer, error) {
	if cfg.MaxSize <= 0 {
		cfg.MaxSize = DefaultMaxSize
	}
	if cfg.now == nil {
		cfg.now = time.Now
	}
	w := &Writer{cfg: cfg, log: cfg.Logger}
	if w.log == nil {
		w.log = slog.New(slog.DiscardHandler)
	}
	if err := w.open(); err != nil {
		return nil, err
	}
	return w, nil
}

// open starts a new file at the configured path: the section header and
// the one interface every packet refers to.
func (w *Writer) open() error {
	f, err := os.OpenFile(w.cfg.Path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return fmt.Errorf("create pcap %s: %w", w.cfg.Path, err)
	}
	w.f, w.w, w.size = f, bufio.NewWriterSize(f, 64<<10), 0
	w.block(blockSHB, func(b []byte) []byte {
		b = binary.LittleEndian.AppendUint32(b, byteOrderMagic)
		b = binary.LittleEndian.AppendUint16(b, 1) // major version
		b = binary.LittleEndian.AppendUint16(b, 0) // minor version
		return binary.LittleEndian.AppendUint64(b, ^uint64(0))
	})
	w.block(blockIDB, func(b []byte) []byte {
		b = binary.LittleEndian.AppendUint16(b, linkTypeRaw)
		b = binary.LittleEndian.AppendUint16(b, 0)
		b = binary.LittleEndian.AppendUint32(b, snapLen)
		if w.cfg.Interface != "" {
			b = appendOption(b, optIfName, []byte(w.cfg.Interface))
		}
		return appendOption(b, optEnd, nil)
	})
	return nil
}

// appendOption appends one option: code, length, value padded to 32 bits.
func appendOption(b []byte, code uint16, value []byte) []byte {
	b = binary.LittleEndian.AppendUint16(b, code)
	b = binary.LittleEndian.AppendUint16(b, uint16(len(value)))
	b = append(b, value...)
	return append(b, make([]byte, pad(len(value)))...)
}

func pad(n int) int { return (4 - n%4) % 4 }

// block writes one block around the body that fill appends: type, total
// length, body, total length again. Called with w.mu held.
func (w *Writer) block(typ uint32, fill func([]byte) []byte) {
	b := w.scratch[:0]
	b = binary.LittleEndian.AppendUint32(b, typ)
	b = binary.LittleEndian.AppendUint32(b, 0) // length, set below
	b = fill(b)
	total := len(b) + 4
	binary.LittleEndian.PutUint32(b[4:], uint32(total))
	b = binary.LittleEndian.AppendUint32(b, uint32(total))
	w.scratch = b
	if _, err := w.w.Write(b); err != nil {
		w.fail(err)
		return
	}
	w.size += int64(total)
}

// fail stops recording after the first write error, saying so once.
func (w *Writer) fail(err error) {
	if !w.failed {
		w.failed = true
		w.log.Warn("pcap: recording stopped", "file", w.cfg.Path, "err", err)
	}
}

// Record appends one packet, given as the slices it is made of (a device
// write's scatter list, or a single read buffer).
func (w *Writer) Record(dir Direction, parts ...[]byte) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.failed || w.closed {
		return
	}
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	captured := min(n, snapLen)
	ts := uint64(w.cfg.now().UnixMicro())
	w.block(blockEPB, func(b []byte) []byte {
		b = binary.LittleEndian.AppendUint32(b, 0) // interface 0
		b = binary.LittleEndian.AppendUint32(b, uint32(ts>>32))
		b = binary.LittleEndian.AppendUint32(b, uint32(ts))
		b = binary.LittleEndian.AppendUint32(b, uint32(captured))
		b = binary.LittleEndian.AppendUint32(b, uint32(n))
		left := captured
		for _, p := range parts {
			take := min(len(p), left)
			b = append(b, p[:take]...)
			left -= take
		}
		b = append(b, make([]byte, pad(captured))...)
		var flags [4]byte
		binary.LittleEndian.PutUint32(flags[:], uint32(dir)) // bits 0-1: 1 inbound, 2 outbound
		b = appendOption(b, optEPBFlags, flags[:])
		return appendOption(b, optEnd, nil)
	})
	if w.size >= w.cfg.MaxSize && !w.failed {
		w.rotate()
	}
}

// rotate moves the full file to Path.1 and starts a new one. Called with
// w.mu held.
func (w *Writer) rotate() {
	err := errors.Join(w.w.Flush(), w.f.Close())
	w.f = nil
	if err == nil {
		err = os.Rename(w.cfg.Path, w.cfg.Path+".1")
	}
	if err == nil {
		err = w.open()
	}
	if err != nil {
		w.fail(fmt.Errorf("rotate: %w", err))
		return
	}
	w.log.Info("pcap: rotated", "file", w.cfg.Path, "previous", w.cfg.Path+".1", "max_size", w.cfg.MaxSize)
}

// Flush writes what is buffered, so the file can be read while recording
// goes on.
func (w *Writer) Flush() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed || w.failed {
		return nil
	}
	return w.w.Flush()
}

// Close flushes and closes the file; Record does nothing afterwards. It is
// safe to call twice.
func (w *Writer) Close() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.closed {
		return nil
	}
	w.closed = true
	if w.f == nil { // a rotation failed and closed it
		return nil
	}
	var err error
	if !w.failed {
		err = w.w.Flush()
	}
	return errors.Join(err, w.f.Close())
}

// Switch records to its file while it is on; it can be turned on and off
// while packets flow (the HTTP listener's /pcap). Off, a packet costs one
// atomic load.
type Switch struct {
	cfg Config
	cur atomic.Pointer[Writer]
	mu  sync.Mutex // serialises On and Off
}

// NewSwitch returns a Switch for cfg, off.
func NewSwitch(cfg Config) *Switch { return &Switch{cfg: cfg} }

// Path is the file the Switch records to.
func (s *Switch) Path() string { return s.cfg.Path }

// Record records the packet if the Switch is on.
func (s *Switch) Record(dir Direction, parts ...[]byte) {
	if w := s.cur.Load(); w != nil {
		w.Record(dir, parts...)
	}
}

// On starts recording in a new file (an existing one is truncated); it
// does nothing if already on.
func (s *Switch) On() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cur.Load() != nil {
		return nil
	}
	w, err := Create(s.cfg)
	if err != nil {
		return err
	}
	s.cur.Store(w)
	return nil
}

// Off stops recording and closes the file. A Record racing with Off
// finds the Writer closed and drops its packet.
func (s *Switch) Off() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.cur.Swap(nil)
	if w == nil {
		return nil
	}
	return w.Close()
}

// Recording reports whether the Switch is on.
func (s *Switch) Recording() bool { return s.cur.Load() != nil }
