package stack

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"time"

	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/netstackd/netstackd/stack/internal/sniff"
	"github.com/netstackd/netstackd/stack/internal/tcprelay"
	"github.com/netstackd/netstackd/stack/internal/udpnat"
)

// Sniffing (issue 17): when a flow's route depends on a name the stack
// does not know (the client resolved it itself, or has the address built
// in), the stack completes the client's handshake, reads what it sends
// first, and takes the name from a TLS ClientHello or an HTTP request. It
// costs the flow the wait for those bytes before the upstream is dialed:
// one client round trip more than dial-first, and, for a protocol where
// the server speaks first, SniffTimeout.

const (
	defaultSniffTimeout = 300 * time.Millisecond
	// maxSniff bounds what is read for a name: the longest ClientHello
	// or HTTP request head the sniffers take, with its record headers.
	maxSniff = sniff.MaxStream
)

// openSniffing accepts the client, reads its first bytes for a name, asks
// Config.Route again with it and dials what that decides, updating r. The
// bytes read are owed to the upstream (openFlow.first). On an error the
// client has been reset and the request completed.
func (st *Stack) openSniffing(h *handshake, wq *waiter.Queue, r *flowRoute, log flowLogger) (openFlow, error) {
	ep, err := h.accept(wq)
	if err != nil {
		h.failAccept(err)
		return openFlow{}, err
	}
	h.complete(false)
	o := openFlow{conn: tcprelay.NewConn(ep, wq, r.flow.Dst, r.flow.Client)}
	name, first, err := st.sniffStream(o.conn)
	if err != nil {
		o.conn.Abort()
		return openFlow{}, fmt.Errorf("read the client's first bytes: %w", err)
	}
	o.first = first
	if name != "" {
		st.sniffed.Add(1)
		r.flow.Name, r.flow.NameFrom = name, NameFromSniffed
		r.decision = st.decide(r.flow)
		if r.decision.DialName {
			r.address = hostPort(name, r.flow.Dst.Port())
		}
	}
	if d := r.decision; st.countRefused(d.Action) {
		// The handshake is done: a reset is all that is left to say.
		log.log(slog.LevelDebug, "flow refused after sniffing", "action", d.Action, "rule", d.Rule, "name", r.flow.Name)
		o.conn.Abort()
		return openFlow{}, fmt.Errorf("%s by rule %s", d.Action, d.Rule)
	}
	o.upstream, o.via, err = st.dialUpstream(st.ctx, st.dialer(r.decision), r.address)
	if err != nil {
		o.conn.Abort()
		return openFlow{}, err
	}
	return o, nil
}

// sniffStream reads the client's first bytes until they give a name, show
// there is none, or SniffTimeout passes; it returns the name ("" for none)
// and every byte read.
func (st *Stack) sniffStream(conn *tcprelay.Conn) (string, []byte, error) {
	_ = conn.SetReadDeadline(time.Now().Add(st.timeouts.Load().Sniff))
	defer conn.SetReadDeadline(time.Time{})
	buf := make([]byte, 0, 2048)
	for len(buf) < maxSniff {
		if len(buf) == cap(buf) {
			buf = slices.Grow(buf, min(cap(buf), maxSniff-len(buf)))
		}
		n, err := conn.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if name, done := sniffName(buf); done {
			return name, buf, nil
		}
		if err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				return "", buf, nil // the server speaks first, or a slow client
			}
			if errors.Is(err, io.EOF) {
				// The client sent all it had and half-closed: relay
				// that, the FIN follows from the conn.
				return "", buf, nil
			}
			return "", buf, err
		}
	}
	return "", buf, nil
}

// sniffName looks for a name in a stream's first bytes; done is false
// while more bytes could still give one.
func sniffName(b []byte) (name string, done bool) {
	name, _, err := sniff.Stream(b)
	if errors.Is(err, sniff.ErrMore) {
		return "", false
	}
	return name, true // "" when there is none
}

// routeAssociation is the UDP NAT's Config.Route: Config.Route asked about a new
// association's first destination, and when it asks for a name, again
// with the one its first datagrams carry in a QUIC Initial.
func (st *Stack) routeAssociation(ctx context.Context, o *udpnat.Opening) udpnat.Route {
	f := Flow{Proto: "udp", Client: o.Client, Dst: o.Dst}
	st.nameFlow(&f, st.fakeName(o.Dst.Addr()))
	d := st.decide(f)
	if d.Sniff {
		if name := st.sniffDatagrams(ctx, o); name != "" {
			st.sniffed.Add(1)
			f.Name, f.NameFrom = name, NameFromSniffed
			d = st.decide(f)
		}
	}
	rt := udpnat.Route{Dialer: d.UDP, Via: d.Via, Rule: d.Rule}
	switch f.NameFrom {
	case NameFromSniffed:
		rt.Name, rt.NameFrom, rt.DialName = f.Name, f.NameFrom, d.DialName
	case NameFromDNS:
		rt.Name, rt.NameFrom = f.Name, f.NameFrom
	}
	st.countRefused(d.Action)
	rt.Reject, rt.Drop = d.Action == Reject, d.Action == Drop
	return rt
}

// sniffDatagrams reads a QUIC client's Initial packets among the first
// datagrams of an association for the name in its ClientHello, waiting at
// most SniffTimeout for them.
func (st *Stack) sniffDatagrams(ctx context.Context, o *udpnat.Opening) string {
	ctx, cancel := context.WithTimeout(ctx, st.timeouts.Load().Sniff)
	defer cancel()
	var hello sniff.QUIC
	for i := 0; i < maxSniffDatagrams; i++ {
		payload, ok := o.Datagram(ctx, i)
		if !ok {
			return ""
		}
		name, err := hello.Feed(payload)
		if errors.Is(err, sniff.ErrMore) {
			continue
		}
		if err != nil {
			return ""
		}
		return name
	}
	return ""
}

// maxSniffDatagrams bounds the datagrams read for a QUIC ClientHello: one
// or two carry it, a few more allow for loss, reordering and padding.
const maxSniffDatagrams = sniff.MaxDatagrams
