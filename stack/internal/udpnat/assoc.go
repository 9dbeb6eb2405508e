package udpnat

// An association's life: the datagrams it sends, the upstream side it
// opens, and the replies it carries back.

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack/internal/packet"
)

// send carries one datagram from the client towards dst; with batched, it
// may wait in the send queue until the next flush.
func (a *udpAssoc) send(dst netip.AddrPort, payload []byte, batched bool) {
	select {
	case <-a.ready:
	default:
		a.mu.Lock()
		defer a.mu.Unlock()
		select {
		case <-a.ready: // opened while we took the lock: pending was flushed
		default:
			if len(a.pending) >= udpPendingMax {
				a.t.droppedQueue.Add(1)
				return
			}
			a.pending = append(a.pending, pendingDatagram{dst: dst, payload: append([]byte(nil), payload...)})
			select {
			case a.more <- struct{}{}:
			default:
			}
			return
		}
	}
	if a.dropping {
		return
	}
	if a.failed {
		bp := udpBufs.Get().(*[]byte)
		a.mu.Lock()
		pkt := packet.BuildPortUnreachable(*bp, dst.Addr(), a.client.Addr(), a.quote)
		a.mu.Unlock()
		a.t.cfg.Writer.WriteRaw(pkt)
		udpBufs.Put(bp)
		return
	}
	names := a.t.cfg.Names
	switch {
	case a.udpConn == nil || names != nil && names.IsFake(dst.Addr()):
		a.touch()
		a.write(dst, payload)
	case batched:
		a.t.tx.mu.Lock()
		a.t.tx.add(a, dst, payload)
		a.t.tx.mu.Unlock()
	default:
		a.t.tx.sendNow(a, dst, payload)
	}
}

// write sends one datagram with the conn's WriteTo: through a proxy, or
// to a destination given by name.
func (a *udpAssoc) write(dst netip.AddrPort, payload []byte) {
	var err error
	if names := a.t.cfg.Names; names != nil && names.IsFake(dst.Addr()) {
		d := a.fakes.lookup(dst)
		if d == nil {
			hostport, release, err := names.Lookup(dst)
			if err != nil {
				a.t.logNoName.Log(a.log, slog.LevelInfo, "dropping datagram", "dst", dst, "err", err)
				return
			}
			d = &fakeDest{fake: dst, hostport: hostport, release: release}
			a.fakes.add(d)
		}
		_, err = a.conn.WriteTo(payload, hostAddr(d.hostport))
	} else if n := a.named; n != nil && dst == n.fake {
		_, err = a.conn.WriteTo(payload, hostAddr(n.hostport))
	} else {
		_, err = a.conn.WriteTo(payload, net.UDPAddrFromAddrPort(dst))
	}
	if err != nil {
		a.log.Debug("udp send failed", "dst", dst, "err", err)
		return
	}
	a.up.Add(uint64(len(payload)))
}

