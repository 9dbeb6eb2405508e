package main_test

import (
	"net/netip"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// TestExampleRootlessContainer: as an unprivileged user with no capability,
// rootless-container.sh makes a container namespace with `unshare -rn` and
// serves it with `netstackd --netns PID` (issue 15): curl inside reaches the
// server through microsocks, netstackd's DNS gives the name a fake address,
// and a server inside answers at the published port. Everything happens in
// the daemon namespace, which has no default route; the container is made
// from inside it.
func TestExampleRootlessContainer(t *testing.T) {
	requireBinary(t)
	for _, c := range []string{"setpriv", "unshare", "nsenter"} {
		netnstest.RequireCommand(t, c, "util-linux")
	}
	netnstest.RequireCommand(t, "dig", "dnsutils")
	netnstest.RequireCommand(t, "socat", "socat")
	if msg := userNamespacesForbidden(); msg != "" {
		t.Skip(msg)
	}
	tp := netnstest.New(t)
	tp.StartServers(t)
	socks := tp.StartMicrosocks(t, socks4)
	uid, gid := throwawayUser(t)
	openTUNDevice(t)
	bin := worldExecutableCopy(t, netstackdBin)
	script := worldExecutableCopy(t, examplePath(t, "rootless-container.sh"))
	asUser := []string{"setpriv", "--reuid=" + uid, "--regid=" + gid, "--clear-groups", "--inh-caps=-all"}

	args := append(append([]string{}, asUser...), "env", "NETSTACKD="+bin, "PROXY="+socks4.String(), "PORT=18080", "NAME=example.test",
		script, httpURL(netnstest.ServerIPv4, "/"))
	r := tp.Daemon.Exec(t, exampleTimeout, args...)
	if strings.Contains(r.Stderr, "WARNING: DATA RACE") {
		t.Errorf("netstackd reported a data race: %s", r)
	}
	t.Logf("rootless-container.sh as uid %s: exit %d after %v", uid, r.ExitCode, r.Elapsed)
	rest, ok := strings.CutPrefix(r.Stdout, netnstest.HelloBody)
	fake, inside, _ := strings.Cut(rest, "\n")
	if a, err := netip.ParseAddr(fake); r.ExitCode != 0 || !ok || err != nil || !fakeRange4.Contains(a) || inside != "hello from inside the container\n" {
		t.Errorf("rootless-container.sh printed %q, want the page %q, an address in %s for example.test and the reply from inside: %s",
			r.Stdout, netnstest.HelloBody, fakeRange4, r)
	}
	// microsocks logs each CONNECT it made (to stderr, unbuffered).
	if want := "connected to " + netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.HTTPPort).String(); !strings.Contains(socks.Log(), want) {
		t.Errorf("microsocks did not log %q: the page did not come through it:\n%s", want, socks.Log())
	}
	if m := regexp.MustCompile(`msg="tun created by a helper[^\n]* took=(\S+)`).FindStringSubmatch(r.Stderr); m != nil {
		t.Logf("helper created the TUN in the container's namespaces in %s", m[1])
	} else {
		t.Errorf("no log line of the helper that joins the container's user namespace: %s", r)
	}

	// netstackd stops by itself once the container's process is gone,
	// rootless and as root (which enters the namespace itself).
	for _, who := range []struct {
		name   string
		prefix []string
	}{{"rootless", asUser}, {"root", nil}} {
		t.Run("stops-with-the-container-"+who.name, func(t *testing.T) {
			testStopsWithContainer(t, tp, who.prefix, bin)
		})
	}

	// Another user's process (init's): refused, with a reason.
	r = tp.Daemon.Exec(t, runTimeout, append(append([]string{}, asUser...), bin, "--netns", "1")...)
	if r.ExitCode != 1 || !strings.Contains(r.Stderr, "another user's process") {
		t.Errorf("netstackd --netns 1 as uid %s: exit %d, want 1 with \"another user's process\": %s", uid, r.ExitCode, r)
	}
}

// testStopsWithContainer: `netstackd --netns PID` (bin, as the user prefix
// switches to) serves a container whose only process lives two seconds, then
// exits 0 by itself, saying why; without the watch it would serve the
// namespace, which its TUN keeps alive, for ever (until runTimeout kills it).
func testStopsWithContainer(t *testing.T, tp *netnstest.Topology, prefix []string, bin string) {
	script := `unshare --user --map-root-user --net sleep 2 & c=$!
until [ "$(cat /proc/$c/comm)" = sleep ]; do sleep 0.02; done
exec "$1" --netns $c --dns off`
	r := tp.Daemon.Exec(t, runTimeout, append(append([]string{}, prefix...), "sh", "-c", script, "sh", bin)...)
	if r.ExitCode != 0 || !strings.Contains(r.Stderr, "msg=ready") || !strings.Contains(r.Stderr, "the process of --netns exited") {
		t.Errorf("netstackd --netns PID of a container that exits: exit %d after %v, want 0 after ready and \"the process of --netns exited\": %s",
			r.ExitCode, r.Elapsed.Round(time.Millisecond), r)
	}
}
