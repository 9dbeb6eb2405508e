// Command rrtrace follows request/reply round trips through a Go execution
// trace of netstackd (--exec-trace) taken while `connrate -rr` runs, and
// prints where each round trip's time goes: the TUN read, gVisor's
// hand-off to its segment processor, the relay, the upstream write, the
// server, the reply's way back and the TUN write. With -connect it follows
// the handshakes of `connrate`'s short connections instead, from the SYN
// to the SYN-ACK written (connect.go).
//
// It recognises netstackd's goroutines by the functions in their system
// call stacks, so it fits the code it was written with (stack/internal/link,
// tcprelay, tundev); a renamed function shows as round trips not found.
package main

import (
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"strings"

	"golang.org/x/exp/trace"
)

// The points of one round trip, in the order they happen.
const (
	inWake      = iota // the TUN reader is woken by the poller: a request is there
	inRead             // its read returns the request
	procRun            // gVisor's segment processor starts on it
	upWrite            // the relay starts writing the request upstream
	upWritten          // and the write returns
	replyWake          // the upstream reader is woken: the reply is there
	replyQueued        // the reply is queued for the link's writer
	outWrite           // the writer starts writing the reply to the TUN
	outWritten         // and the write returns
	nPoints
)

var stages = []string{
	"TUN read (wake to read returned)",
	"IP layer, hand-off to gVisor's processor",
	"TCP processing, ACK, relay wake-up",
	"upstream write (runs the server's receive)",
	"server: request to reply",
	"upstream read, gVisor send, queue",
	"hand-off to the writer",
	"TUN write (runs the client's receive)",
	"client: reply to next request",
}

type role int

const (
	unknown role = iota
	reader
	processor
	writer
	sender
	receiver
)

func main() {
	skip := flag.Float64("skip", 200, "milliseconds at the start of the trace to leave out")
	connect := flag.Bool("connect", false, "follow handshakes (connrate without -rr), not round trips")
	flag.Usage = func() {
		fmt.Fprintln(os.Stderr, "usage: rrtrace [-skip MS] [-connect] TRACE")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}
	f, err := os.Open(flag.Arg(0))
	if err != nil {
		fmt.Fprintln(os.Stderr, "rrtrace:", err)
		os.Exit(1)
	}
	defer f.Close()
	follow, names, what, others := followRoundTrips, stages, "round trips", []int{4, 8}
	if *connect {
		follow, names, what, others = followConnects, connectStages, "handshakes", nil
	}
	durs, n, err := follow(f, trace.Time(*skip*1e6))
	if err != nil {
		fmt.Fprintln(os.Stderr, "rrtrace:", err)
		os.Exit(1)
	}
	if n == 0 {
		fmt.Fprintf(os.Stderr, "rrtrace: no %s found (was connrate running, and is this netstackd's trace?)\n", what)
		os.Exit(1)
	}
	fmt.Printf("%d %s followed; microseconds, median and 90th percentile\n", n, what)
	var own, all float64
	for i, name := range names {
		p50, p90 := quantile(durs[i], 0.5), quantile(durs[i], 0.9)
		fmt.Printf("%-45s %8.1f %8.1f\n", name, p50, p90)
		all += p50
		if !slices.Contains(others, i) {
			own += p50
		}
	}
	fmt.Printf("%-45s %8.1f\n", "sum of medians", all)
	if len(others) > 0 {
		fmt.Printf("%-45s %8.1f\n", "  of which netstackd's (all but server and client)", own)
	}
}

// transition is one goroutine's change of state in the trace, with what
// the followers look at.
type transition struct {
	t        trace.Time
	g        trace.GoID // the goroutine that changes state
	from, to trace.GoState
	fn       string     // the innermost frame of our code in its stack
	by       trace.GoID // the goroutine that caused it, if another
	role     role       // g's role, as far as known
	byRole   role       // by's
}

