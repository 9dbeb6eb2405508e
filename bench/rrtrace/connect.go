package main

import (
	"io"
	"strings"

	"golang.org/x/exp/trace"
)

// The points of one handshake in dial-first mode, in order, all seen from
// the goroutine gVisor's forwarder starts for the SYN.
const (
	synHandled  = iota // the forwarder's goroutine is created: the SYN was read and demultiplexed
	fwdRun             // it starts running
	dialConnect        // its upstream connect starts
	dialDone           // and returns: the server's side of the handshake is done
	synAckQueue        // it wakes the link's writer: the SYN-ACK is queued
	synAckWrite        // the writer starts a TUN write
	synAckSent         // and the write returns
	nConnectPoints
)

var connectStages = []string{
	"forwarder goroutine start",
	"route, socket, options before connect",
	"upstream connect (runs the server's handshake)",
	"dial's end, gVisor endpoint, SYN-ACK queued",
	"hand-off to the writer",
	"TUN write of the SYN-ACK (runs the client's)",
}

// isConnect reports whether fn is where the direct dialer's first connect
// is made: net.Dialer's Control (connectEarly) or Direct's own socket
// (dialAddr, whose first traced system call is the connect).
func isConnect(fn string) bool {
	return strings.Contains(fn, "connectEarly") || strings.Contains(fn, "Direct.dialAddr")
}

// followConnects reads the trace and returns each handshake stage's
// durations in µs. A handshake whose forwarder goroutine did not itself
// wake the writer (the writer was already awake) is left out.
func followConnects(r io.Reader, skip trace.Time) ([][]float64, int, error) {
	type handshake struct {
		at   [nConnectPoints]trace.Time
		next int
	}
	open := map[trace.GoID]*handshake{}
	var writing *handshake // the handshake whose SYN-ACK the writer is writing
	durs := make([][]float64, nConnectPoints-1)
	n := 0
	err := walk(r, skip, func(x *transition) {
		if x.from == trace.GoNotExist && strings.Contains(x.fn, "Forwarder).HandlePacket") {
			h := &handshake{next: fwdRun}
			h.at[synHandled] = x.t
			open[x.g] = h
			return
		}
		if h := open[x.g]; h != nil {
			switch {
			case h.next == fwdRun && x.to == trace.GoRunning,
				h.next == dialConnect && x.to == trace.GoSyscall && isConnect(x.fn),
				h.next == dialDone && x.from == trace.GoSyscall:
				h.at[h.next] = x.t
				h.next++
			case x.to == trace.GoNotExist:
				delete(open, x.g)
			}
		}
		if x.role != writer {
			return
		}
		if x.from == trace.GoWaiting && x.to == trace.GoRunnable {
			if h := open[x.by]; h != nil && h.next == synAckQueue {
				h.at[synAckQueue] = x.t
				h.next = synAckWrite
				writing = h
				delete(open, x.by)
			}
			return
		}
		switch {
		case writing == nil:
		case writing.next == synAckWrite && x.to == trace.GoSyscall:
			writing.at[synAckWrite] = x.t
			writing.next = synAckSent
		case writing.next == synAckSent && x.from == trace.GoSyscall:
			writing.at[synAckSent] = x.t
			for i := range durs {
				durs[i] = append(durs[i], float64(writing.at[i+1]-writing.at[i])/1e3)
			}
			n++
			writing = nil
		}
	})
	return durs, n, err
}