// run opens the upstream side, flushes what waited for it, then carries
// replies back until the association idles out or is aborted.
func (a *udpAssoc) run() {
	defer a.fakes.releaseAll()
	defer a.t.remove(a)
	defer a.cancel()
	ctx, cancel := context.WithTimeout(a.ctx, time.Duration(a.t.dialTimeout.Load()))
	conn, err := a.open(ctx)
	cancel()

	var udpConn *net.UDPConn
	if err == nil {
		udpConn = kernelSocket(conn)
		a.log.Debug("udp association routed", "via", a.route.Via, "rule", a.route.Rule, "name", a.route.Name, "name_from", a.route.NameFrom)
	}
	a.mu.Lock()
	pending := a.pending
	a.pending = nil
	if err != nil {
		a.failed = true
	} else {
		a.conn = conn
		a.udpConn = udpConn
		if udpConn != nil {
			if kerr := a.openKernelSocket(); kerr != nil {
				// Without its raw conn the socket is used as a plain
				// packet conn.
				a.log.Debug("udp socket: no batched i/o", "err", kerr)
				a.udpConn = nil
			}
		}
	}
	close(a.ready)
	a.mu.Unlock()

	if err != nil {
		switch {
		case errors.Is(err, errRejected):
			a.log.Debug("udp association refused", "reject", !a.dropping, "rule", a.route.Rule, "name", a.route.Name)
		case ratelog.IsFDExhaustion(err):
			a.t.warnFDs.Warn(a.log, "out of file descriptors: udp association refused", "err", err)
		default:
			a.t.warnFailed.Warn(a.log, "udp association failed: datagrams from this source are refused", "err", err)
		}
		for _, d := range pending {
			a.send(d.dst, d.payload, false)
		}
		// Keep answering with ICMP errors for a while rather than retrying
		// the upstream for every datagram.
		hold := time.NewTimer(udpFailedHold)
		defer hold.Stop()
		select {
		case <-hold.C:
		case <-a.ctx.Done():
		}
		return
	}
	defer conn.Close()
	a.log.Debug("udp association open", "local", conn.LocalAddr())
	for _, d := range pending {
		a.send(d.dst, d.payload, false)
	}
	a.receive()
}

// receive carries datagrams from the upstream to the client until the
// association has been idle for the table's timeout or is aborted.
func (a *udpAssoc) receive() {
	var r *udpReceiver
	if a.udpConn != nil {
		r = newUDPReceiver(a)
	}
	// The deadline is moved only when it passes, not for every read: the
	// association then lives until timeout after its last datagram.
	deadlineSet := false
	for {
		if !deadlineSet {
			_ = a.conn.SetReadDeadline(time.Unix(0, a.last.Load()).Add(time.Duration(a.t.timeout.Load())))
			deadlineSet = true
		}
		// Checked after setting the deadline, so that an abort in between
		// (which sets a past deadline) cannot be overwritten unseen.
		if a.ctx.Err() != nil {
			return
		}
		var err error
		if r != nil {
			err = r.receive()
		} else {
			err = a.receiveOne()
		}
		if err == nil {
			a.touch()
			continue
		}
		if errors.Is(err, os.ErrDeadlineExceeded) {
			if a.ctx.Err() != nil {
				return
			}
			if time.Since(time.Unix(0, a.last.Load())) >= time.Duration(a.t.timeout.Load()) {
				a.log.Debug("udp association closed", "cause", "idle")
				return
			}
			deadlineSet = false
			continue // the client sent something meanwhile: not idle yet
		}
		a.log.Debug("udp association closed", "err", err)
		return
	}
}

// receiveOne reads one datagram from a conn that is not a kernel socket (a
// proxy's) and writes it to the client as a packet from its true source.
func (a *udpAssoc) receiveOne() error {
	bp := udpBufs.Get().(*[]byte)
	n, fromAddr, err := a.conn.ReadFrom((*bp)[udpHeadroom:])
	if err != nil {
		udpBufs.Put(bp)
		return err
	}
	var from netip.AddrPort
	if ua, ok := fromAddr.(*net.UDPAddr); ok {
		from = ua.AddrPort()
	}
	defer udpBufs.Put(bp)
	from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
	if !a.fakes.empty() {
		if fake, ok := a.fakes.replySource(fromAddr, from.Port()); ok {
			from = fake
		}
	}
	if !from.IsValid() || from.Addr().Is4() != a.client.Addr().Is4() {
		return nil // a source the client's address family cannot see
	}
	hl := packet.IPHeaderLen(a.client.Addr())
	if n > packet.MaxUDPPayload(a.client.Addr()) {
		a.t.droppedBig.Add(1) // larger than the client's family carries
		return nil
	}
	start := udpHeadroom - hl - packet.UDPHeaderLen
	pkt := packet.BuildUDP((*bp)[start:], from, a.client, (*bp)[udpHeadroom:udpHeadroom+n])
	a.t.cfg.Writer.WriteRaw(pkt)
	a.down.Add(uint64(n))
	return nil
}
