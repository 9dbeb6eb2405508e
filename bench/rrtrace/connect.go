package main

import (
	"fmt"
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
	tr, err := trace.NewReader(r)
	if err != nil {
		return nil, 0, fmt.Errorf("read trace: %w", err)
	}
	roles := map[trace.GoID]role{}
	type handshake struct {
		at   [nConnectPoints]trace.Time
		next int
	}
	open := map[trace.GoID]*handshake{}
	var writing *handshake // the handshake whose SYN-ACK the writer is writing
	durs := make([][]float64, nConnectPoints-1)
	var start trace.Time
	n := 0
	for {
		ev, err := tr.ReadEvent()
		if err == io.EOF {
			return durs, n, nil
		}
		if err != nil {
			return nil, 0, fmt.Errorf("read trace: %w", err)
		}
		if start == 0 {
			start = ev.Time()
		}
		if ev.Kind() != trace.EventStateTransition {
			continue
		}
		st := ev.StateTransition()
		if st.Resource.Kind != trace.ResourceGoroutine {
			continue
		}
		g := st.Resource.Goroutine()
		from, to := st.Goroutine()
		fn := ourFrame(st.Stack)
		if to == trace.GoSyscall || from == trace.GoNotExist || to == trace.GoWaiting {
			if r := roleOf(fn); r != unknown {
				roles[g] = r
			}
		}
		if ev.Time()-start < skip {
			continue
		}
		t := ev.Time()
		if from == trace.GoNotExist && strings.Contains(fn, "Forwarder).HandlePacket") {
			h := &handshake{next: fwdRun}
			h.at[synHandled] = t
			open[g] = h
			continue
		}
		if h := open[g]; h != nil {
			switch {
			case h.next == fwdRun && to == trace.GoRunning,
				h.next == dialConnect && to == trace.GoSyscall && isConnect(fn),
				h.next == dialDone && from == trace.GoSyscall:
				h.at[h.next] = t
				h.next++
			case to == trace.GoNotExist:
				delete(open, g)
			}
		}
		if roles[g] != writer {
			continue
		}
		if from == trace.GoWaiting && to == trace.GoRunnable {
			if h := open[ev.Goroutine()]; h != nil && h.next == synAckQueue {
				h.at[synAckQueue] = t
				h.next = synAckWrite
				writing = h
				delete(open, ev.Goroutine())
			}
			continue
		}
		if writing == nil {
			continue
		}
		switch {
		case writing.next == synAckWrite && to == trace.GoSyscall:
			writing.at[synAckWrite] = t
			writing.next = synAckSent
		case writing.next == synAckSent && from == trace.GoSyscall:
			writing.at[synAckSent] = t
			for i := range durs {
				durs[i] = append(durs[i], float64(writing.at[i+1]-writing.at[i])/1e3)
			}
			n++
			writing = nil
		}
	}
}
