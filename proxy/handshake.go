package proxy

import (
	"context"
	"fmt"
	"net"
	"time"
)

// aLongTimeAgo is a deadline in the past: setting it wakes a blocked Read or
// Write at once (as net/http does on cancellation, Go issue 35559).
var aLongTimeAgo = time.Unix(1, 0)

// dialHandshake reaches server through forward (nil means Direct{}) and runs
// handshake on the conn under handshakeContext. It returns the conn from
// forward itself, or closes it and returns the error. A failure to reach
// server at all is a *serverError, which tells a Group the server is down;
// the server's answer about the destination is not.
func dialHandshake(ctx context.Context, forward Dialer, server string, timeout time.Duration, handshake func(net.Conn) error) (net.Conn, error) {
	if forward == nil {
		forward = Direct{}
	}
	c, err := forward.DialContext(ctx, "tcp", server)
	if err != nil {
		return nil, &serverError{err}
	}
	if err := handshakeContext(ctx, c, timeout, func() error { return handshake(c) }); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// handshakeContext runs handshake, which talks on c, under a deadline (the
// earlier of the context's and timeout, 0 meaning 10s) and wakes it when ctx
// ends. It leaves no deadline set and no goroutine running; closing c on
// failure is the caller's job.
func handshakeContext(ctx context.Context, c net.Conn, timeout time.Duration, handshake func() error) error {
	if timeout == 0 {
		timeout = defaultTimeout
	}
	deadline := time.Now().Add(timeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := c.SetDeadline(deadline); err != nil {
		return err
	}
	// A blocked Read does not watch ctx: on cancellation move the deadline
	// into the past to wake it. stop() reports whether the func was kept
	// from running; if not, wait until it has run, so that it cannot put
	// a past deadline on a conn already handed back.
	woken := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		c.SetDeadline(aLongTimeAgo)
		close(woken)
	})
	err := handshake()
	if !stop() {
		<-woken
		// Report the cancellation, not the i/o timeout it caused.
		return ctx.Err()
	}
	if err != nil {
		return err
	}
	return c.SetDeadline(time.Time{})
}

// probe reaches server through forward and runs handshake (nil: none, the
// connection is all that is checked) as dialHandshake does, then closes
// the connection: a Prober's check.
func probe(ctx context.Context, forward Dialer, scheme, server string, timeout time.Duration, handshake func(net.Conn) error) error {
	if handshake == nil {
		handshake = func(net.Conn) error { return nil }
	}
	c, err := dialHandshake(ctx, forward, server, timeout, handshake)
	if err != nil {
		return fmt.Errorf("probe %s %s: %w", scheme, server, err)
	}
	return c.Close()
}
