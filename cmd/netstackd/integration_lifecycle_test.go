package main_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// The TestTUNDeletedExits tests: when the TUN interface disappears under
// netstackd (`ip link del`), the daemon has nothing left to serve and must
// exit non-zero soon, saying which interface went, rather than keep running
// with a reader that has stopped. Until the daemon watches for that, these
// tests fail: it logs the read error and stays up.

// tunGoneWithin is how soon after the TUN's deletion netstackd must exit.
const tunGoneWithin = 2 * time.Second

// TestTUNDeletedExitsNetns: the TUN lives in the client namespace
// (--netns) and is deleted there.
func TestTUNDeletedExitsNetns(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	p := startNetstackd(t, tp, "--dns", "off")
	deleteTUNExpectExit(t, p, tp.Client, tunName)
}

// TestTUNDeletedExitsOwnNamespace: netstackd creates a plain TUN in its own
// namespace (no --netns, no routes) and it is deleted there.
func TestTUNDeletedExitsOwnNamespace(t *testing.T) {
	requireBinary(t)
	const name = "nsdgone0"
	ns := netnstest.NewNetns(t)
	notify := netnstest.ListenNotify(t)
	t.Setenv("NOTIFY_SOCKET", notify.Path)
	p := ns.Start(t, netstackdBin, "--tun", name, "--dns", "off", "--log-level", "debug")
	t.Cleanup(func() {
		if log := p.Log(); strings.Contains(log, "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race:\n%s", p, log)
		}
	})
	notify.WaitReady(netnstest.TestContext(t, 20*time.Second), t, p)
	deleteTUNExpectExit(t, p, ns, name)
}

// deleteTUNExpectExit deletes the link ifname in ns under the running
// netstackd p, and checks that p then exits within tunGoneWithin with a
// non-zero status and, in what it logged after the deletion, the
// interface's name.
func deleteTUNExpectExit(t *testing.T, p *netnstest.Process, ns netnstest.Netns, ifname string) {
	t.Helper()
	ctx := netnstest.TestContext(t, 20*time.Second)
	if ok, err := ns.HasLink(ctx, ifname); !ok || err != nil {
		t.Fatalf("no link %s in %s before the deletion (%v)", ifname, ns, err)
	}
	select {
	case <-p.Done():
		t.Fatalf("%s exited before the TUN was deleted:\n%s", p, p.Log())
	default:
	}
	before := len(p.Log())

	delCtx, cancel := context.WithTimeout(ctx, netnstest.CommandTimeout)
	defer cancel()
	if out, err := exec.CommandContext(delCtx, "ip", "-n", ns.Name, "link", "del", ifname).CombinedOutput(); err != nil {
		t.Fatalf("ip -n %s link del %s: %v: %s", ns, ifname, err, out)
	}
	deleted := time.Now()

	st := p.Wait(tunGoneWithin)
	after := p.Log()[before:]
	switch {
	case st == nil:
		t.Fatalf("%s still running %v after %s was deleted; it logged since:\n%s", p, tunGoneWithin, ifname, after)
	case !st.Exited() || st.ExitCode() == 0:
		t.Errorf("%s ended with %v after %s was deleted, want a non-zero exit status:\n%s", p, st, ifname, after)
	case strings.Contains(after, "panic:"):
		t.Errorf("%s panicked after %s was deleted:\n%s", p, ifname, after)
	}
	if !strings.Contains(after, ifname) {
		t.Errorf("%s did not name %s in what it logged after the deletion:\n%s", p, ifname, after)
	}
	t.Logf("%s exited with %v %v after %s was deleted", p, st, time.Since(deleted).Round(time.Millisecond), ifname)
}
