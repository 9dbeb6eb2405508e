package netnstest

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Ports of the UDP echo servers tests usually ask StartUDPEcho for. Nothing
// listens on ClosedPort over UDP either.
const (
	UDPEchoPort  = 7101
	UDPEchoPort2 = 7102
)

// ListenPacket opens a packet socket in n (see Listen for address).
// An empty host ("udp4", ":0") gives an unconnected socket that can send to
// any destination.
func (n Netns) ListenPacket(network, address string) (net.PacketConn, error) {
	var pc net.PacketConn
	err := n.Do(func() error {
		var err error
		pc, err = net.ListenPacket(network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, n.Name, err)
	}
	return pc, nil
}

// UDPEcho is a set of UDP echo servers in the server namespace. Each sends
// every datagram back to its source and records the source, so a test can
// tell which address and port a NAT or proxy sent from.
type UDPEcho struct {
	conns []*net.UDPConn
	wg    sync.WaitGroup

	mu      sync.Mutex
	sources map[netip.AddrPort]map[netip.AddrPort]int // listener → source → datagrams
}

// StartUDPEcho listens on every address of at in the server namespace and
// echoes until t's cleanup, which closes the sockets and waits for the
// server goroutines.
func (tp *Topology) StartUDPEcho(t testing.TB, at ...netip.AddrPort) *UDPEcho {
	t.Helper()
	e := &UDPEcho{sources: make(map[netip.AddrPort]map[netip.AddrPort]int)}
	t.Cleanup(e.close)
	for _, a := range at {
		pc, err := tp.Server.ListenPacket("udp", a.String())
		if err != nil {
			t.Fatal(err)
		}
		e.conns = append(e.conns, pc.(*net.UDPConn))
		e.sources[a] = make(map[netip.AddrPort]int)
	}
	// Every socket is open and the map complete before a server runs.
	for i, a := range at {
		e.wg.Go(func() { e.serve(a, e.conns[i]) })
	}
	return e
}

// serve is the echo loop of one socket; it ends when the socket is closed.
func (e *UDPEcho) serve(at netip.AddrPort, c *net.UDPConn) {
	buf := make([]byte, 64<<10)
	for {
		n, from, err := c.ReadFromUDPAddrPort(buf)
		if errors.Is(err, net.ErrClosed) {
			return
		}
		if err != nil {
			continue // an ICMP error queued on the socket, for instance
		}
		from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
		e.mu.Lock()
		e.sources[at][from]++
		e.mu.Unlock()
		c.WriteToUDPAddrPort(buf[:n], from)
	}
}

// Sources returns the sources the server at at has received datagrams from,
// sorted.
func (e *UDPEcho) Sources(at netip.AddrPort) []netip.AddrPort {
	e.mu.Lock()
	defer e.mu.Unlock()
	var s []netip.AddrPort
	for a := range e.sources[at] {
		s = append(s, a)
	}
	slices.SortFunc(s, netip.AddrPort.Compare)
	return s
}

// Reset forgets the sources recorded so far.
func (e *UDPEcho) Reset() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for a := range e.sources {
		e.sources[a] = make(map[netip.AddrPort]int)
	}
}

func (e *UDPEcho) close() {
	for _, c := range e.conns {
		c.Close()
	}
	e.wg.Wait()
}

// InEchos returns how many ICMP (or, with ipv6, ICMPv6) echo requests the
// kernel of n has received: the InEchos counter of /proc/net/snmp, or
// Icmp6InEchos of /proc/net/snmp6, read from inside n.
func (n Netns) InEchos(t testing.TB, ipv6 bool) int {
	t.Helper()
	file := "/proc/net/snmp"
	if ipv6 {
		file = "/proc/net/snmp6"
	}
	r := n.Exec(t, CommandTimeout, "cat", file)
	if r.Err != nil {
		t.Fatalf("read %s in %s: %s", file, n, r)
	}
	lines := strings.Split(r.Stdout, "\n")
	for i, line := range lines {
		f := strings.Fields(line)
		switch {
		case ipv6 && len(f) == 2 && f[0] == "Icmp6InEchos":
			v, err := strconv.Atoi(f[1])
			if err == nil {
				return v
			}
		case !ipv6 && len(f) > 1 && f[0] == "Icmp:" && i+1 < len(lines):
			// A line of names, then a line of values.
			vals := strings.Fields(lines[i+1])
			for j, name := range f {
				if name == "InEchos" && j < len(vals) {
					if v, err := strconv.Atoi(vals[j]); err == nil {
						return v
					}
				}
			}
		}
	}
	t.Fatalf("no echo request counter in %s of %s:\n%s", file, n, r.Stdout)
	return 0
}
