package tcprelay

import (
	"errors"
	"io"
	"net"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"

	"github.com/netstackd/netstackd/stack/internal/gverr"
)

// What the client sends goes to an upstream socket without passing through
// a buffer of ours when it arrived in long segments: gVisor's Read hands
// each segment's bytes to an io.Writer, and socketSender writes the long
// ones to the socket right there, in a non-blocking write, while gVisor
// still holds them. A write the socket takes only in part is reported as
// such, and gVisor keeps the rest for the next Read. Short views (a client
// sending small packets, or a device without offloads) are gathered in a
// pooled buffer first, so that a run of them costs one write, not one each.
//
// The writes happen inside the socket's RawConn.Write callback, which keeps
// the descriptor from being closed and reused meanwhile, and inside gVisor's
// Read, which keeps the segments from being freed (a Close or Abort of the
// endpoint waits for Read to return).

// directWriteMin is the shortest view written to the socket straight from
// gVisor: below it, the system call costs more than the copy it saves.
const directWriteMin = 8 << 10

// errSocketFull stops gVisor's Read when the socket takes no more for now.
var errSocketFull = errors.New("upstream socket full")

// socketSender is the client-to-upstream direction's writer, for an
// upstream that is a socket. Its gather buffer is borrowed only while
// bytes wait in it.
type socketSender struct {
	rc     syscall.RawConn
	fd     int     // valid inside rc.Write's callback only
	gather *[]byte // from relayBufs; nil when empty
	full   bool    // the socket said EAGAIN: wait until it is writable
	err    error   // the socket's write failed
}

// Write is called by gVisor's Read with a view of a segment.
func (s *socketSender) Write(b []byte) (int, error) {
	if len(b) < directWriteMin {
		if s.gather != nil && len(*s.gather)+len(b) > cap(*s.gather) {
			if !s.flush() {
				return 0, s.stopErr()
			}
		}
		if s.gather == nil {
			s.gather = relayBufs.Get().(*[]byte)
			*s.gather = (*s.gather)[:0]
		}
		*s.gather = append(*s.gather, b...)
		return len(b), nil
	}
	if !s.flush() {
		return 0, s.stopErr()
	}
	n, err := s.write(b)
	if n < len(b) {
		if err == nil {
			s.full = true
		}
		return n, s.stopErr()
	}
	return n, nil
}

func (s *socketSender) stopErr() error {
	if s.err != nil {
		return s.err
	}
	return errSocketFull
}

// write writes b once to the socket; a short count with a nil error means
// the socket is full.
func (s *socketSender) write(b []byte) (int, error) {
	for {
		n, err := unix.Write(s.fd, b)
		switch err {
		case nil:
			return n, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			s.full = true
			return 0, nil
		}
		s.err = os.NewSyscallError("write", err)
		return 0, s.err
	}
}

// flush writes the gathered bytes, and reports whether they have all gone.
func (s *socketSender) flush() bool {
	for s.gather != nil {
		g := *s.gather
		n, err := s.write(g)
		if n == len(g) {
			s.release()
			return true
		}
		if n > 0 {
			// Keep the rest at the front: it is what goes first.
			*s.gather = g[:copy(g, g[n:])]
		}
		if err != nil || s.full {
			return false
		}
	}
	return true
}

// release returns the gather buffer, emptied or given up.
func (s *socketSender) release() {
	if s.gather != nil {
		*s.gather = (*s.gather)[:cap(*s.gather)] // others read into its length
		relayBufs.Put(s.gather)
		s.gather = nil
	}
}

// sendReadable moves everything the client has sent so far to the socket,
// waiting for the socket to take it. It returns the bytes moved and, apart
// from nil when the client has nothing more for now, the client side's end
// (io.EOF for a FIN, or its error) in rerr, or the socket's in werr.
func (p *clientPipe) sendReadable() (n int64, rerr, werr error) {
	s, ep := p.sender, p.fl.client.ep
	err := s.rc.Write(func(fd uintptr) bool {
		s.fd, s.full = int(fd), false
		if !s.flush() {
			return s.err != nil // full: wait for the socket, then go on
		}
		for {
			res, terr := ep.Read(s, tcpip.ReadOptions{})
			n += int64(res.Count)
			if res.Count > 0 {
				ep.ModerateRecvBuf(res.Count)
			}
			if s.err != nil {
				return true
			}
			if s.full {
				return false
			}
			switch terr.(type) {
			case nil:
				continue
			case *tcpip.ErrWouldBlock:
			case *tcpip.ErrClosedForReceive:
				rerr = io.EOF
			default:
				rerr = p.fl.client.opError("read", gverr.Error("read", terr))
			}
			// What is gathered goes before we report the client's end,
			// which may be passed on as a FIN.
			if !s.flush() {
				if s.err != nil {
					return true
				}
				rerr = nil // read it again once the socket has taken these
				return false
			}
			return true
		}
	})
	if err == nil {
		err = s.err
	}
	if err != nil {
		s.release() // a gathered rest that will never go
		return n, nil, &net.OpError{Op: "write", Net: "tcp", Addr: p.fl.upstream.RemoteAddr(), Err: err}
	}
	return n, rerr, nil
}
