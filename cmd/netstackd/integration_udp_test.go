package main_test

// UDP and ping through netstackd: datagrams of every size echoed intact
// (directly and through Dante's UDP ASSOCIATE), dig over UDP, real ping
// forwarding, endpoint-independent mapping, and the ICMP errors a client
// must see when its datagrams cannot go anywhere.

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/netnstest"
)

const (
	// udpEchoCount datagrams are echoed per run, with sizes spread evenly
	// over 1..udpMaxPayload, every size different.
	udpEchoCount  = 1000
	udpMaxPayload = 1400
	// udpEchoTries bounds the sends of one datagram; udpEchoWait is how
	// long each waits for the echo.
	udpEchoTries = 5
	udpEchoWait  = 500 * time.Millisecond

	// Where the SOCKS servers of the UDP tests listen: Dante relays UDP,
	// microsocks refuses UDP ASSOCIATE.
	udpDantePort      = netnstest.SocksPort
	udpMicrosocksPort = 1085
)

var (
	// dnsName is the name dnsmasq answers in the server namespace, with
	// dnsNameAddr.
	dnsName     = "name.test"
	dnsNameAddr = netip.MustParseAddr("192.0.2.123")
	// Nothing answers these addresses in the server's subnets.
	unusedIPv4 = netip.MustParseAddr("192.0.2.99")
	unusedIPv6 = netip.MustParseAddr("2001:db8:1::99")
)

