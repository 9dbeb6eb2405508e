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
	// checked with one readlink, so a stale entry costs only that.
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

// scanBuf is one scan's room for directory entries and link targets.
type scanBuf struct {
	dirents [8 << 10]byte
	link    [64]byte // "socket:[4294967295]" fits with room to spare
	target  []byte   // socket:[INODE] being looked for
	pids    []int    // a batch of /proc's numeric entries
}

func newProcCache() procCache {
	return procCache{
		self:    os.Getpid(),
		byInode: make(map[uint32]cacheEntry),
		bufs:    sync.Pool{New: func() any { return new(scanBuf) }},
	}
}

// find returns a process holding the socket with inode ino and its
// executable. It checks the cached answer, then the recent owners, then
// every process in /proc order, this one last (the daemon holds a
// descriptor per flow, and its own sockets never reach its TUN). It stops
// when ctx ends.
func (c *procCache) find(ctx context.Context, ino uint32) (pid int, exe string, err error) {
	b := c.bufs.Get().(*scanBuf)
	defer c.bufs.Put(b)
	b.target = append(strconv.AppendUint(append(b.target[:0], "socket:["...), uint64(ino), 10), ']')

	c.mu.Lock()
	e, hit := c.byInode[ino]
	recent := slices.Clone(c.recent)
	c.mu.Unlock()

	if hit && time.Since(e.at) < cacheTTL && c.holds(b, e.pid, e.fd) {
		return c.found(ino, e.pid, e.fd)
	}
	for _, p := range recent {
		if fd, ok := c.scanPID(b, p); ok {
			return c.found(ino, p, fd)
		}
	}
	if err := ctx.Err(); err != nil {
		return 0, "", err
	}
	pid, fd, err := c.scanAll(ctx, b, recent)
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
// scanned already, and this one, which goes last.
func (c *procCache) scanAll(ctx context.Context, b *scanBuf, skip []int) (pid, fd int, err error) {
	dir, err := unix.Open(procRoot, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, fmt.Errorf("open %s: %w", procRoot, err)
	}
	defer unix.Close(dir)
	for {
		// A batch of pids at a time: b.dirents is reused by scanPID.
		b.pids = b.pids[:0]
		n, err := unix.Getdents(dir, b.dirents[:])
		if err != nil {
			return 0, 0, fmt.Errorf("read %s: %w", procRoot, err)
		}
		if n == 0 {
			break
		}
		eachName(b.dirents[:n], func(name []byte) {
			if p, ok := atoi(name); ok && p != c.self && !slices.Contains(skip, p) {
				b.pids = append(b.pids, p)
			}
		})
		for _, p := range b.pids {
			if err := ctx.Err(); err != nil {
				return 0, 0, err
			}
			if fd, ok := c.scanPID(b, p); ok {
				return p, fd, nil
			}
		}
	}
	if fd, ok := c.scanPID(b, c.self); ok {
		return c.self, fd, nil
	}
	return 0, 0, errNoProc
}

// scanPID reports the descriptor of pid whose link is b.target. A process
// that is gone or hidden from us holds nothing.
func (c *procCache) scanPID(b *scanBuf, pid int) (fd int, ok bool) {
	dir, err := unix.Open(procRoot+"/"+strconv.Itoa(pid)+"/fd", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, false
	}
	defer unix.Close(dir)
	for !ok {
		n, err := unix.Getdents(dir, b.dirents[:])
		if err != nil || n == 0 {
			return 0, false
		}
		eachName(b.dirents[:n], func(name []byte) {
			if ok {
				return
			}
			d, isFD := atoi(name)
			if !isFD {
				return
			}
			m, err := unix.Readlinkat(dir, string(name), b.link[:])
			if err == nil && bytes.Equal(b.link[:m], b.target) {
				fd, ok = d, true
			}
		})
	}
	return fd, ok
}

// holds reports whether descriptor fd of pid is still b.target.
func (c *procCache) holds(b *scanBuf, pid, fd int) bool {
	n, err := unix.Readlink(procRoot+"/"+strconv.Itoa(pid)+"/fd/"+strconv.Itoa(fd), b.link[:])
	return err == nil && bytes.Equal(b.link[:n], b.target)
}

// eachName calls fn with the name of every linux_dirent64 in buf: d_ino
// (8 bytes), d_off (8), d_reclen (2), d_type (1), then the name, ending in
// NUL.
func eachName(buf []byte, fn func(name []byte)) {
	for len(buf) >= 19 {
		reclen := int(binary.NativeEndian.Uint16(buf[16:]))
		if reclen < 19 || reclen > len(buf) {
			return
		}
		name := buf[19:reclen]
		if i := bytes.IndexByte(name, 0); i >= 0 {
			name = name[:i]
		}
		fn(name)
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
