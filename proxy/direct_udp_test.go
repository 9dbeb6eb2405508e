package proxy

import (
	"bytes"
	"context"
	"errors"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fastPath is what the stack asserts to use the kernel socket under a
// conn directly: the methods *net.UDPConn promotes through the embedding.
type fastPath interface {
	SyscallConn() (syscall.RawConn, error)
	WriteToUDPAddrPort(b []byte, addr netip.AddrPort) (int, error)
	ReadFromUDPAddrPort(b []byte) (int, netip.AddrPort, error)
}

// packetRoundTrip writes msg to dst on pc and waits for the echo, retrying
// a few times since UDP may drop; it returns the source of the echo.
func packetRoundTrip(t *testing.T, pc net.PacketConn, dst net.Addr, msg []byte) net.Addr {
	t.Helper()
	from, _ := packetRoundTrips(t, pc, dst, msg)
	return from
}

// packetRoundTrips is packetRoundTrip that also says how many times msg
// was sent.
func packetRoundTrips(t *testing.T, pc net.PacketConn, dst net.Addr, msg []byte) (net.Addr, int) {
	t.Helper()
	buf := make([]byte, 65535)
	for sends := 1; sends <= 5; sends++ {
		if _, err := pc.WriteTo(msg, dst); err != nil {
			t.Fatalf("WriteTo %v: %v", dst, err)
		}
		pc.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, from, err := pc.ReadFrom(buf)
			if errors.Is(err, syscall.ECONNREFUSED) {
				continue // an ICMP error for an earlier datagram
			}
			if err != nil {
				if ne, ok := errors.AsType[net.Error](err); ok && ne.Timeout() {
					break // lost: send again
				}
				t.Fatalf("ReadFrom: %v", err)
			}
			if bytes.Equal(buf[:n], msg) {
				pc.SetReadDeadline(time.Time{})
				return from, sends
			}
			// A late echo of an earlier datagram: keep reading.
		}
	}
	t.Fatalf("no echo of %d bytes from %v", len(msg), dst)
	return nil, 0
}

// echoOnLoopbacks runs UDP echo servers on one port of 127.0.0.1 and, when
// it is configured, ::1, so that "localhost" reaches one whichever address
// a resolver puts first.
func echoOnLoopbacks(t *testing.T) int {
	t.Helper()
	port := startUDPEcho(t, "127.0.0.1", 0).Port
	if hasIPv6Loopback() {
		c, err := net.ListenPacket("udp6", "[::1]:"+strconv.Itoa(port))
		if err != nil {
			t.Logf("no echo on [::1]:%d (%v): localhost must resolve to 127.0.0.1 first", port, err)
			return port
		}
		c.Close()
		startUDPEcho(t, "::1", port)
	}
	return port
}

func TestDirectListenPacket(t *testing.T) {
	port := echoOnLoopbacks(t)
	v4 := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: port}
	tests := []struct {
		name    string
		network string
		dst     net.Addr
	}{
		{name: "udp addr", network: "udp", dst: v4},
		{name: "ip literal as host:port", network: "udp", dst: hostPortAddr("127.0.0.1:" + strconv.Itoa(port))},
		{name: "name", network: "udp", dst: hostPortAddr("localhost:" + strconv.Itoa(port))},
		{name: "name from udp4 socket", network: "udp4", dst: hostPortAddr("localhost:" + strconv.Itoa(port))},
		{name: "ipv4-mapped from udp4 socket", network: "udp4", dst: hostPortAddr("[::ffff:127.0.0.1]:" + strconv.Itoa(port))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pc, err := Direct{}.ListenPacket(t.Context(), tt.network, "")
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			from := packetRoundTrip(t, pc, tt.dst, []byte("hello "+tt.name))
			ua, ok := from.(*net.UDPAddr)
			if !ok || ua.Port != port || !ua.AddrPort().Addr().Unmap().IsLoopback() {
				t.Errorf("echo came from %v (%T), want a loopback address, port %d", from, from, port)
			}
			if tt.network == "udp4" && !ua.AddrPort().Addr().Is4() {
				t.Errorf("udp4 socket got an echo from %v", from)
			}
		})
	}
}

// TestDirectListenPacketFastPath checks that the stack can still reach
// the kernel socket: the conn is not a *net.UDPConn, but has its methods.
func TestDirectListenPacketFastPath(t *testing.T) {
	echoAddr := startUDPEcho(t, "127.0.0.1", 0)
	pc, err := Direct{}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	fp, ok := pc.(fastPath)
	if !ok {
		t.Fatalf("%T lacks SyscallConn, WriteToUDPAddrPort or ReadFromUDPAddrPort", pc)
	}
	if _, err := fp.SyscallConn(); err != nil {
		t.Fatalf("SyscallConn: %v", err)
	}
	if _, err := fp.WriteToUDPAddrPort([]byte("fast"), echoAddr.AddrPort()); err != nil {
		t.Fatal(err)
	}
	pc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, from, err := fp.ReadFromUDPAddrPort(buf)
	if err != nil || string(buf[:n]) != "fast" || from.Port() != echoAddr.AddrPort().Port() {
		t.Fatalf("ReadFromUDPAddrPort = %q from %v, %v", buf[:n], from, err)
	}
	// Dual-stack where the kernel has IPv6: one socket for every family.
	if la := pc.LocalAddr().(*net.UDPAddr); hasIPv6Loopback() && la.IP.To4() != nil {
		t.Errorf("socket bound to %v, want the IPv6 wildcard (dual-stack)", la)
	}
}

