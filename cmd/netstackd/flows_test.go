package main

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/stack"
	"github.com/netstackd/netstackd/tundev"
)

// flowsRig is a real Stack on a SOCK_SEQPACKET socketpair (a device that
// keeps packet boundaries, as a TUN does; no root needed), relaying UDP
// to a loopback echo server, with the far end of the pair standing in
// for the client behind the TUN.
type flowsRig struct {
	st   *stack.Stack
	far  int            // the client's end of the device
	echo netip.AddrPort // the UDP echo server on loopback
}

func newFlowsRig(t *testing.T) *flowsRig {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatalf("socketpair: %v", err)
	}
	dev, err := tundev.FromFile(os.NewFile(uintptr(fds[0]), "device"), 1500)
	if err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		t.Fatalf("device from socketpair: %v", err)
	}
	st, err := stack.New(stack.Config{Device: dev, Dialer: &net.Dialer{}, UDP: &net.ListenConfig{}})
	if err != nil {
		dev.Close()
		unix.Close(fds[1])
		t.Fatalf("new stack: %v", err)
	}
	echo, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatalf("listen udp: %v", err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := echo.ReadFromUDPAddrPort(buf)
			if err != nil {
				return
			}
			echo.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	t.Cleanup(func() {
		st.Close()
		unix.Close(fds[1])
		echo.Close()
		wg.Wait()
	})
	return &flowsRig{st: st, far: fds[1], echo: echo.LocalAddr().(*net.UDPAddr).AddrPort()}
}

// udpRoundTrip sends payload from client to the echo server through the
// stack and waits for the echo, bounded.
func (r *flowsRig) udpRoundTrip(t *testing.T, client netip.AddrPort, payload []byte) {
	t.Helper()
	if _, err := unix.Write(r.far, ipv4UDP(client, r.echo, payload)); err != nil {
		t.Fatalf("write packet: %v", err)
	}
	buf := make([]byte, 65536)
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		fds := []unix.PollFd{{Fd: int32(r.far), Events: unix.POLLIN}}
		if n, _ := unix.Poll(fds, 100); n <= 0 {
			continue
		}
		n, err := unix.Read(r.far, buf)
		if err != nil {
			t.Fatalf("read packet: %v", err)
		}
		// The echo: UDP (17) back to client, carrying payload.
		if n >= 28 && buf[9] == 17 && bytes.Equal(buf[28:n], payload) {
			return
		}
	}
	t.Fatal("no echo came back through the stack")
}

