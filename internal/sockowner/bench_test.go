package sockowner

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// BenchmarkLookup measures a lookup of a child's TCP connection and of its
// UDP socket that never connected: the uid alone (one netlink round trip),
// and with the executable when the inode was just seen (cached), when its
// process owned a recent socket (recent), and from nothing (scan: every
// process: the child is the newest, so among the first of its uid's
// processes, and root's are most of the host's; nobody: an inode no process
// holds, the worst case, every descriptor of the host). The scans report
// the host's processes and descriptors. netlink/* compare
// holding one sock_diag socket with opening one per lookup.
func BenchmarkLookup(b *testing.B) {
	ns := netnstest.NewNetns(b)
	f := newFinder(b, ns)
	srv := startServer(b, ns, netip.MustParseAddr("127.0.0.1"))
	startChild(b, ns.Path, uidNobody, modeTCP, srv.tcpAddr(), false)
	tcpLocal := srv.accept(b)
	startChild(b, ns.Path, uidOther, modeUDPUnbound, srv.udpAddr(), false)
	udpLocal := srv.receive(b)
	// Root's connection: a scan for it reads root's processes first, most
	// of the host's, before reaching the child's.
	startChild(b, ns.Path, 0, modeTCP, srv.tcpAddr(), false)
	rootLocal := srv.accept(b)

	lookups := []struct {
		name          string
		proto         string
		local, remote netip.AddrPort
	}{
		{"tcp4", "tcp", tcpLocal, srv.tcpAddr()},
		{"udp4-unbound", "udp", udpLocal, srv.udpAddr()},
	}
	ctx := context.Background()
	for _, l := range lookups {
		b.Run("uid/"+l.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := f.UID(ctx, l.proto, l.local, l.remote); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	l := lookups[0]
	forgetAll := func() {
		f.procs.mu.Lock()
		clear(f.procs.byInode)
		f.procs.recent = f.procs.recent[:0]
		f.procs.mu.Unlock()
	}
	for _, tc := range []struct {
		name   string
		local  netip.AddrPort
		forget func()
	}{
		{"cached", l.local, func() {}},
		{"recent", l.local, func() { f.procs.mu.Lock(); clear(f.procs.byInode); f.procs.mu.Unlock() }},
		{"scan/uid-65534", l.local, forgetAll},
		{"scan/uid-0", rootLocal, forgetAll},
	} {
		b.Run("exe/"+tc.name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				tc.forget()
				if _, err := f.Lookup(ctx, l.proto, tc.local, l.remote); err != nil {
					b.Fatal(err)
				}
			}
			if strings.HasPrefix(tc.name, "scan") {
				reportScan(b)
			}
		})
	}

	// The worst case: an inode no process holds, so every descriptor of
	// the host is looked at (the children above hold theirs).
	b.Run("exe/scan/nobody", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			forgetAll()
			if _, _, err := f.procs.find(ctx, 1, uidOther); !errors.Is(err, ErrNotFound) {
				b.Fatal(err)
			}
		}
		reportScan(b)
	})

	deadline := time.Now().Add(time.Second)
	b.Run("netlink/held", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			f.mu.Lock()
			_, err := f.conn.query(6, l.local, l.remote, deadline)
			f.mu.Unlock()
			if err != nil {
				b.Fatal(err)
			}
		}
	})
	// The loop runs inside the namespace, so only the socket's opening and
	// closing add to a lookup, as they would in the daemon.
	b.Run("netlink/open-per-call", func(b *testing.B) {
		b.ReportAllocs()
		err := ns.Do(func() error {
			for range b.N {
				c, err := newDiagConn()
				if err != nil {
					return err
				}
				_, err = c.query(6, l.local, l.remote, deadline)
				c.close()
				if err != nil {
					return err
				}
			}
			return nil
		})
		if err != nil {
			b.Fatal(err)
		}
	})
}

// reportScan reports how many processes and descriptors the host has,
// which a full scan reads.
func reportScan(b *testing.B) {
	procs, fds := countFDs()
	b.ReportMetric(float64(procs), "procs")
	b.ReportMetric(float64(fds), "fds")
}

// countFDs counts the processes in /proc and the descriptors they hold,
// which is what a full scan reads.
func countFDs() (procs, fds int) {
	ents, _ := os.ReadDir(procRoot)
	for _, e := range ents {
		if _, err := strconv.Atoi(e.Name()); err != nil {
			continue
		}
		procs++
		fd, _ := os.ReadDir(procRoot + "/" + e.Name() + "/fd")
		fds += len(fd)
	}
	return procs, fds
}
