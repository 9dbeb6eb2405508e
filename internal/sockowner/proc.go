package sockowner

import (
	"bytes"
	"context"
	"encoding/binary"
	"fmt"
	"maps"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Bounds of what procCache remembers.
const (
	// cacheTTL is how long an inode's process is looked at first. One
	// socket is often looked up many times in a row (a UDP socket that is
	// not connected sends to many destinations, each a flow); a hit is
	// checked with one stat, so a stale entry costs only that.
	cacheTTL = 2 * time.Second
	// cacheMax bounds the inodes remembered; past it, expired ones go,
	// and if none had expired, all.
	cacheMax = 4096
	// recentMax is how many processes that owned the latest sockets are
	// scanned before the others: a program that opened one flow tends to
	// open the next.
	recentMax = 16
)

// procRoot is where the kernel's process files are.
const procRoot = "/proc"

// procCache finds the process holding a socket inode by its descriptors
// in /proc/PID/fd. It is safe for concurrent use; scans run without the
// lock.
type procCache struct {
	self int
	// sockDev is the device of sockfs, where every socket's inode is: a
	// descriptor is the socket when stat(2) through /proc/PID/fd/N gives
	// this device and the socket's inode. stat costs half a readlink of
	// the same file (4.4 µs and 9.9 µs here), which would also format
	// "socket:[INODE]".
	sockDev uint64

	mu      sync.Mutex // guards byInode and recent
	byInode map[uint32]cacheEntry
	recent  []int // distinct pids, the latest owner first

	bufs sync.Pool // *scanBuf
}

// cacheEntry is where an inode was last found: descriptor fd of pid.
type cacheEntry struct {
	pid, fd int
	at      time.Time
}

// scanBuf is one scan's room.
type scanBuf struct {
	dirents [8 << 10]byte
	ino     uint32 // the socket's inode, being looked for
	st      unix.Stat_t
	first   []int // processes of the socket's uid: scanned first
	rest    []int // and then the others
}

func newProcCache(sockDev uint64) procCache {
	return procCache{
		self:    os.Getpid(),
		sockDev: sockDev,
		byInode: make(map[uint32]cacheEntry),
		bufs:    sync.Pool{New: func() any { return new(scanBuf) }},
	}
}

// find returns a process holding the socket with inode ino and its
// executable. It checks the cached answer, then the recent owners, then
// the processes running as uid, the socket's owner, then the others, this
// one last (the daemon holds a descriptor per flow, and its own sockets
// never reach its TUN). It stops when ctx ends.
func (c *procCache) find(ctx context.Context, ino, uid uint32) (pid int, exe string, err error) {
	b := c.bufs.Get().(*scanBuf)
	defer c.bufs.Put(b)
	b.ino = ino

	c.mu.Lock()
	e, hit := c.byInode[ino]
	recent := slices.Clone(c.recent)
	c.mu.Unlock()

	if hit && time.Since(e.at) < cacheTTL && c.holds(b, e.pid, e.fd) {
		return c.found(ino, e.pid, e.fd)
	}
	for _, p := range recent {
		fd, ok, err := c.scanPID(ctx, b, p)
		if err != nil {
			return 0, "", err
		}
		if ok {
			return c.found(ino, p, fd)
		}
	}
	pid, fd, err := c.scanAll(ctx, b, recent, uid)
	if err != nil {
		return 0, "", err
	}
	return c.found(ino, pid, fd)
}

// found records that pid holds ino as descriptor fd and reads its
// executable.
func (c *procCache) found(ino uint32, pid, fd int) (int, string, error) {
	exe, err := os.Readlink(procRoot + "/" + strconv.Itoa(pid) + "/exe")
	if err != nil {
		return 0, "", fmt.Errorf("executable of pid %d: %w", pid, err)
	}
	exe = strings.TrimSuffix(exe, " (deleted)")

	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.byInode) >= cacheMax {
		now := time.Now()
		maps.DeleteFunc(c.byInode, func(_ uint32, e cacheEntry) bool { return now.Sub(e.at) >= cacheTTL })
		if len(c.byInode) >= cacheMax {
			clear(c.byInode)
		}
	}
	c.byInode[ino] = cacheEntry{pid: pid, fd: fd, at: time.Now()}
	if i := slices.Index(c.recent, pid); i >= 0 {
		c.recent = slices.Delete(c.recent, i, i+1)
	}
	c.recent = slices.Insert(c.recent, 0, pid)
	if len(c.recent) > recentMax {
		c.recent = c.recent[:recentMax]
	}
	return pid, exe, nil
}

