package netnstest_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/netstackd/netstackd/internal/netnstest"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// The harness is checked without netstackd: from the daemon namespace, which
// reaches the server namespace over the veth, every server answers, directly
// and through microsocks; the client namespace reaches nothing.
func TestTopology(t *testing.T) {
	tp := netnstest.New(t)
	tp.StartServers(t)
	socks4 := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort)
	socks6 := netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.SocksPort)
	tp.StartMicrosocks(t, socks4)
	tp.StartMicrosocks(t, socks6)

	for _, ip := range []netip.Addr{netnstest.ServerIPv4, netnstest.ServerIPv6} {
		fam := "ipv4"
		if ip.Is6() {
			fam = "ipv6"
		}
		httpURL := "http://" + netip.AddrPortFrom(ip, netnstest.HTTPPort).String()
		t.Run(fam, func(t *testing.T) {
			for _, via := range []struct {
				name string
				args []string
			}{
				{"direct", nil},
				{"socks4", []string{"--socks5", socks4.String()}},
				{"socks6", []string{"--socks5", socks6.String()}},
			} {
				t.Run(via.name, func(t *testing.T) {
					curl := func(args ...string) *netnstest.Result {
						t.Helper()
						a := append([]string{"curl", "-sS", "-g", "--max-time", "10"}, via.args...)
						return tp.Daemon.Exec(t, 15*time.Second, append(a, args...)...)
					}
					if r := curl(httpURL + "/"); r.Err != nil || r.Stdout != netnstest.HelloBody {
						t.Errorf("GET /: %s", r)
					}
					const n = 1 << 20
					if r := curl(httpURL + "/bytes?n=1048576"); r.Err != nil || !bytes.Equal([]byte(r.Stdout), readAll(t, netnstest.Bytes(n))) {
						t.Errorf("GET /bytes: %v, %d bytes", r.Err, len(r.Stdout))
					}
					want := netnstest.BytesSHA256(n)
					body := readAll(t, netnstest.Bytes(n))
					r := tp.Daemon.ExecInput(t, 15*time.Second, bytes.NewReader(body),
						append(append([]string{"curl", "-sS", "-g", "--max-time", "10"}, via.args...),
							"--data-binary", "@-", httpURL+"/sha256")...)
					if r.Err != nil || r.Stdout != want {
						t.Errorf("POST /sha256 = %q, want %q (%v)", r.Stdout, want, r.Err)
					}
				})
			}

			t.Run("echo", func(t *testing.T) {
				c := dial(t, tp.Daemon, netip.AddrPortFrom(ip, netnstest.EchoPort))
				msg := readAll(t, netnstest.Bytes(16<<10))
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				c.(*net.TCPConn).CloseWrite()
				if got := readAll(t, c); !bytes.Equal(got, msg) {
					t.Errorf("echo returned %d bytes, want the %d sent", len(got), len(msg))
				}
			})
			t.Run("half-close", func(t *testing.T) {
				c := dial(t, tp.Daemon, netip.AddrPortFrom(ip, netnstest.HalfClosePort))
				msg := []byte("some bytes, then FIN")
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				c.(*net.TCPConn).CloseWrite()
				if got := readAll(t, c); !bytes.Equal(got, netnstest.HalfCloseReply(msg)) {
					t.Errorf("half-close server replied %d bytes %.80q..., want HalfCloseReply", len(got), got)
				}
			})
			t.Run("closed-port", func(t *testing.T) {
				ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
				defer cancel()
				_, err := tp.Daemon.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, netnstest.ClosedPort).String())
				if !errors.Is(err, syscall.ECONNREFUSED) {
					t.Errorf("dial closed port: %v, want ECONNREFUSED", err)
				}
			})
			t.Run("client-isolated", func(t *testing.T) {
				ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
				defer cancel()
				_, err := tp.Client.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, netnstest.HTTPPort).String())
				if !errors.Is(err, syscall.ENETUNREACH) {
					t.Errorf("dial from the client namespace without netstackd: %v, want ENETUNREACH", err)
				}
			})
		})
	}

	t.Run("daemon-blackholes", func(t *testing.T) {
		for _, tc := range []struct {
			dst  string
			want error
		}{
			// A blackhole route fails connect(2) with EINVAL, no route at all
			// with ENETUNREACH.
			{"198.18.0.1:80", syscall.EINVAL},
			{"198.19.1.1:80", syscall.EINVAL},
			{"[fd00:1898::1]:80", syscall.EINVAL},
			{"203.0.113.1:80", syscall.ENETUNREACH},
			{"[2001:db8:2::1]:80", syscall.ENETUNREACH},
		} {
			ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
			_, err := tp.Daemon.DialContext(ctx, "tcp", tc.dst)
			cancel()
			if !errors.Is(err, tc.want) {
				t.Errorf("dial %s from the daemon namespace: %v, want %v", tc.dst, err, tc.want)
			}
		}
		for _, ipv6 := range []bool{false, true} {
			if ok, err := tp.Daemon.HasDefaultRoute(t.Context(), ipv6, netnstest.DaemonLink); ok || err != nil {
				t.Errorf("daemon namespace has a default route (ipv6 %v): %v, %v", ipv6, ok, err)
			}
		}
	})
	t.Run("process", func(t *testing.T) {
		p := tp.Server.Start(t, "sleep", "30")
		comm, err := os.ReadFile("/proc/" + strconv.Itoa(p.PID()) + "/comm")
		if err != nil || strings.TrimSpace(string(comm)) != "sleep" {
			t.Errorf("PID %d is %q (%v), want sleep", p.PID(), comm, err)
		}
		start := time.Now()
		st, err := p.Stop(syscall.SIGTERM, 5*time.Second)
		if err != nil || st == nil || st.Sys().(syscall.WaitStatus).Signal() != syscall.SIGTERM {
			t.Errorf("stop sleep: %v, %v", st, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("stop took %v", d)
		}
	})
}

