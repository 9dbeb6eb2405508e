package tundev

import (
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
)

var _ device.Device = (*Device)(nil)

// queue is one open descriptor of the device.
type queue struct {
	file *os.File        // non-blocking, so the runtime poller owns it
	raw  syscall.RawConn // of file, for reading a batch without parking

	rb         readBatch
	readQueued func(fd uintptr) bool // q.readQueuedFD, made once
	// rest holds the datagrams of a USO packet that did not fit the
	// buffers of the read that took it; the next read hands them out
	// first.
	rest usoRest
}

// newQueue wraps one non-blocking fd; on error it is closed.
func newQueue(fd int, name string) (*queue, error) {
	q := &queue{file: os.NewFile(uintptr(fd), name)}
	q.readQueued = q.readQueuedFD
	var err error
	if q.raw, err = q.file.SyscallConn(); err != nil {
		q.file.Close()
		return nil, err
	}
	return q, nil
}

// readBatch is the read in progress, kept in the queue so that the callback
// given to RawConn.Read is made once and reading allocates nothing. A
// queue's read is not called concurrently with itself.
type readBatch struct {
	d      *Device
	bufs   [][]byte
	sizes  []int
	metas  []device.Meta
	offset int
	count  int  // packets handed out so far
	full   bool // a USO packet filled the remaining buffers
}

// frame is where the next frame is read to: the vnet header, if any, goes
// in the room in front of the packet.
func (b *readBatch) frame() []byte {
	return b.bufs[b.count][b.offset-b.d.hdrLen():]
}

// Queues is the number of queues: Config.Queues, or 1.
func (d *Device) Queues() int { return len(d.queues) }

// Read reads a batch of packets from queue q, as device.Device says: it
// blocks until one arrives, then takes what else is already queued, up to
// len(bufs), without waiting again. With a vnet header, a packet whose
// checksum the kernel left partial comes back completed, a TCP segment of
// up to 64 KiB comes back whole with its segment size in the metadata, and
// a run of UDP datagrams sent with UDP_SEGMENT comes back as datagrams.
// Without one, buffers need room for MTU bytes at least: the kernel
// silently truncates a longer packet to the buffer (tun_put_user).
//
// After Close it returns an error matching os.ErrClosed. Any other error
// ends the device (a TUN fd whose interface was deleted fails with EBADFD)
// and is reported once more as an EventDown.
func (d *Device) Read(q int, bufs [][]byte, sizes []int, metas []device.Meta, offset int) (int, error) {
	if q < 0 || q >= len(d.queues) {
		return 0, fmt.Errorf("read tun %s: queue %d of %d", d.name, q, len(d.queues))
	}
	n, err := d.queues[q].read(d, bufs, sizes, metas, offset)
	if err != nil && !errors.Is(err, os.ErrClosed) {
		d.down(err)
	}
	return n, err
}

func (q *queue) read(d *Device, bufs [][]byte, sizes []int, metas []device.Meta, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	if offset < device.ReadOffset || len(sizes) < len(bufs) || len(metas) < len(bufs) {
		return 0, fmt.Errorf("read tun %s: offset %d (want at least %d) or sizes and metas shorter than bufs", d.name, offset, device.ReadOffset)
	}
	for _, b := range bufs {
		if len(b) <= offset {
			return 0, fmt.Errorf("read tun %s: %w", d.name, io.ErrShortBuffer)
		}
	}
	b := &q.rb
	*b = readBatch{d: d, bufs: bufs, sizes: sizes, metas: metas, offset: offset}
	defer func() { *b = readBatch{} }()
	if q.rest.pending() {
		q.rest.emit(b)
	} else {
		n, err := q.file.Read(b.frame())
		if err != nil {
			return 0, d.ioError(err)
		}
		q.take(b, n)
	}
	// The rest without parking: the poller would only wake us for what
	// is already there. EAGAIN ends the batch. An error (closed under us)
	// is left for the next Read to report.
	if !b.full && b.count < len(bufs) {
		_ = q.raw.Read(q.readQueued)
	}
	return b.count, nil
}

func (q *queue) readQueuedFD(fd uintptr) bool {
	b := &q.rb
	for !b.full && b.count < len(b.bufs) {
		n, err := unix.Read(int(fd), b.frame())
		if err != nil || n <= 0 {
			break
		}
		q.take(b, n)
	}
	return true
}

// take makes the n-byte frame just read to b.frame() into packets.
func (q *queue) take(b *readBatch, n int) {
	d := b.d
	if !d.vnet {
		b.sizes[b.count] = n
		b.metas[b.count] = device.Meta{}
		b.count++
		return
	}
	f := b.frame()[:n]
	h, ok := decodeVnetHdr(f)
	if !ok {
		d.droppedFrames.Add(1)
		return
	}
	pkt := f[VnetHdrLen:]
	meta, ok := h.inbound(pkt)
	if !ok {
		d.droppedFrames.Add(1)
		return
	}
	if meta.GSO == device.GSOUDP {
		if !q.splitUSO(b, pkt, int(h.gsoSize)) {
			d.droppedFrames.Add(1)
		}
		return
	}
	b.sizes[b.count] = len(pkt)
	b.metas[b.count] = meta
	b.count++
}

