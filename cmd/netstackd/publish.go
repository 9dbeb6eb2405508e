package main

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/netstackd/netstackd/internal/ratelog"
	"github.com/netstackd/netstackd/stack"
)

// publishSpec is one --publish [IP:]HOSTPORT:NSPORT[/udp].
type publishSpec struct {
	host   netip.AddrPort // where netstackd listens; an unspecified address means all
	nsPort uint16         // the port behind the TUN
	udp    bool
}

func (p publishSpec) String() string {
	proto := "tcp"
	if p.udp {
		proto = "udp"
	}
	return fmt.Sprintf("%s→:%d/%s", p.host, p.nsPort, proto)
}

// parsePublish reads [IP:]HOSTPORT:NSPORT[/udp|/tcp], as docker and
// slirp4netns users write it. Without an IP it listens on all addresses.
func parsePublish(v string) (publishSpec, error) {
	var p publishSpec
	spec, proto, hasProto := strings.Cut(v, "/")
	if hasProto {
		switch proto {
		case "tcp":
		case "udp":
			p.udp = true
		default:
			return p, fmt.Errorf("--publish %q: protocol %q, want tcp or udp", v, proto)
		}
	}
	i := strings.LastIndex(spec, ":")
	if i < 0 {
		return p, fmt.Errorf("--publish %q: want [IP:]HOSTPORT:NSPORT[/udp]", v)
	}
	nsPort, err := parsePort(spec[i+1:])
	if err != nil {
		return p, fmt.Errorf("--publish %q: namespace port: %v", v, err)
	}
	p.nsPort = nsPort
	hostPart := spec[:i]
	host := netip.IPv6Unspecified()
	portStr := hostPart
	if j := strings.LastIndex(hostPart, ":"); j >= 0 {
		ipStr := strings.TrimSuffix(strings.TrimPrefix(hostPart[:j], "["), "]")
		host, err = netip.ParseAddr(ipStr)
		if err != nil {
			return p, fmt.Errorf("--publish %q: %q is not an IP address", v, ipStr)
		}
		portStr = hostPart[j+1:]
	}
	hostPort, err := parsePort(portStr)
	if err != nil {
		return p, fmt.Errorf("--publish %q: host port: %v", v, err)
	}
	p.host = netip.AddrPortFrom(host, hostPort)
	return p, nil
}

func parsePort(s string) (uint16, error) {
	n, err := strconv.ParseUint(s, 10, 16)
	if err != nil || n == 0 {
		return 0, fmt.Errorf("%q is not a port (1-65535)", s)
	}
	return uint16(n), nil
}

// publisher accepts connections and receives datagrams on netstackd's
// side and hands them to the stack, which carries them to the port behind
// the TUN.
type publisher struct {
	log    *slog.Logger
	target netip.Addr // the address behind the TUN that published ports reach
	lns    []net.Listener
	specs  []publishSpec // of lns
	pcs    []net.PacketConn
	pspecs []publishSpec // of pcs
	wg     sync.WaitGroup
	once   sync.Once
	done   chan struct{} // closed by close: ends an accept loop's back-off

	warnFDs ratelog.Limiter // accepts failing for want of descriptors
}

// listenPublished opens every listener and socket before anything else
// starts, so a port already in use fails start-up with a clear error.
func listenPublished(specs []publishSpec, target netip.Addr, log *slog.Logger) (*publisher, error) {
	p := &publisher{log: log, target: target, done: make(chan struct{})}
	for _, s := range specs {
		if s.udp {
			pc, err := net.ListenPacket("udp", s.host.String())
			if err != nil {
				p.close()
				return nil, fmt.Errorf("publish %s: %w", s, err)
			}
			p.pcs = append(p.pcs, pc)
			p.pspecs = append(p.pspecs, s)
			continue
		}
		ln, err := net.Listen("tcp", s.host.String())
		if err != nil {
			p.close()
			return nil, fmt.Errorf("publish %s: %w", s, err)
		}
		p.lns = append(p.lns, ln)
		p.specs = append(p.specs, s)
	}
	return p, nil
}

// serve starts accepting and receiving; close stops it.
func (p *publisher) serve(st *stack.Stack) {
	for i, ln := range p.lns {
		dst := netip.AddrPortFrom(p.target, p.specs[i].nsPort)
		p.log.Info("publishing", "listen", ln.Addr().String(), "to", dst, "proto", "tcp")
		p.wg.Go(func() { p.acceptLoop(ln, st, dst) })
	}
	for i, pc := range p.pcs {
		dst := netip.AddrPortFrom(p.target, p.pspecs[i].nsPort)
		p.log.Info("publishing", "listen", pc.LocalAddr().String(), "to", dst, "proto", "udp")
		p.wg.Go(func() {
			// It returns when close closes pc or the stack closes.
			if err := st.ServeInboundUDP(pc, dst); err != nil && !errors.Is(err, net.ErrClosed) {
				p.log.Warn("published udp port stopped", "listen", pc.LocalAddr().String(), "err", err)
			}
		})
	}
}

func (p *publisher) acceptLoop(ln net.Listener, st *stack.Stack, dst netip.AddrPort) {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if ratelog.IsFDExhaustion(err) {
			// The connection waits in the backlog: try again once
			// flows have ended, backing off as net/http's Server does,
			// rather than stop publishing for good.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			p.warnFDs.Warn(p.log, "out of file descriptors: published port not accepting for now", "listen", ln.Addr().String(), "err", err)
			select {
			case <-time.After(backoff):
				continue
			case <-p.done:
				return
			}
		}
		backoff = 0
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				p.log.Warn("published port stopped accepting", "listen", ln.Addr().String(), "err", err)
			}
			return
		}
		st.ServeInbound(c, dst)
	}
}

func (p *publisher) close() {
	p.once.Do(func() {
		close(p.done)
		for _, ln := range p.lns {
			ln.Close()
		}
		for _, pc := range p.pcs {
			pc.Close()
		}
		p.wg.Wait()
	})
}