// After a topology's test ends, its namespaces and processes are gone.
func TestCleanup(t *testing.T) {
	netnstest.RequireRoot(t)
	// Here, not in the subtest, whose skip would leave nothing to check.
	netnstest.RequireCommand(t, "microsocks", "microsocks")
	var tp *netnstest.Topology
	var pid int
	t.Run("topology", func(t *testing.T) {
		tp = netnstest.New(t)
		tp.StartServers(t)
		pid = tp.StartMicrosocks(t, netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort)).PID()
	})
	for _, n := range []netnstest.Netns{tp.Server, tp.Daemon, tp.Client} {
		if _, err := os.Stat(n.Path); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s still exists: %v", n.Path, err)
		}
	}
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("microsocks %d still running: kill 0 = %v", pid, err)
	}
}

func dial(t *testing.T, n netnstest.Netns, to netip.AddrPort) net.Conn {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c, err := n.DialContext(ctx, "tcp", to.String())
	if err != nil {
		t.Fatalf("dial %s from %s: %v", to, n, err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(10 * time.Second))
	return c
}

func readAll(t *testing.T, r io.Reader) []byte {
	t.Helper()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read: %v", err)
	}
	return b
}

// The integration tests rely on Dante to relay a half-close through SOCKS;
// microsocks (1.0.x) closes both sides at the first EOF, so a half-close
// through it loses the reply. This test pins both facts down.
func TestSocksHalfClose(t *testing.T) {
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartMicrosocks(t, netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort))
	tp.StartDante(t)
	for _, tc := range []struct {
		name      string
		socks     netip.AddrPort
		halfClose bool
	}{
		{"microsocks", netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.SocksPort), false},
		{"dante-ipv4", netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.DantePort), true},
		{"dante-ipv6", netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.DantePort), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, target := range []netip.Addr{netnstest.ServerIPv4, netnstest.ServerIPv6} {
				c := dial(t, tp.Daemon, tc.socks)
				socks5Connect(t, c, netip.AddrPortFrom(target, netnstest.HalfClosePort))
				msg := readAll(t, netnstest.Bytes(100<<10))
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				c.(*net.TCPConn).CloseWrite()
				got, err := io.ReadAll(c)
				ok := err == nil && bytes.Equal(got, netnstest.HalfCloseReply(msg))
				if ok != tc.halfClose {
					t.Errorf("to %s: reply after FIN intact = %v (%d bytes, %v), want %v", target, ok, len(got), err, tc.halfClose)
				}
			}
		})
	}
}

// socks5Connect does a no-auth SOCKS5 CONNECT (RFC 1928) to target on c.
func socks5Connect(t *testing.T, c net.Conn, target netip.AddrPort) {
	t.Helper()
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 4)
	if _, err := io.ReadFull(c, b[:2]); err != nil || b[0] != 5 || b[1] != 0 {
		t.Fatalf("socks5 method reply %x: %v", b[:2], err)
	}
	req := []byte{5, 1, 0, 1}
	if target.Addr().Is6() {
		req[3] = 4
	}
	req = append(req, target.Addr().AsSlice()...)
	req = append(req, byte(target.Port()>>8), byte(target.Port()))
	if _, err := c.Write(req); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, b); err != nil || b[0] != 5 || b[1] != 0 {
		t.Fatalf("socks5 connect reply %x: %v", b, err)
	}
	n := map[byte]int{1: 4, 4: 16}[b[3]]
	if n == 0 {
		t.Fatalf("socks5 connect reply with address type %d", b[3])
	}
	if _, err := io.ReadFull(c, make([]byte, n+2)); err != nil {
		t.Fatal(err)
	}
}