// Write writes packets as device.Device says, each with one writev(2), a
// vnet header first when the device has one. A multi-queue device writes
// each packet to the queue of its flow (flowQueue). It stops at the first
// packet the kernel refuses (EINVAL for one that is not IPv4 or IPv6, or
// whose vnet header does not fit it) and returns its error.
func (d *Device) Write(pkts [][][]byte, metas []device.Meta) (int, error) {
	if len(metas) < len(pkts) {
		return 0, fmt.Errorf("write tun %s: %d metas for %d packets", d.name, len(metas), len(pkts))
	}
	w := writers.Get().(*writer)
	defer writers.Put(w)
	for i, pieces := range pkts {
		q := d.queues[0]
		if len(d.queues) > 1 {
			q = d.queues[flowQueue(pieces, len(d.queues))]
		}
		if err := w.write(d, q, pieces, metas[i]); err != nil {
			return i, err
		}
	}
	return len(pkts), nil
}

// writer is what one Write works in: the iovecs of a packet and its vnet
// header, which must not live on the stack since the kernel reads them
// through pointers.
type writer struct {
	hdr  [VnetHdrLen]byte
	iovs []unix.Iovec
	err  error
	fn   func(fd uintptr) bool // w.writeFD, made once
}

var writers = sync.Pool{New: func() any {
	w := &writer{iovs: make([]unix.Iovec, 0, 8)}
	w.fn = w.writeFD
	return w
}}

func (w *writer) write(d *Device, q *queue, pieces [][]byte, m device.Meta) error {
	w.iovs = w.iovs[:0]
	if d.vnet {
		encodeVnetHdr(w.hdr[:], m)
		w.iovs = appendIovec(w.iovs, w.hdr[:])
	} else if m.GSO != device.GSONone || m.NeedsCsum {
		return fmt.Errorf("write tun %s: a segment or partial checksum for a device without offloads", d.name)
	}
	for _, p := range pieces {
		w.iovs = appendIovec(w.iovs, p)
	}
	defer clear(w.iovs) // the pool must not keep packets alive
	w.err = nil
	// A TUN takes a packet whole or not at all. It does not answer EAGAIN
	// to a write; if it ever did, the poller would wait.
	if rerr := q.raw.Write(w.fn); rerr != nil {
		// The descriptor is closing: the same as a write on it.
		return fmt.Errorf("write %s: %w", q.file.Name(), os.ErrClosed)
	}
	if w.err != nil {
		return d.ioError(&os.PathError{Op: "write", Path: q.file.Name(), Err: w.err})
	}
	return nil
}

func (w *writer) writeFD(fd uintptr) bool {
	var iov unsafe.Pointer
	if len(w.iovs) > 0 {
		iov = unsafe.Pointer(&w.iovs[0])
	}
	_, _, errno := unix.Syscall(unix.SYS_WRITEV, fd, uintptr(iov), uintptr(len(w.iovs)))
	if errno != 0 {
		w.err = errno
	}
	return errno != unix.EAGAIN
}

func appendIovec(iovs []unix.Iovec, b []byte) []unix.Iovec {
	if len(b) == 0 {
		return iovs
	}
	v := unix.Iovec{Base: &b[0]}
	v.SetLen(len(b))
	return append(iovs, v)
}

// ioError explains the errors a TUN fd gives that its name alone does not.
// The *os.PathError from the file already names the operation and the
// interface ("read tun netstack0: file already closed").
func (d *Device) ioError(err error) error {
	if errors.Is(err, unix.EBADFD) {
		return fmt.Errorf("%w (the interface was deleted)", err)
	}
	return err
}

// BatchSize is the most packets one Read call returns: what a burst of
// MTU-sized datagrams fills before the reader comes back.
func (d *Device) BatchSize() int { return readBatchSize }

// readBatchSize is the number of packets one Read takes at most. With 64 KiB
// buffers for TSO, 16 of them cost 1 MiB per reader.
const readBatchSize = 16

// hdrLen is the length of the vnet header in front of every frame.
func (d *Device) hdrLen() int {
	if d.vnet {
		return VnetHdrLen
	}
	return 0
}

// Capabilities is what Write may be given: TCP segments of up to 64 KiB
// and, on kernels with USO, runs of UDP datagrams, both with partial
// checksums, when the kernel agreed to them.
func (d *Device) Capabilities() device.Capabilities {
	return device.Capabilities{
		TSO: d.vnet && d.offloads&OffloadTSO != 0,
		USO: d.vnet && d.offloads&OffloadUSO != 0,
	}
}

// Events delivers EventDown when the interface is deleted or reading the
// device fails for a reason other than Close, and, for a device Create
// made, EventMTU when the interface's MTU changes. It is closed after
// EventDown or Close.
func (d *Device) Events() <-chan device.Event { return d.events }

// down reports that the device can carry no more packets, once.
func (d *Device) down(err error) {
	d.emit(device.Event{Kind: device.EventDown, Err: fmt.Errorf("tun %s: %w", d.name, err)})
}

// emit sends ev unless the channel is full or closed; EventDown closes it.
func (d *Device) emit(ev device.Event) {
	d.evMu.Lock()
	defer d.evMu.Unlock()
	if d.evClosed {
		return
	}
	select {
	case d.events <- ev:
	default:
	}
	if ev.Kind == device.EventDown {
		d.evClosed = true
		close(d.events)
	}
}

// closeEvents closes the event channel at Close.
func (d *Device) closeEvents() {
	d.evMu.Lock()
	defer d.evMu.Unlock()
	if !d.evClosed {
		d.evClosed = true
		close(d.events)
	}
}