// scanAll looks through every process but those in skip, which were
// scanned already, and this one, which goes last. It is an order, not a
// filter: every process is looked at before ErrNotFound.
//
// Processes whose /proc directory uid owns go first: stat(2) of /proc/PID
// (1.4 µs here) gives the euid of a process that is dumpable, and most
// flows come from a process running as the user that made the socket (a
// socket passed on, or made before a setuid, is found later). Within each
// group the newest processes (highest pids, /proc lists them ascending) go
// first: a process new to the scan is not among the recent owners, and the
// old ones, long-running daemons, hold the most descriptors.
func (c *procCache) scanAll(ctx context.Context, b *scanBuf, skip []int, uid uint32) (pid, fd int, err error) {
	dir, err := unix.Open(procRoot, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("open %s: %w", procRoot, err)
	}
	defer unix.Close(dir)
	b.first, b.rest = b.first[:0], b.rest[:0]
	for {
		n, err := unix.Getdents(dir, b.dirents[:])
		if err != nil {
			return 0, 0, fmt.Errorf("read %s: %w", procRoot, err)
		}
		if n == 0 {
			break
		}
		eachName(b.dirents[:n], func(name []byte) bool {
			p, ok := atoi(name)
			if !ok || p == c.self || slices.Contains(skip, p) {
				return true
			}
			if unix.Fstatat(dir, string(name), &b.st, 0) == nil && b.st.Uid == uid {
				b.first = append(b.first, p)
			} else {
				b.rest = append(b.rest, p)
			}
			return ctxErr(ctx) == nil
		})
		if err := ctxErr(ctx); err != nil {
			return 0, 0, err
		}
	}
	for _, list := range [][]int{b.first, b.rest, {c.self}} {
		for _, p := range slices.Backward(list) {
			fd, ok, err := c.scanPID(ctx, b, p)
			if err != nil {
				return 0, 0, err
			}
			if ok {
				return p, fd, nil
			}
		}
	}
	return 0, 0, errNoProc
}

// ctxEvery is how many descriptors scanPID stats between looks at its
// context: a process may hold thousands, and a stat costs microseconds.
const ctxEvery = 32

// scanPID reports the descriptor of pid that is the socket b.ino, or ctx's
// error once it ends. A process that is gone or hidden from us holds
// nothing.
func (c *procCache) scanPID(ctx context.Context, b *scanBuf, pid int) (fd int, ok bool, err error) {
	if err := ctxErr(ctx); err != nil {
		return 0, false, err
	}
	dir, err := unix.Open(procRoot+"/"+strconv.Itoa(pid)+"/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false, nil
	}
	defer unix.Close(dir)
	seen := 0
	for !ok {
		n, err := unix.Getdents(dir, b.dirents[:])
		if err != nil || n == 0 {
			return 0, false, nil
		}
		eachName(b.dirents[:n], func(name []byte) bool {
			d, isFD := atoi(name)
			if isFD && unix.Fstatat(dir, string(name), &b.st, 0) == nil && c.isSocket(b) {
				fd, ok = d, true
				return false
			}
			seen++
			return seen%ctxEvery != 0 || ctxErr(ctx) == nil
		})
		if err := ctxErr(ctx); err != nil && !ok {
			return 0, false, err
		}
	}
	return fd, true, nil
}

// holds reports whether descriptor fd of pid is still the socket b.ino.
func (c *procCache) holds(b *scanBuf, pid, fd int) bool {
	err := unix.Stat(procRoot+"/"+strconv.Itoa(pid)+"/fd/"+strconv.Itoa(fd), &b.st)
	return err == nil && c.isSocket(b)
}

// isSocket reports whether b.st, just filled, is the socket b.ino.
func (c *procCache) isSocket(b *scanBuf) bool {
	return b.st.Mode&unix.S_IFMT == unix.S_IFSOCK && b.st.Dev == c.sockDev && b.st.Ino == uint64(b.ino)
}

// eachName calls fn with the name of every linux_dirent64 in buf, until fn
// returns false. An entry is d_ino (8 bytes), d_off (8), d_reclen (2),
// d_type (1), then the name, ending in NUL.
func eachName(buf []byte, fn func(name []byte) bool) {
	for len(buf) >= 19 {
		reclen := int(binary.NativeEndian.Uint16(buf[16:]))
		if reclen < 19 || reclen > len(buf) {
			return
		}
		name := buf[19:reclen]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		if !fn(name) {
			return
		}
		buf = buf[reclen:]
	}
}

// atoi parses a pid or descriptor number; "." and ".." and the names of
// /proc's other files are not numbers.
func atoi(b []byte) (int, bool) {
	if len(b) == 0 || len(b) > 9 {
		return 0, false
	}
	n := 0
	for _, ch := range b {
		if ch < '0' || ch > '9' {
			return 0, false
		}
		n = n*10 + int(ch-'0')
	}
	return n, true
}

// ctxErr is ctx.Err, or DeadlineExceeded once ctx's deadline has passed
// even though its timer has not fired yet: on a loaded machine the timer
// runs late, and the scan's bound is the deadline, not the timer.
func ctxErr(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d, ok := ctx.Deadline(); ok && !time.Now().Before(d) {
		return context.DeadlineExceeded
	}
	return nil
}