// TestIntegrationUDP runs the UDP and ping scenarios directly, through Dante
// (SOCKS5 UDP ASSOCIATE) and through microsocks, which refuses UDP.
func TestIntegrationUDP(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	echo4 := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort)
	echo4b := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.UDPEchoPort2)
	echo6 := netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.UDPEchoPort)
	echo6b := netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.UDPEchoPort2)
	echo := tp.StartUDPEcho(t, echo4, echo4b, echo6, echo6b)
	resolver := tp.StartDnsmasq(t, netnstest.ServerIPv4, map[string]netip.Addr{dnsName: dnsNameAddr})
	dante := netip.AddrPortFrom(netnstest.ServerIPv4, udpDantePort)
	tp.StartDanteUDP(t, dante)
	micro := netip.AddrPortFrom(netnstest.ServerIPv4, udpMicrosocksPort)
	tp.StartMicrosocks(t, micro)
	// Direct ping goes out on unprivileged ICMP sockets, which the daemon
	// namespace must allow (the sysctl is per namespace).
	if r := tp.Daemon.Exec(t, 10*time.Second, "sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647"); r.Err != nil {
		t.Fatalf("allow ping sockets in %s: %s", tp.Daemon, r)
	}
	closed4 := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.ClosedPort)
	closed6 := netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.ClosedPort)

	t.Run("direct", func(t *testing.T) {
		d := startNetstackd(t, tp, "--dns", "off")
		t.Run("echo-ipv4", func(t *testing.T) { testUDPEcho(t, tp, echo4) })
		t.Run("echo-ipv6", func(t *testing.T) { testUDPEcho(t, tp, echo6) })
		t.Run("dig", func(t *testing.T) { testDigUDP(t, tp, resolver, netnstest.DaemonIPv4) })
		// Directly, echo requests are forwarded for real: the server's
		// kernel counts them, and an address nobody holds stays silent (a
		// reply from it would mean the stack fakes replies). ping-ipv6 and
		// ping-unused-ipv6 fail as of f7ddf72: parseEcho (stack/ping.go)
		// wants header.ICMPv6Checksum(...) == 0, but that function returns
		// the checksum the message should carry, so no ICMPv6 echo request
		// is forwarded and gVisor answers every one itself.
		t.Run("ping-ipv4", func(t *testing.T) { testPing(t, tp, netnstest.ServerIPv4, true, true) })
		t.Run("ping-ipv6", func(t *testing.T) { testPing(t, tp, netnstest.ServerIPv6, true, true) })
		t.Run("ping-unused-ipv4", func(t *testing.T) { testPing(t, tp, unusedIPv4, false, false) })
		t.Run("ping-unused-ipv6", func(t *testing.T) { testPing(t, tp, unusedIPv6, false, false) })
		t.Run("mapping-ipv4", func(t *testing.T) { testUDPMapping(t, tp, echo, echo4, echo4b, netnstest.DaemonIPv4) })
		t.Run("mapping-ipv6", func(t *testing.T) { testUDPMapping(t, tp, echo, echo6, echo6b, netnstest.DaemonIPv6) })
		t.Run("segment-ipv4", func(t *testing.T) { testUDPSegment(t, tp, echo4) })
		t.Run("segment-ipv6", func(t *testing.T) { testUDPSegment(t, tp, echo6) })
		// closed-port-ipv4 fails as of f7ddf72: the direct association's
		// socket is dual-stack ([::]), on which the kernel reports an
		// ICMPv4 port unreachable as level SOL_IPV6, type IPV6_RECVERR,
		// origin SO_EE_ORIGIN_ICMP; portUnreachable (stack/icmperr.go)
		// only accepts that origin at level SOL_IP, and drops it.
		t.Run("closed-port-ipv4", func(t *testing.T) { testUDPRefused(t, tp, closed4) })
		t.Run("closed-port-ipv6", func(t *testing.T) { testUDPRefused(t, tp, closed6) })
		t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
	})

	t.Run("dante", func(t *testing.T) {
		d := startNetstackd(t, tp, "--proxy", "socks5://"+dante.String(), "--dns", "off")
		t.Run("echo-ipv4", func(t *testing.T) { testUDPEcho(t, tp, echo4) })
		t.Run("echo-ipv6", func(t *testing.T) { testUDPEcho(t, tp, echo6) })
		t.Run("dig", func(t *testing.T) { testDigUDP(t, tp, resolver, netnstest.ServerIPv4) })
		// Through a proxy the stack answers echo requests itself (ICMP
		// cannot be carried by SOCKS), as the README documents: replies
		// come, and the server's kernel sees no echo request. The IPv4
		// case fails as of f7ddf72: gVisor's IPv4 (network/ipv4/icmp.go)
		// does not answer an echo request to a temporary (promiscuous)
		// address, so only IPv6 and the stack's own addresses answer.
		t.Run("ping-ipv4-answered-by-stack", func(t *testing.T) { testPing(t, tp, netnstest.ServerIPv4, true, false) })
		t.Run("ping-ipv6-answered-by-stack", func(t *testing.T) { testPing(t, tp, netnstest.ServerIPv6, true, false) })
		// Both servers see the same source, Dante's relay socket: netstackd
		// keeps one association per client source, and Dante relays an
		// association from one socket.
		t.Run("mapping-ipv4", func(t *testing.T) { testUDPMapping(t, tp, echo, echo4, echo4b, netnstest.ServerIPv4) })
		t.Run("segment-ipv4", func(t *testing.T) { testUDPSegment(t, tp, echo4) })
		t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
	})

	t.Run("microsocks", func(t *testing.T) {
		d := startNetstackd(t, tp, "--socks", micro.String(), "--dns", "off")
		t.Run("udp-refused", func(t *testing.T) {
			testUDPRefused(t, tp, echo4)
			if log := d.Log(); !strings.Contains(log, "does not support UDP ASSOCIATE") {
				t.Errorf("netstackd's log has no line saying the proxy does not support UDP ASSOCIATE:\n%s", log)
			}
		})
		t.Run("sigterm", func(t *testing.T) { testStop(t, tp, d, syscall.SIGTERM) })
	})
}

// udpSize is the payload size of datagram i: 1 for the first, udpMaxPayload
// for the last, and different for each, so a reply's size tells which
// datagram it echoes.
func udpSize(i int) int { return 1 + i*(udpMaxPayload-1)/(udpEchoCount-1) }

// udpPayload is the content of datagram i.
func udpPayload(i int) []byte {
	b := make([]byte, udpSize(i))
	for k := range b {
		b[k] = byte(i*7 + k*13 + k>>8)
	}
	return b
}