func TestDirectListenPacketControl(t *testing.T) {
	var called string
	d := Direct{Control: func(network, address string, _ syscall.RawConn) error {
		called = network + " " + address
		return nil
	}}
	pc, err := d.ListenPacket(t.Context(), "udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pc.Close()
	if want := "udp4 127.0.0.1:0"; called != want {
		t.Errorf("Control got %q, want %q", called, want)
	}
	errMark := errors.New("no mark for you")
	d.Control = func(string, string, syscall.RawConn) error { return errMark }
	if pc, err := d.ListenPacket(t.Context(), "udp", ""); !errors.Is(err, errMark) {
		if err == nil {
			pc.Close()
		}
		t.Errorf("err = %v, want %v", err, errMark)
	}
}

func TestDirectListenPacketErrors(t *testing.T) {
	if pc, err := (Direct{}).ListenPacket(t.Context(), "tcp", ""); err == nil || !strings.Contains(err.Error(), "unknown network tcp") {
		if err == nil {
			pc.Close()
		}
		t.Errorf("ListenPacket tcp: err = %v", err)
	}
	pc, err := Direct{}.ListenPacket(t.Context(), "udp", "")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	tests := []struct {
		name    string
		dst     net.Addr
		errText string
	}{
		{name: "nil", dst: nil, errText: "missing address"},
		{name: "no port", dst: hostPortAddr("127.0.0.1"), errText: "missing port"},
		{name: "bad port", dst: hostPortAddr("127.0.0.1:dns"), errText: `invalid port "dns"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := pc.WriteTo([]byte("x"), tt.dst)
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Fatalf("WriteTo = %v, want an error containing %q", err, tt.errText)
			}
			if _, ok := errors.AsType[*net.OpError](err); !ok {
				t.Errorf("err is %T, want *net.OpError", err)
			}
		})
	}
}

// fakeResolver answers nameCache lookups from a map and counts them.
type fakeResolver struct {
	answers  map[string][]netip.Addr
	calls    int
	deadline time.Duration
}

func (f *fakeResolver) lookup(ctx context.Context, network, host string) ([]netip.Addr, error) {
	f.calls++
	if d, ok := ctx.Deadline(); ok {
		f.deadline = time.Until(d)
	}
	if ips, ok := f.answers[host]; ok {
		return ips, nil
	}
	return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
}

func TestNameCache(t *testing.T) {
	res := &fakeResolver{answers: map[string][]netip.Addr{
		"a.test":     {netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2")},
		"empty.test": {},
	}}
	nc := newNameCache("ip4")
	nc.lookupNetIP = res.lookup

	for range 3 {
		ip, err := nc.lookup("a.test")
		if err != nil || ip != netip.MustParseAddr("192.0.2.1") {
			t.Fatalf("lookup = %v, %v; want the first address", ip, err)
		}
	}
	if res.calls != 1 {
		t.Errorf("resolver asked %d times for one name, want once", res.calls)
	}
	if res.deadline <= 0 || res.deadline > nameLookupTimeout {
		t.Errorf("lookup had %v to run, want at most %v", res.deadline, nameLookupTimeout)
	}

	// Failures are remembered, for less time than answers.
	for range 2 {
		if _, err := nc.lookup("missing.test"); err == nil {
			t.Fatal("lookup of a missing name succeeded")
		}
	}
	if _, err := nc.lookup("empty.test"); err == nil || !strings.Contains(err.Error(), "no suitable address") {
		t.Errorf("lookup of a name with no addresses = %v", err)
	}
	if res.calls != 3 {
		t.Errorf("resolver asked %d times, want 3", res.calls)
	}
	if e := nc.entries["missing.test"]; time.Until(e.expires) > nameCacheNegativeTTL {
		t.Errorf("failure kept until %v, want within %v", e.expires, nameCacheNegativeTTL)
	}

	// An expired answer is asked for again.
	e := nc.entries["a.test"]
	e.expires = time.Now().Add(-time.Second)
	nc.entries["a.test"] = e
	nc.lookup("a.test")
	if res.calls != 4 {
		t.Errorf("expired entry not looked up again: %d calls", res.calls)
	}
}

func TestNameCacheBounded(t *testing.T) {
	res := &fakeResolver{answers: map[string][]netip.Addr{}}
	for i := range 3 * nameCacheSize {
		res.answers["n"+strconv.Itoa(i)+".test"] = []netip.Addr{netip.AddrFrom4([4]byte{192, 0, 2, byte(i)})}
	}
	nc := newNameCache("ip")
	nc.lookupNetIP = res.lookup
	for name := range res.answers {
		if _, err := nc.lookup(name); err != nil {
			t.Fatal(err)
		}
		if len(nc.entries) > nameCacheSize {
			t.Fatalf("cache holds %d entries, want at most %d", len(nc.entries), nameCacheSize)
		}
	}
	if len(nc.entries) != nameCacheSize {
		t.Errorf("cache holds %d entries, want a full %d", len(nc.entries), nameCacheSize)
	}
}