// waitCounts waits until the association of client has counted n bytes
// each way: the echo may reach the client a moment before the count of
// what was delivered to it.
func (r *flowsRig) waitCounts(t *testing.T, client netip.AddrPort, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(time.Millisecond) {
		for _, f := range r.st.Flows(0) {
			if f.Client == client && f.Up == uint64(n) && f.Down == uint64(n) {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("association of %s never counted %d bytes each way: %+v", client, n, r.st.Flows(0))
		}
	}
}

// ipv4UDP builds an IPv4 UDP packet; a zero UDP checksum means none
// (RFC 768).
func ipv4UDP(src, dst netip.AddrPort, payload []byte) []byte {
	pkt := make([]byte, 28+len(payload))
	pkt[0] = 0x45
	binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
	pkt[8] = 64
	pkt[9] = 17
	s, d := src.Addr().As4(), dst.Addr().As4()
	copy(pkt[12:], s[:])
	copy(pkt[16:], d[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(pkt[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(pkt[10:], ^uint16(sum))
	binary.BigEndian.PutUint16(pkt[20:], src.Port())
	binary.BigEndian.PutUint16(pkt[22:], dst.Port())
	binary.BigEndian.PutUint16(pkt[24:], uint16(8+len(payload)))
	copy(pkt[28:], payload)
	return pkt
}

func getFlows(t *testing.T, url string) []flowJSON {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "application/json" {
		t.Fatalf("GET %s: %s, %q", url, resp.Status, resp.Header.Get("Content-Type"))
	}
	var flows []flowJSON
	if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil {
		t.Fatalf("GET %s: decode: %v", url, err)
	}
	return flows
}

func request(t *testing.T, method, url string) int {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, url, err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode
}

// TestFlowsHandler: GET /flows lists a live association of a real stack
// with its byte counts; DELETE /flows/ID ends it (204), then knows it no
// more (404); other methods get 405 and malformed input 400.
func TestFlowsHandler(t *testing.T) {
	r := newFlowsRig(t)
	srv := httptest.NewServer(newFlowsHandler(r.st))
	defer srv.Close()
	base := srv.URL + "/flows"

	if flows := getFlows(t, base); len(flows) != 0 {
		t.Fatalf("flows of an idle stack: %+v", flows)
	}
	client := netip.MustParseAddrPort("198.18.0.1:40000")
	msg := []byte("hello, flows")
	r.udpRoundTrip(t, client, msg)
	r.udpRoundTrip(t, client, msg)
	r.waitCounts(t, client, 2*len(msg))
	flows := getFlows(t, base)
	if len(flows) != 1 {
		t.Fatalf("GET /flows: %+v, want one association", flows)
	}
	f := flows[0]
	want := uint64(2 * len(msg))
	if f.ID == 0 || f.Proto != "udp" || f.Direction != "outbound" || f.Client != client.String() ||
		f.Destination != r.echo.String() || f.UpBytes != want || f.DownBytes != want || f.State != "open" || f.AgeSeconds <= 0 {
		t.Fatalf("GET /flows: %+v", f)
	}

	for _, c := range []struct {
		method, path string
		want         int
	}{
		{http.MethodGet, "/flows?max=0", http.StatusBadRequest},
		{http.MethodGet, "/flows?max=many", http.StatusBadRequest},
		{http.MethodGet, "/flows?max=100000", http.StatusOK}, // capped, not refused
		{http.MethodPost, "/flows", http.StatusMethodNotAllowed},
		{http.MethodPut, "/flows/" + strconv.FormatUint(f.ID, 10), http.StatusMethodNotAllowed},
		{http.MethodGet, "/flows/" + strconv.FormatUint(f.ID, 10), http.StatusMethodNotAllowed},
		{http.MethodDelete, "/flows/flow", http.StatusBadRequest},
		{http.MethodDelete, "/flows/" + strconv.FormatUint(f.ID+1000, 10), http.StatusNotFound},
	} {
		if got := request(t, c.method, srv.URL+c.path); got != c.want {
			t.Errorf("%s %s: %d, want %d", c.method, c.path, got, c.want)
		}
	}
	if flows := getFlows(t, base); len(flows) != 1 {
		t.Fatalf("the association did not survive the bad requests: %+v", flows)
	}
	del := base + "/" + strconv.FormatUint(f.ID, 10)
	if got := request(t, http.MethodDelete, del); got != http.StatusNoContent {
		t.Fatalf("DELETE %s: %d, want 204", del, got)
	}
	if flows := getFlows(t, base); len(flows) != 0 {
		t.Fatalf("GET /flows after DELETE: %+v", flows)
	}
	if got := request(t, http.MethodDelete, del); got != http.StatusNotFound {
		t.Fatalf("second DELETE %s: %d, want 404", del, got)
	}
}

// TestFlowsHandlerMax: ?max bounds the answer, the lowest ids first.
func TestFlowsHandlerMax(t *testing.T) {
	r := newFlowsRig(t)
	srv := httptest.NewServer(newFlowsHandler(r.st))
	defer srv.Close()
	for port := range uint16(4) {
		r.udpRoundTrip(t, netip.AddrPortFrom(netip.MustParseAddr("198.18.0.1"), 40000+port), []byte("x"))
	}
	all := getFlows(t, srv.URL+"/flows")
	if len(all) != 4 {
		t.Fatalf("%d flows, want 4", len(all))
	}
	two := getFlows(t, srv.URL+"/flows?max=2")
	if len(two) != 2 || two[0].ID != all[0].ID || two[1].ID != all[1].ID {
		t.Fatalf("?max=2: %+v, want the first two of %+v", two, all)
	}
}

// TestFlowsCommand: `netstackd flows` reads a real handler over loopback
// and prints the flow; --close resets it, and a second --close fails.
func TestFlowsCommand(t *testing.T) {
	r := newFlowsRig(t)
	srv := httptest.NewServer(newFlowsHandler(r.st)) // on 127.0.0.1
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	client := netip.MustParseAddrPort("198.18.0.1:40001")
	r.udpRoundTrip(t, client, bytes.Repeat([]byte{1}, 1400))
	r.waitCounts(t, client, 1400)

	var out, errOut bytes.Buffer
	if code := run([]string{"flows", "--metrics", addr}, &out, &errOut); code != exitOK {
		t.Fatalf("flows: exit %d: %s", code, errOut.String())
	}
	lines := strings.Split(strings.TrimRight(out.String(), "\n"), "\n")
	if len(lines) != 2 || !strings.HasPrefix(lines[0], "ID ") {
		t.Fatalf("flows printed:\n%s", out.String())
	}
	fields := strings.Fields(lines[1])
	// ID PROTO CLIENT DESTINATION UPSTREAM UP(2) DOWN(2) AGE STATE RULE
	if len(fields) != 12 || fields[1] != "udp" || fields[2] != client.String() || fields[3] != r.echo.String() ||
		fields[4] != "-" || fields[5]+" "+fields[6] != "1.4 KiB" || fields[7]+" "+fields[8] != "1.4 KiB" || fields[10] != "open" {
		t.Fatalf("flow row %q", lines[1])
	}
	id := fields[0]

	out.Reset()
	if code := run([]string{"flows", "--metrics", addr, "--close", id}, &out, &errOut); code != exitOK {
		t.Fatalf("flows --close %s: exit %d: %s", id, code, errOut.String())
	}
	if got := r.st.Flows(0); len(got) != 0 {
		t.Fatalf("flows after --close: %+v", got)
	}
	errOut.Reset()
	if code := run([]string{"flows", "--metrics", addr, "--close", id}, &out, &errOut); code != exitFail ||
		!strings.Contains(errOut.String(), "no such live flow") {
		t.Fatalf("second --close %s: exit %d: %s", id, code, errOut.String())
	}
}

// TestFlowsCommandErrors: bad arguments are usage errors; no listener is a
// failure that says what to check.
func TestFlowsCommandErrors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String()
	ln.Close() // nothing listens there now
	for _, c := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"flows", "--metrics", "nohostport"}, exitUsage, `port "nohostport" is not a number`},
		{[]string{"flows", "--close", "x1"}, exitUsage, "want a flow id"},
		{[]string{"flows", "--max", "0"}, exitUsage, "want a positive number"},
		{[]string{"flows", "extra"}, exitUsage, "unexpected argument"},
		{[]string{"flows", "--metrics", closed}, exitFail, "is netstackd running with --metrics?"},
	} {
		var out, errOut bytes.Buffer
		code := run(c.args, &out, &errOut)
		if code != c.code || !strings.Contains(errOut.String(), c.msg) {
			t.Errorf("%q: exit %d, %q; want exit %d and %q", c.args, code, errOut.String(), c.code, c.msg)
		}
	}
	// The address is read as the daemon's --metrics reads it.
	for in, want := range map[string]string{"9090": "http://127.0.0.1:9090/flows", ":9090": "http://127.0.0.1:9090/flows", "[::1]:9090": "http://[::1]:9090/flows"} {
		if got, err := flowsURL(in); got != want || err != nil {
			t.Errorf("flowsURL(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	var out bytes.Buffer
	if code := run([]string{"flows", "--help"}, &out, io.Discard); code != exitOK || !strings.Contains(out.String(), "--close ID") {
		t.Errorf("flows --help: exit %d, %q", code, out.String())
	}
}

// TestPrintFlows: the table a person reads, column by column.
func TestPrintFlows(t *testing.T) {
	flows := []flowJSON{
		{ID: 7, Proto: "tcp", Direction: "outbound", Client: "10.0.0.2:51000", Destination: "198.18.0.5:443",
			Name: "example.test", Upstream: "127.0.0.1:1080", Via: "a", UpBytes: 1234, DownBytes: 5 << 20, AgeSeconds: 75.4, State: "idle"},
		{ID: 12, Proto: "udp", Direction: "outbound", Client: "10.0.0.2:5353", Destination: "192.0.2.1:53",
			UpBytes: 40, DownBytes: 0, AgeSeconds: 0.2, State: "open", Via: "b", Rule: `rule 2 "port:53=proxy:b"`},
		{ID: 13, Proto: "tcp", Direction: "outbound", Client: "10.0.0.2:5400", Destination: "192.0.2.9:443",
			Name: "sni.test", NameFrom: "sniffed", Via: "direct", AgeSeconds: 1, State: "open", Rule: `rule 10 "domain:sni.test=direct"`},
		{ID: 130, Proto: "tcp", Direction: "inbound", Client: "203.0.113.9:40000", Destination: "10.0.0.2:80",
			UpBytes: 3 << 30, DownBytes: 1023, AgeSeconds: 3723, State: "half-closed"},
	}
	want := `ID   PROTO   CLIENT             DESTINATION                       UPSTREAM          UP       DOWN     AGE     STATE        RULE
7    tcp     10.0.0.2:51000     example.test (198.18.0.5:443)     a=127.0.0.1:1080  1.2 KiB  5.0 MiB  1m15s   idle         -
12   udp     10.0.0.2:5353      192.0.2.1:53                      b                 40 B     0 B      0s      open         2
13   tcp     10.0.0.2:5400      sni.test (sniffed 192.0.2.9:443)  direct            0 B      0 B      1s      open         10
130  tcp-in  203.0.113.9:40000  10.0.0.2:80                       -                 3.0 GiB  1023 B   1h2m3s  half-closed  -
`
	var out bytes.Buffer
	if err := printFlows(&out, flows); err != nil {
		t.Fatal(err)
	}
	if out.String() != want {
		t.Errorf("table:\n%s\nwant:\n%s", out.String(), want)
	}
}

func TestHumanBytes(t *testing.T) {
	for _, c := range []struct {
		n    uint64
		want string
	}{
		{0, "0 B"}, {1023, "1023 B"}, {1024, "1.0 KiB"}, {10 * 1024, "10 KiB"}, {1536, "1.5 KiB"},
		{1 << 20, "1.0 MiB"}, {1<<20 - 1, "1024 KiB"}, {250 << 30, "250 GiB"}, {1 << 60, "1.0 EiB"},
		{^uint64(0), "16 EiB"},
	} {
		if got := humanBytes(c.n); got != c.want {
			t.Errorf("humanBytes(%d) = %q, want %q", c.n, got, c.want)
		}
	}
}

// TestPrintUpstreams: the upstreams' table netstackd flows prints above
// the flows.
func TestPrintUpstreams(t *testing.T) {
	ups := []upstreamJSON{
		{Name: "a", URL: "socks5://127.0.0.1:1080", State: "down", Error: "connection refused", Since: "2026-12-04T16:02:11Z"},
		{Name: "b", URL: "http://10.0.0.2:3128", State: "up", Since: "2026-12-04T16:02:11Z", FlowsActive: 3},
	}
	want := `UPSTREAM  STATE  SINCE                 FLOWS  URL                      ERROR
a         down   2026-12-04T16:02:11Z  0      socks5://127.0.0.1:1080  connection refused
b         up     2026-12-04T16:02:11Z  3      http://10.0.0.2:3128     -

`
	var out bytes.Buffer
	if err := printUpstreams(&out, ups); err != nil {
		t.Fatal(err)
	}
	if out.String() != want {
		t.Errorf("table:\n%q\nwant:\n%q", out.String(), want)
	}
}