// walk reads the trace and hands visit every goroutine transition after
// the first skip of it, having learned the goroutines' roles from their
// stacks along the way.
func walk(r io.Reader, skip trace.Time, visit func(*transition)) error {
	tr, err := trace.NewReader(r)
	if err != nil {
		return fmt.Errorf("read trace: %w", err)
	}
	roles := map[trace.GoID]role{}
	var start trace.Time
	for {
		ev, err := tr.ReadEvent()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("read trace: %w", err)
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
		x := transition{t: ev.Time(), g: st.Resource.Goroutine(), fn: ourFrame(st.Stack), by: ev.Goroutine()}
		x.from, x.to = st.Goroutine()
		if x.to == trace.GoSyscall || x.from == trace.GoNotExist || x.to == trace.GoWaiting {
			if r := roleOf(x.fn); r != unknown {
				roles[x.g] = r
			}
		}
		if x.t-start < skip {
			continue
		}
		x.role, x.byRole = roles[x.g], roles[x.by]
		visit(&x)
	}
}

// followRoundTrips reads the trace and returns each stage's durations in µs.
func followRoundTrips(r io.Reader, skip trace.Time) ([][]float64, int, error) {
	durs := make([][]float64, nPoints) // the last: the client's turn
	var lastOut trace.Time             // when the previous reply was written
	var at [nPoints]trace.Time
	next := inWake // the point awaited
	n := 0
	err := walk(r, skip, func(x *transition) {
		point := -1
		switch rl, from, to := x.role, x.from, x.to; {
		case rl == reader && from == trace.GoWaiting && to == trace.GoRunnable:
			point = inWake
		case rl == reader && from == trace.GoSyscall && next == inRead:
			point = inRead
		case rl == processor && to == trace.GoRunning && next == procRun:
			point = procRun
		case to == trace.GoSyscall && strings.Contains(x.fn, "socketSender).write"):
			point = upWrite
		case rl == sender && from == trace.GoSyscall && next == upWritten:
			point = upWritten
		case rl == receiver && from == trace.GoWaiting && to == trace.GoRunnable && x.by == trace.NoGoroutine:
			point = replyWake
		case rl == writer && from == trace.GoWaiting && to == trace.GoRunnable && x.byRole == receiver && next == replyQueued:
			point = replyQueued
		case rl == writer && to == trace.GoSyscall && next == outWrite:
			point = outWrite
		case rl == writer && from == trace.GoSyscall && next == outWritten:
			point = outWritten
		}
		if point < 0 {
			return
		}
		if point == inWake {
			next = inWake // a new request starts a new round trip
		}
		if point != next {
			return
		}
		at[point] = x.t
		if point == inWake && lastOut != 0 {
			durs[nPoints-1] = append(durs[nPoints-1], float64(at[inWake]-lastOut)/1e3)
			lastOut = 0
		}
		if point == outWritten {
			for i := range nPoints - 1 {
				durs[i] = append(durs[i], float64(at[i+1]-at[i])/1e3)
			}
			lastOut = at[outWritten]
			n++
			next = inWake
			return
		}
		next = point + 1
	})
	return durs, n, err
}

// ourFrame is the innermost frame of netstackd's or gVisor's code in s.
func ourFrame(s trace.Stack) string {
	for f := range s.Frames() {
		if strings.Contains(f.Func, "netstackd") || strings.Contains(f.Func, "gvisor") {
			return f.Func
		}
	}
	return ""
}

func roleOf(fn string) role {
	switch {
	case strings.Contains(fn, "tundev.(*queue).read"):
		return reader
	case strings.Contains(fn, "(*processor).start"):
		return processor
	case strings.Contains(fn, "writer).writeFD"), strings.Contains(fn, "writeOutbound"):
		return writer
	case strings.Contains(fn, "socketSender).write"):
		return sender
	case strings.Contains(fn, "tcprelay.readRaw"):
		return receiver
	}
	return unknown
}

func quantile(xs []float64, q float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[int(q*float64(len(s)-1))]
}
