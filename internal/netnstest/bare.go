package netnstest

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Helpers for tests that make TUN devices and links themselves and want a
// namespace exactly as the kernel makes it, and the tools to look into it.

// NewBareNetns creates a network namespace with nothing in it but lo, left
// down, and deletes it in t.Cleanup, also when t fails. prefix (lowercase
// letters and digits) tells the test's namespaces apart in `ip netns list`;
// the name also holds the test binary's PID, so parallel tests and test
// binaries never share one, and a namespace left by a killed binary is
// deleted by the next helper that sweeps. It returns the name, for `ip -n`,
// and the path under /run/netns, for setns(2) and a netns path in a
// configuration. It skips t when not root or without ip.
func NewBareNetns(t testing.TB, prefix string) (name, path string) {
	t.Helper()
	RequireRoot(t)
	RequireCommand(t, "ip", "iproute2")
	sweepStale(t)
	name = fmt.Sprintf("%s-%d-%d-%s", namePrefix, os.Getpid(), topoSeq.Add(1), prefix)
	mustIP(t, "netns", "add", name)
	t.Cleanup(func() { deleteNetns(t, name) })
	return name, "/run/netns/" + name
}

// IP runs `ip ARGS...`, bounded by CommandTimeout and t's context, fails t
// if it fails, and returns its output. It skips t without ip.
func IP(t testing.TB, args ...string) string {
	t.Helper()
	RequireCommand(t, "ip", "iproute2")
	ctx, cancel := context.WithTimeout(t.Context(), CommandTimeout)
	defer cancel()
	out, err := ipOutput(ctx, args...)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// NetlinkHandle returns an rtnetlink handle acting in the namespace at
// netnsPath ("" for the test's own), closed in t.Cleanup. The handle's
// socket is opened on a thread inside the namespace and stays bound to it,
// whichever thread uses it later.
func NetlinkHandle(t testing.TB, netnsPath string) *netlink.Handle {
	t.Helper()
	open := func() (*netlink.Handle, error) { return netlink.NewHandle(unix.NETLINK_ROUTE) }
	var h *netlink.Handle
	var err error
	if netnsPath == "" {
		h, err = open()
	} else {
		n := Netns{Name: strings.TrimPrefix(netnsPath, "/run/netns/"), Path: netnsPath}
		err = n.Do(func() error {
			var err error
			h, err = open()
			return err
		})
	}
	if err != nil {
		t.Fatalf("netlink handle in %q: %v", netnsPath, err)
	}
	t.Cleanup(h.Close)
	return h
}
