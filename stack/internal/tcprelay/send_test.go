package tcprelay

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// streamPair is a connected pair of stream sockets with small buffers, so a
// test can fill one; fds[0] is non-blocking.
func streamPair(t *testing.T) [2]int {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	t.Cleanup(func() { unix.Close(fds[0]); unix.Close(fds[1]) })
	for _, fd := range fds {
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 64<<10)
		_ = unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 64<<10)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		t.Fatalf("nonblock: %v", err)
	}
	return [2]int{fds[0], fds[1]}
}

// drain reads everything fd holds now.
func drain(t *testing.T, fd int) []byte {
	t.Helper()
	if err := unix.SetNonblock(fd, true); err != nil {
		t.Fatal(err)
	}
	defer unix.SetNonblock(fd, false)
	var out []byte
	buf := make([]byte, 64<<10)
	for {
		n, err := unix.Read(fd, buf)
		if n > 0 {
			out = append(out, buf[:n]...)
			continue
		}
		if err == unix.EAGAIN {
			return out
		}
		t.Fatalf("read: n=%d err=%v", n, err)
	}
}

// TestSocketSenderViews checks the writer gVisor's Read drives: short views
// are gathered and leave in one write, long ones are written at once, a full
// socket takes part of a view and reports how much, and what it did not take
// stays in order for the next round.
func TestSocketSenderViews(t *testing.T) {
	fds := streamPair(t)
	s := &socketSender{fd: fds[0]}
	rng := rand.NewChaCha8([32]byte{7})
	var sent []byte
	view := func(n int) []byte {
		b := make([]byte, n)
		rng.Read(b)
		return b
	}

	// Short views wait in the gather buffer.
	for range 3 {
		v := view(1000)
		if n, err := s.Write(v); n != len(v) || err != nil {
			t.Fatalf("short view: %d, %v", n, err)
		}
		sent = append(sent, v...)
	}
	if s.gather == nil || len(*s.gather) != 3000 {
		t.Fatalf("short views not gathered")
	}
	// A long one flushes them first, then goes out itself.
	v := view(directWriteMin)
	if n, err := s.Write(v); n != len(v) || err != nil {
		t.Fatalf("long view: %d, %v", n, err)
	}
	sent = append(sent, v...)
	if s.gather != nil {
		t.Fatalf("gathered bytes left behind a long view")
	}
	if got := drain(t, fds[1]); !bytes.Equal(got, sent) {
		t.Fatalf("socket got %d bytes, want %d in order", len(got), len(sent))
	}
	sent = sent[:0]

	// Fill the socket: a long view is taken in part, then not at all.
	var taken int
	for i := 0; ; i++ {
		v := view(48 << 10)
		n, err := s.Write(v)
		sent = append(sent, v[:n]...)
		taken += n
		if err != nil {
			if !errors.Is(err, errSocketFull) || !s.full {
				t.Fatalf("full socket: %v (full=%v)", err, s.full)
			}
			break
		}
		if i > 1000 {
			t.Fatalf("socket never filled")
		}
	}
	s.full = false
	if n, err := s.Write(view(directWriteMin)); n != 0 || !errors.Is(err, errSocketFull) {
		t.Fatalf("write to a full socket: %d, %v", n, err)
	}
	// A short view is still taken (gathered); flush cannot send it yet.
	s.full = false
	v = view(100)
	if n, err := s.Write(v); n != len(v) || err != nil {
		t.Fatalf("short view to a full socket: %d, %v", n, err)
	}
	if s.flush() {
		t.Fatalf("flush into a full socket reported done")
	}
	// Once the reader makes room, the gathered bytes follow the rest.
	got := drain(t, fds[1])
	s.full = false
	if !s.flush() {
		t.Fatalf("flush after the reader made room: full=%v err=%v", s.full, s.err)
	}
	sent = append(sent, v...)
	got = append(got, drain(t, fds[1])...)
	if !bytes.Equal(got, sent) {
		t.Fatalf("socket got %d bytes, want %d in order", len(got), len(sent))
	}

	// A socket whose peer has gone fails the write with its errno.
	unix.Close(fds[1])
	s.full = false
	if _, err := s.Write(view(directWriteMin)); !errors.Is(err, syscall.EPIPE) {
		t.Fatalf("write to a closed peer: %v, want EPIPE", err)
	}
}
