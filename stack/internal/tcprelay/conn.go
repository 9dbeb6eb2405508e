package tcprelay

import (
	"bytes"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/stack/internal/gverr"
)

// Conn is the client's side of a TCP flow: a net.Conn over a gVisor
// endpoint. Unlike gonet.TCPConn it keeps the cause of an error (reset,
// refused, timeout) as a Go error and can abort the connection, which the
// relay needs to carry a reset to the client.
type Conn struct {
	ep     tcpip.Endpoint
	wq     *waiter.Queue
	local  netip.AddrPort // what the client dialed
	remote netip.AddrPort // the client

	readMu sync.Mutex // serialises readers, as for a kernel socket
	rd     deadline
	wd     deadline

	closeOnce sync.Once
}

var _ net.Conn = (*Conn)(nil)

func NewConn(ep tcpip.Endpoint, wq *waiter.Queue, local, remote netip.AddrPort) *Conn {
	return &Conn{ep: ep, wq: wq, local: local, remote: remote}
}

func (c *Conn) Read(b []byte) (int, error) {
	c.readMu.Lock()
	defer c.readMu.Unlock()
	if len(b) == 0 {
		return 0, nil
	}
	w := tcpip.SliceWriter(b)
	res, err := c.ep.Read(&w, tcpip.ReadOptions{})
	if _, ok := err.(*tcpip.ErrWouldBlock); ok {
		entry, ready := waiter.NewChannelEntry(waiter.ReadableEvents)
		c.wq.EventRegister(&entry)
		defer c.wq.EventUnregister(&entry)
		for {
			res, err = c.ep.Read(&w, tcpip.ReadOptions{})
			if _, ok := err.(*tcpip.ErrWouldBlock); !ok {
				break
			}
			select {
			case <-ready:
			case <-c.rd.expired():
				return 0, c.opError("read", os.ErrDeadlineExceeded)
			}
		}
	}
	switch err.(type) {
	case nil:
		c.ep.ModerateRecvBuf(res.Count)
		return res.Count, nil
	case *tcpip.ErrClosedForReceive:
		return 0, io.EOF
	}
	return 0, c.opError("read", gverr.Error("read", err))
}

// waitReadable blocks until a Read would not block (data, EOF or an error)
// or the read deadline passes, without holding a buffer.
func (c *Conn) waitReadable() error {
	const mask = waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr
	if c.ep.Readiness(mask) != 0 {
		return nil
	}
	entry, ready := waiter.NewChannelEntry(mask)
	c.wq.EventRegister(&entry)
	defer c.wq.EventUnregister(&entry)
	for c.ep.Readiness(mask) == 0 {
		select {
		case <-ready:
		case <-c.rd.expired():
			return c.opError("read", os.ErrDeadlineExceeded)
		}
	}
	return nil
}

func (c *Conn) Write(b []byte) (int, error) {
	var (
		r       bytes.Reader
		written int
		ready   <-chan struct{}
	)
	for written < len(b) {
		r.Reset(b[written:])
		n, err := c.ep.Write(&r, tcpip.WriteOptions{})
		written += int(n)
		switch err.(type) {
		case nil:
			continue
		case *tcpip.ErrWouldBlock:
		default:
			return written, c.opError("write", gverr.Error("write", err))
		}
		if ready == nil {
			// Register, then retry once before sleeping: the window may have
			// opened between the failed write and the registration.
			var entry waiter.Entry
			entry, ready = waiter.NewChannelEntry(waiter.WritableEvents)
			c.wq.EventRegister(&entry)
			defer c.wq.EventUnregister(&entry)
			continue
		}
		select {
		case <-ready:
		case <-c.wd.expired():
			return written, c.opError("write", os.ErrDeadlineExceeded)
		}
	}
	return written, nil
}

// CloseWrite sends a FIN to the client and keeps the receive side open.
func (c *Conn) CloseWrite() error {
	if err := c.ep.Shutdown(tcpip.ShutdownWrite); err != nil {
		return c.opError("close", gverr.Error("shutdown", err))
	}
	return nil
}

// CloseRead stops reading from the client.
func (c *Conn) CloseRead() error {
	if err := c.ep.Shutdown(tcpip.ShutdownRead); err != nil {
		return c.opError("close", gverr.Error("shutdown", err))
	}
	return nil
}

// SetKeepAlive makes the endpoint probe a silent client, so that a flow
// whose client vanished ends.
func (c *Conn) SetKeepAlive() { c.ep.SocketOptions().SetKeepAlive(true) }

// Abort sends a RST to the client and releases the endpoint. It and Close
// release the endpoint once between them.
func (c *Conn) Abort() {
	c.closeOnce.Do(func() {
		c.ep.Abort()
		c.rd.stop()
		c.wd.stop()
	})
}

func (c *Conn) Close() error {
	c.closeOnce.Do(func() {
		c.ep.Close()
		c.rd.stop()
		c.wd.stop()
	})
	return nil
}

func (c *Conn) LocalAddr() net.Addr  { return net.TCPAddrFromAddrPort(c.local) }
func (c *Conn) RemoteAddr() net.Addr { return net.TCPAddrFromAddrPort(c.remote) }

func (c *Conn) SetDeadline(t time.Time) error {
	c.rd.set(t)
	c.wd.set(t)
	return nil
}
func (c *Conn) SetReadDeadline(t time.Time) error  { c.rd.set(t); return nil }
func (c *Conn) SetWriteDeadline(t time.Time) error { c.wd.set(t); return nil }

func (c *Conn) opError(op string, err error) error {
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}

// deadline is a channel that closes when a settable point in time passes.
// The channel is made when someone first waits on it: most flows never
// set a deadline, and each idle one would hold two channels for nothing.
type deadline struct {
	mu    sync.Mutex
	timer *time.Timer
	ch    chan struct{} // nil until expired is called or the deadline passes
	gen   uint64        // which set call a timer belongs to
}

func (d *deadline) expired() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

func (d *deadline) set(t time.Time) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if d.ch != nil {
		select {
		case <-d.ch:
			d.ch = nil // passed before: start afresh
		default:
		}
	}
	if t.IsZero() {
		return
	}
	wait := time.Until(t)
	if wait <= 0 {
		d.fire()
		return
	}
	gen := d.gen
	d.timer = time.AfterFunc(wait, func() {
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.gen == gen { // not replaced by a later set
			d.fire()
		}
	})
}

// fire closes the channel; d.mu is held.
func (d *deadline) fire() {
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	select {
	case <-d.ch:
	default:
		close(d.ch)
	}
}

func (d *deadline) stop() {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.gen++
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
}