// testUDPEcho sends udpEchoCount datagrams, one at a time, from a connected
// socket in the client namespace to the echo server at dst and wants each
// back intact. A datagram without an echo within udpEchoWait is sent again,
// up to udpEchoTries times; the resends are reported as loss. A late echo
// of an earlier datagram is skipped, but must be intact too.
func testUDPEcho(t *testing.T, tp *netnstest.Topology, dst netip.AddrPort) {
	ctx := netnstest.TestContext(t, 60*time.Second)
	c, err := tp.Client.DialContext(ctx, "udp", dst.String())
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	bySize := make(map[int]int, udpEchoCount)
	for i := range udpEchoCount {
		bySize[udpSize(i)] = i
	}
	start := time.Now()
	buf := make([]byte, 64<<10)
	var resent, late, lost int
	var lostFirst []int
	for i := range udpEchoCount {
		msg := udpPayload(i)
		got := false
		for try := 0; try < udpEchoTries && !got; try++ {
			if ctx.Err() != nil {
				t.Fatalf("datagram %d: %v", i, ctx.Err())
			}
			if try > 0 {
				resent++
			}
			if _, err := c.Write(msg); err != nil {
				t.Fatalf("send datagram %d (%d bytes): %v", i, len(msg), err)
			}
			c.SetReadDeadline(time.Now().Add(udpEchoWait))
			for !got {
				n, err := c.Read(buf)
				if errors.Is(err, os.ErrDeadlineExceeded) {
					break
				}
				if err != nil {
					t.Fatalf("read echo of datagram %d: %v", i, err)
				}
				if bytes.Equal(buf[:n], msg) {
					got = true
					break
				}
				j, ok := bySize[n]
				if !ok || j > i || !bytes.Equal(buf[:n], udpPayload(j)) {
					t.Fatalf("waiting for datagram %d (%d bytes): got %d bytes that match nothing sent", i, len(msg), n)
				}
				late++
			}
		}
		if !got {
			lost++
			if len(lostFirst) < 10 {
				lostFirst = append(lostFirst, i)
			}
		}
	}
	took := time.Since(start)
	t.Logf("%d datagrams of 1..%d bytes to %s in %v: %d echoed intact, %d resends (loss), %d late echoes, %d never echoed",
		udpEchoCount, udpMaxPayload, dst, took.Round(time.Millisecond), udpEchoCount-lost, resent, late, lost)
	if lost > 0 {
		t.Errorf("%d of %d datagrams never echoed after %d tries each (first: %v)", lost, udpEchoCount, udpEchoTries, lostFirst)
	}
}

// testDigUDP asks dnsmasq in the server namespace over UDP, with dig in the
// client namespace: DNS is ordinary UDP when netstackd's DNS is off, and
// the answer must be dnsmasq's. dnsmasq must have logged the query as
// coming from from: the daemon directly, or the proxy.
func testDigUDP(t *testing.T, tp *netnstest.Topology, dnsmasq *netnstest.Process, from netip.Addr) {
	r := tp.Client.Exec(t, 15*time.Second, "dig", "+time=2", "+tries=2", "+short",
		"@"+netnstest.ServerIPv4.String(), "-p", "53", dnsName, "A")
	if r.Err != nil || strings.TrimSpace(r.Stdout) != dnsNameAddr.String() {
		t.Errorf("dig %s = %q, want %s: %s", dnsName, strings.TrimSpace(r.Stdout), dnsNameAddr, r)
	}
	var last string
	for _, line := range strings.Split(dnsmasq.Log(), "\n") {
		if strings.Contains(line, "query[A] "+dnsName+" from ") {
			last = line
		}
	}
	if !strings.HasSuffix(last, " from "+from.String()) {
		t.Errorf("dnsmasq's last query for %s: %q, want one from %s", dnsName, last, from)
	}
}

