// Package sockowner finds the local process behind a flow: given the flow's
// protocol and its two ends as the TUN saw them, the user that owns the
// socket and the process and executable that hold it. In host-wide mode a
// flow's client address:port is the local socket of the process that
// opened it, so routing rules can match by uid and executable.
//
// The socket comes from the kernel by netlink sock_diag, with the exact
// (non-dump) lookup the kernel itself does on receive, so it costs the same
// however many sockets the host has, and a UDP socket that never connected
// is found by its local address and port alone. That gives the uid and the
// socket's inode. The process is found by scanning /proc/*/fd for a
// descriptor that is that inode, which costs O(processes × descriptors),
// bounded by the caller's context; Finder caches
// what it found briefly and looks first in the processes that owned the
// last sockets, and UID skips the scan altogether. See docs/sockowner.md.
//
// Lookups run in the network namespace Finder was created in; the package
// never switches namespaces.
package sockowner

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// ErrNotFound says no live socket matches the flow (it closed before the
// lookup, belongs to another network namespace, or the flow did not start
// on this host), or, from Lookup, that no process this one can see holds
// the socket. Lookup and UID never guess an owner instead.
var ErrNotFound = errors.New("socket owner not found")

// ErrNoProcess is in every error Lookup returns once it has found the
// socket but not its process (none this one can see holds it, or the scan
// ran out of time): the Owner it returns then has a valid UID.
var ErrNoProcess = errors.New("socket found, its process not")

var (
	errNoSocket = fmt.Errorf("no socket: %w", ErrNotFound)
	errNoProc   = fmt.Errorf("no process holds the socket: %w", ErrNotFound)
	errTimeout  = errors.New("timed out")
	errShort    = errors.New("short message")
)

// Owner is who opened a flow's socket.
type Owner struct {
	// UID is the socket's owner as the kernel records it: the fsuid of the
	// process that created the socket, at the time it did.
	UID uint32
	// PID is a process holding the socket, the first one found when several
	// share it (across fork, or passed over a unix socket); 0 from UID.
	PID int
	// Exe is PID's executable as /proc/PID/exe names it, without the
	// " (deleted)" the kernel adds once the file was replaced; "" from UID.
	Exe string
}

// Finder looks up owners of sockets in the network namespace it was
// created in. It is safe for concurrent use. Lookups share one netlink
// socket, one at a time, since a request and its answer share the socket's
// queue: at about 5 µs a round trip that is 200,000 lookups a second, and
// opening a socket per lookup instead costs three times as much
// (docs/sockowner.md). The /proc scans run in parallel.
type Finder struct {
	mu   sync.Mutex // guards conn and closed
	conn *diagConn
	// closed is set by Close; conn is nil then.
	closed bool

	procs procCache
}

// New opens the netlink socket in the calling thread's network namespace.
// Close releases it.
func New() (*Finder, error) {
	c, err := newDiagConn()
	if err != nil {
		return nil, err
	}
	// Any socket tells sockfs's device, which every socket's inode is on.
	var st unix.Stat_t
	if err := unix.Fstat(c.fd, &st); err != nil {
		c.close()
		return nil, fmt.Errorf("stat sock_diag socket: %w", err)
	}
	return &Finder{conn: c, procs: newProcCache(st.Dev)}, nil
}

// Close closes the netlink socket. Lookups after Close return
// os.ErrClosed. It is safe to call more than once.
func (f *Finder) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return nil
	}
	f.closed = true
	err := f.conn.close()
	f.conn = nil
	return err
}

// UID returns the owner of the socket of a flow with the socket's uid only
// (PID 0, Exe ""), without the /proc scan. proto is "tcp" or "udp"; local is
// the flow's client end (the process's socket), remote its destination.
// IPv4-mapped IPv6 addresses count as IPv4. It returns an error wrapping
// ErrNotFound when no live socket matches.
func (f *Finder) UID(ctx context.Context, proto string, local, remote netip.AddrPort) (Owner, error) {
	s, err := f.socket(ctx, proto, local, remote)
	if err != nil {
		return Owner{}, err
	}
	return Owner{UID: s.uid}, nil
}

