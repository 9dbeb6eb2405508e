package dns

// DNS over TCP (RFC 7766): the stack hands each intercepted TCP flow to
// port 53 to ServeStream.

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// ServeStream answers DNS over TCP (RFC 7766) on c: messages with a 2-byte
// length prefix, pipelined queries answered concurrently and possibly out
// of order, until the client closes its side, stays idle for 30s, ctx is
// cancelled or the server closes. It returns nil after a clean end (EOF or
// idle), else why it stopped. ServeStream does not close c: the caller owns
// it and closes it after ServeStream returns. To wake a blocked read when
// ctx ends, ServeStream sets a deadline in the past on c. In ModeOff it
// returns an error at once.
func (s *Server) ServeStream(ctx context.Context, c net.Conn) error {
	if s.mode == ModeOff {
		return errOff
	}
	if !s.enter() {
		return net.ErrClosed
	}
	defer s.active.Done()
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	stopClose := context.AfterFunc(s.ctx, func() { cancel(net.ErrClosed) })
	defer stopClose()
	// Cancelling a context does not wake a blocked Read; a deadline in the
	// past does.
	stopWake := context.AfterFunc(ctx, func() { c.SetDeadline(time.Unix(1, 0)) })
	defer stopWake()

	var (
		wg  sync.WaitGroup
		wmu sync.Mutex // one reply written at a time
		sem = make(chan struct{}, maxStreamInFlight)
		br  = bufio.NewReader(c)
		err error
	)
	for {
		// Set the deadline before checking ctx: if ctx ends after the
		// check, its past deadline overrides this one.
		c.SetReadDeadline(time.Now().Add(streamIdle))
		if ctx.Err() != nil {
			break
		}
		var q []byte
		if q, err = readFrame(br); err != nil {
			break
		}
		select {
		case sem <- struct{}{}:
		case <-ctx.Done():
		}
		if ctx.Err() != nil {
			break
		}
		wg.Go(func() {
			defer func() { <-sem }()
			s.answerStream(ctx, cancel, c, &wmu, q)
		})
	}
	wg.Wait()
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if errors.Is(err, io.EOF) || errors.Is(err, os.ErrDeadlineExceeded) {
		return nil
	}
	return fmt.Errorf("read dns query: %w", err)
}

// answerStream answers one query of a stream and writes the reply; a write
// failure ends the stream.
func (s *Server) answerStream(ctx context.Context, cancel context.CancelCauseFunc, c net.Conn, wmu *sync.Mutex, q []byte) {
	resp := s.Answer(ctx, q, true)
	if resp == nil {
		return
	}
	wmu.Lock()
	defer wmu.Unlock()
	c.SetWriteDeadline(time.Now().Add(streamIdle))
	if ctx.Err() != nil {
		return
	}
	if err := writeFrame(c, resp); err != nil {
		cancel(fmt.Errorf("write dns reply: %w", err))
	}
}

// readFrame reads one length-prefixed message (RFC 1035 §4.2.2). It
// returns io.EOF only when the stream ends between messages.
func readFrame(r io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(r, l[:]); err != nil {
		return nil, err
	}
	b := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(r, b); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return nil, err
	}
	return b, nil
}

// writeFrame writes msg with its length prefix in one Write.
func writeFrame(w io.Writer, msg []byte) error {
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}