var pingReceived = regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`)

// testPing pings dst from the client namespace three times and wants every
// reply (wantReplies) or none. With reachServer the server namespace's
// kernel must count the three echo requests (they were forwarded), without
// it none (the stack answered, or nothing did).
func testPing(t *testing.T, tp *netnstest.Topology, dst netip.Addr, wantReplies, reachServer bool) {
	const count = 3
	before := tp.Server.InEchos(t, dst.Is6())
	r := tp.Client.Exec(t, 20*time.Second, "ping", "-n", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "2", dst.String())
	seen := tp.Server.InEchos(t, dst.Is6()) - before
	m := pingReceived.FindStringSubmatch(r.Stdout)
	if m == nil {
		t.Fatalf("ping %s: no summary line: %s", dst, r)
	}
	received := m[2]
	t.Logf("ping %s: %s of %d replies after %v; the server's kernel got %d echo requests",
		dst, received, count, r.Elapsed.Round(time.Millisecond), seen)
	switch {
	case wantReplies && (r.ExitCode != 0 || received != fmt.Sprint(count)):
		t.Errorf("ping %s: %s of %d replies (exit %d), want all: %s", dst, received, count, r.ExitCode, r)
	case !wantReplies && received != "0":
		t.Errorf("ping %s: %s replies, want none (nothing holds that address): %s", dst, received, r)
	}
	switch {
	case reachServer && seen < count:
		t.Errorf("ping %s: the server's kernel got %d echo requests, want %d: they were not forwarded", dst, seen, count)
	case !reachServer && seen != 0:
		t.Errorf("ping %s: the server's kernel got %d echo requests, want none", dst, seen)
	}
}

// testUDPMapping sends from one unconnected socket in the client namespace
// to two echo servers. Each reply must come from the server it answers (the
// true source), and both servers must have seen the same source address
// and port, on the address via: one association per client source whatever
// the destinations (endpoint-independent mapping, RFC 4787 REQ-1), as QUIC
// and STUN need.
func testUDPMapping(t *testing.T, tp *netnstest.Topology, echo *netnstest.UDPEcho, a, b netip.AddrPort, via netip.Addr) {
	network, laddr := "udp4", "0.0.0.0:0"
	if a.Addr().Is6() {
		network, laddr = "udp6", "[::]:0"
	}
	pc, err := tp.Client.ListenPacket(network, laddr)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	c := pc.(*net.UDPConn)
	echo.Reset()
	buf := make([]byte, 2048)
	for round := range 3 {
		for _, dst := range []netip.AddrPort{a, b} {
			msg := fmt.Appendf(nil, "round %d to %s", round, dst)
			if _, err := c.WriteToUDPAddrPort(msg, dst); err != nil {
				t.Fatalf("send to %s: %v", dst, err)
			}
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			n, from, err := c.ReadFromUDPAddrPort(buf)
			if err != nil {
				t.Fatalf("echo from %s (round %d): %v", dst, round, err)
			}
			from = netip.AddrPortFrom(from.Addr().Unmap(), from.Port())
			if from != dst || !bytes.Equal(buf[:n], msg) {
				t.Errorf("round %d: sent %q to %s, got %q from %s", round, msg, dst, buf[:n], from)
			}
		}
	}
	sa, sb := echo.Sources(a), echo.Sources(b)
	t.Logf("client %s; %s saw %v, %s saw %v", c.LocalAddr(), a, sa, b, sb)
	if len(sa) != 1 || len(sb) != 1 {
		t.Fatalf("each server should see exactly one source: %s saw %v, %s saw %v", a, sa, b, sb)
	}
	if sa[0] != sb[0] {
		t.Errorf("one client socket reached %s from %s but %s from %s: the mapping depends on the destination", a, sa[0], b, sb[0])
	}
	if sa[0].Addr() != via {
		t.Errorf("the servers saw the client come from %s, want %s", sa[0].Addr(), via)
	}
}

// testUDPSegment sends udpSegmentCount datagrams of udpSegmentSize bytes
// in one send with UDP_SEGMENT (the client's kernel hands the TUN one USO
// packet, which netstackd must cut) to the echo server at dst, and wants
// every one back intact, each as a datagram of its own. Lost datagrams are
// asked for again, the whole send at most udpEchoTries times.
func testUDPSegment(t *testing.T, tp *netnstest.Topology, dst netip.AddrPort) {
	const udpSegmentCount, udpSegmentSize = 10, 1000
	ctx := netnstest.TestContext(t, 30*time.Second)
	c, err := tp.Client.DialContext(ctx, "udp", dst.String())
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	uc := c.(*net.UDPConn)
	msg := make([]byte, udpSegmentCount*udpSegmentSize)
	for i := range msg {
		msg[i] = byte(i/udpSegmentSize*37 + i*11)
	}
	// struct cmsghdr with SOL_UDP, UDP_SEGMENT and the segment size.
	oob := make([]byte, unix.CmsgSpace(2))
	h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
	h.Level, h.Type = unix.SOL_UDP, unix.UDP_SEGMENT
	h.SetLen(unix.CmsgLen(2))
	binary.NativeEndian.PutUint16(oob[unix.CmsgLen(0):], udpSegmentSize)

	got := make(map[int]bool)
	buf := make([]byte, 64<<10)
	for try := 0; try < udpEchoTries && len(got) < udpSegmentCount; try++ {
		if _, _, err := uc.WriteMsgUDP(msg, oob, nil); err != nil {
			if errors.Is(err, unix.EIO) || errors.Is(err, unix.EINVAL) {
				t.Skipf("the client's kernel refuses UDP_SEGMENT on the TUN: %v", err)
			}
			t.Fatalf("send %d datagrams with UDP_SEGMENT: %v", udpSegmentCount, err)
		}
		for len(got) < udpSegmentCount {
			uc.SetReadDeadline(time.Now().Add(udpEchoWait))
			n, err := uc.Read(buf)
			if errors.Is(err, os.ErrDeadlineExceeded) {
				break
			}
			if err != nil {
				t.Fatalf("read echo: %v", err)
			}
			if n != udpSegmentSize {
				t.Fatalf("echo of %d bytes, want %d: the datagrams were not cut apart (or were joined)", n, udpSegmentSize)
			}
			i := -1
			for k := range udpSegmentCount {
				if bytes.Equal(buf[:n], msg[k*udpSegmentSize:(k+1)*udpSegmentSize]) {
					i = k
					break
				}
			}
			if i < 0 {
				t.Fatalf("an echo of %d bytes matches none of the datagrams sent: damaged", n)
			}
			got[i] = true
		}
	}
	if len(got) < udpSegmentCount {
		t.Fatalf("%d of %d datagrams echoed after %d sends", len(got), udpSegmentCount, udpEchoTries)
	}
}

// testUDPRefused sends from a connected socket in the client namespace to
// dst, where nothing will take the datagrams, and wants ECONNREFUSED (an
// ICMP port unreachable relayed by netstackd) within refuseWithin.
func testUDPRefused(t *testing.T, tp *netnstest.Topology, dst netip.AddrPort) {
	ctx := netnstest.TestContext(t, 10*time.Second)
	c, err := tp.Client.DialContext(ctx, "udp", dst.String())
	if err != nil {
		t.Fatalf("dial %s: %v", dst, err)
	}
	defer c.Close()
	start := time.Now()
	buf := make([]byte, 2048)
	var last error
	for time.Since(start) < refuseWithin {
		// The error of a datagram is reported by a later call: send again
		// now and then while waiting.
		if _, err := c.Write([]byte("anyone there?")); err != nil {
			last = err
			if errors.Is(err, syscall.ECONNREFUSED) {
				break
			}
			t.Fatalf("send to %s: %v", dst, err)
		}
		c.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		n, err := c.Read(buf)
		last = err
		if err == nil {
			t.Fatalf("got a %d-byte reply from %s, want ECONNREFUSED", n, dst)
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			break
		}
	}
	took := time.Since(start)
	if !errors.Is(last, syscall.ECONNREFUSED) || took > refuseWithin {
		t.Errorf("UDP to %s: %v after %v, want ECONNREFUSED within %v", dst, last, took.Round(time.Millisecond), refuseWithin)
		return
	}
	t.Logf("UDP to %s refused after %v", dst, took.Round(time.Millisecond))
}