// Lookup is UID, and then the process holding the socket and its
// executable. The /proc scan stops when ctx ends: give it a deadline of a
// few milliseconds. When the socket is found but its process is not (it
// ended, the scan ran out of time, or /proc hides it), Lookup returns the
// Owner with UID set and an error.
func (f *Finder) Lookup(ctx context.Context, proto string, local, remote netip.AddrPort) (Owner, error) {
	s, err := f.socket(ctx, proto, local, remote)
	if err != nil {
		return Owner{}, err
	}
	o := Owner{UID: s.uid}
	o.PID, o.Exe, err = f.procs.find(ctx, s.inode, s.uid)
	if err != nil {
		return o, fmt.Errorf("process of %s socket %s (inode %d): %w: %w", proto, local, s.inode, ErrNoProcess, err)
	}
	return o, nil
}

// socket asks the kernel for the flow's socket and checks that what it
// found is the flow's.
func (f *Finder) socket(ctx context.Context, proto string, local, remote netip.AddrPort) (diagSocket, error) {
	var p uint8
	switch proto {
	case "tcp":
		p = unix.IPPROTO_TCP
	case "udp":
		p = unix.IPPROTO_UDP
	default:
		return diagSocket{}, fmt.Errorf("socket owner: protocol %q: want tcp or udp", proto)
	}
	// The kernel reports no zone; the lookup asks for no interface.
	local = netip.AddrPortFrom(local.Addr().Unmap().WithZone(""), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap().WithZone(""), remote.Port())
	if !local.IsValid() || !remote.IsValid() || local.Addr().Is4() != remote.Addr().Is4() {
		return diagSocket{}, fmt.Errorf("socket owner of %s %s -> %s: want two addresses of one family", proto, local, remote)
	}
	if err := ctx.Err(); err != nil {
		return diagSocket{}, fmt.Errorf("socket owner of %s %s -> %s: %w", proto, local, remote, err)
	}
	deadline := time.Now().Add(netlinkWait)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}

	s, err := f.query(p, local, remote, deadline)
	if err != nil {
		return diagSocket{}, fmt.Errorf("socket owner of %s %s -> %s: %w", proto, local, remote, err)
	}
	if !matches(p, s, local, remote) || s.inode == 0 {
		// The kernel's lookup falls back to a listener (TCP) or hands back
		// a TIME_WAIT socket, which no process holds (inode 0): neither is
		// the flow's socket.
		return diagSocket{}, fmt.Errorf("socket owner of %s %s -> %s: kernel found %s -> %s inode %d: %w",
			proto, local, remote, s.local, s.remote, s.inode, errNoSocket)
	}
	return s, nil
}

// query asks the kernel, one request at a time.
func (f *Finder) query(proto uint8, local, remote netip.AddrPort, deadline time.Time) (diagSocket, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closed {
		return diagSocket{}, os.ErrClosed
	}
	return f.conn.query(proto, local, remote, deadline)
}

// matches reports whether the socket s the kernel found can have sent the
// flow local -> remote. A TCP socket must be that connection; a UDP socket
// must be bound to local's port and address or the wildcard, and be
// connected to remote or to nothing.
func matches(proto uint8, s diagSocket, local, remote netip.AddrPort) bool {
	if proto == unix.IPPROTO_TCP {
		return s.local == local && s.remote == remote
	}
	return s.local.Port() == local.Port() &&
		(s.local.Addr() == local.Addr() || s.local.Addr().IsUnspecified()) &&
		(s.remote.Port() == remote.Port() || s.remote.Port() == 0) &&
		(s.remote.Addr() == remote.Addr() || s.remote.Addr().IsUnspecified())
}
