package main_test

// Each script in examples/ runs here against the test topologies, pointed at
// them through its environment variables and argument, as a user would run
// it with other values. The systemd unit's ExecStart runs under the
// privileges the unit grants.

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// exampleTimeout bounds one example script.
const exampleTimeout = 60 * time.Second

// examplePath is the absolute path of examples/NAME.
func examplePath(t *testing.T, name string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", "examples", name))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// runExample runs `sh examples/NAME args...` in ns with env added, and fails
// t if netstackd reported a data race.
func runExample(t *testing.T, ns netnstest.Netns, env []string, name string, args ...string) *netnstest.Result {
	t.Helper()
	a := append(append(append([]string{"env"}, env...), "sh", examplePath(t, name)), args...)
	r := ns.Exec(t, exampleTimeout, a...)
	if strings.Contains(r.Stderr, "WARNING: DATA RACE") {
		t.Errorf("netstackd reported a data race: %s", r)
	}
	t.Logf("%s: exit %d after %v", name, r.ExitCode, r.Elapsed.Round(time.Millisecond))
	return r
}

// TestExamplePerApp: per-app.sh fetches a page through microsocks with
// `netstackd run`.
func TestExamplePerApp(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartMicrosocks(t, socks4)
	r := runExample(t, tp.Daemon, []string{"NETSTACKD=" + netstackdBin, "PROXY=" + socks4.String()},
		"per-app.sh", httpURL(netnstest.ServerIPv4, "/"))
	if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
		t.Errorf("per-app.sh printed %q, want %q: %s", r.Stdout, netnstest.HelloBody, r)
	}
	// curl's failure is the script's.
	r = runExample(t, tp.Daemon, []string{"NETSTACKD=" + netstackdBin, "PROXY=" + socks4.String()},
		"per-app.sh", "http://"+serverAddr(netnstest.ServerIPv4, netnstest.ClosedPort)+"/")
	if r.ExitCode != 7 { // curl: failed to connect
		t.Errorf("per-app.sh to a closed port: exit %d, want curl's 7: %s", r.ExitCode, r)
	}
}

// TestExampleContainer: container.sh creates a namespace, serves it with
// --netns through microsocks, fetches a page from inside, and reaches a
// server inside through the published port; the namespace is gone after.
func TestExampleContainer(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartMicrosocks(t, socks4)
	ns := fmt.Sprintf("nsdt-%d-example", os.Getpid())
	t.Cleanup(func() {
		// Only if the script could not remove it itself.
		if _, err := os.Stat("/run/netns/" + ns); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), netnstest.CommandTimeout)
			defer cancel()
			out, err := exec.CommandContext(ctx, "ip", "netns", "del", ns).CombinedOutput()
			t.Errorf("container.sh left namespace %s behind (removing: %v %s)", ns, err, out)
		}
	})
	r := runExample(t, tp.Daemon, []string{"NETSTACKD=" + netstackdBin, "PROXY=" + socks4.String(), "NS=" + ns, "PORT=18080"},
		"container.sh", httpURL(netnstest.ServerIPv4, "/"))
	want := netnstest.HelloBody + "hello from inside the namespace\n"
	if r.ExitCode != 0 || r.Stdout != want {
		t.Errorf("container.sh printed %q, want %q: %s", r.Stdout, want, r)
	}
	if ok, err := tp.Daemon.HasLink(t.Context(), tunName); ok || err != nil {
		t.Errorf("a TUN in the daemon namespace after container.sh (%v)", err)
	}
}

// TestExampleHostWide: host-wide.sh sends the host's connection through the
// proxy, an EXCLUDE'd address around it, and leaves the routing as it was.
func TestExampleHostWide(t *testing.T) {
	requireBinary(t)
	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	tp.StartWhoami(t, whoami4)
	socks := tp.StartLoggingSOCKS5(t, hwSocks, nil)
	before := tp.Daemon.RoutingState(t)
	env := []string{"NETSTACKD=" + netstackdBin, "PROXY=" + hwSocks.String(), "EXCLUDE=" + netip.PrefixFrom(netnstest.OtherIPv4, 32).String()}

	r := runExample(t, tp.Daemon, env, "host-wide.sh", httpURL(netnstest.ServerIPv4, "/"))
	if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
		t.Errorf("host-wide.sh printed %q, want %q: %s", r.Stdout, netnstest.HelloBody, r)
	}
	if dst := netip.AddrPortFrom(netnstest.ServerIPv4, netnstest.HTTPPort); !hasRequest(socks.Requests(), dst) {
		t.Errorf("the proxy saw no CONNECT to %s: %v", dst, socks.Requests())
	}
	r = runExample(t, tp.Daemon, env, "host-wide.sh", "http://"+whoami4.String()+"/")
	if r.ExitCode != 0 || r.Stdout != netnstest.UplinkHostIPv4.String() {
		t.Errorf("host-wide.sh to the excluded %s printed %q, want %s: %s", whoami4, r.Stdout, netnstest.UplinkHostIPv4, r)
	}
	if hasRequest(socks.Requests(), whoami4) {
		t.Errorf("the excluded %s went through the proxy", whoami4)
	}
	if after := tp.Daemon.RoutingState(t); after != before {
		t.Errorf("routing state after host-wide.sh differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// unitFile reads the [Service] settings of a systemd unit.
func unitFile(t *testing.T, path string) map[string]string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	kv := map[string]string{}
	section := ""
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "["):
			section = line
		case section == "[Service]":
			k, v, _ := strings.Cut(line, "=")
			kv[k] = v
		}
	}
	return kv
}

// TestExampleSystemdUnit: netstackd.service is a valid notify unit whose
// ExecStart, run as the unit runs it (an unprivileged user whose only
// capability is an ambient CAP_NET_ADMIN, no_new_privs), reports READY=1,
// carries the host's traffic through the proxy, and removes its rules on
// SIGTERM, systemd's stop.
func TestExampleSystemdUnit(t *testing.T) {
	requireBinary(t)
	unit := examplePath(t, "netstackd.service")
	svc := unitFile(t, unit)
	for k, want := range map[string]string{
		"Type":                  "notify",
		"AmbientCapabilities":   "CAP_NET_ADMIN",
		"CapabilityBoundingSet": "CAP_NET_ADMIN",
		"NoNewPrivileges":       "yes",
		"DynamicUser":           "yes",
	} {
		if svc[k] != want {
			t.Errorf("%s: %s=%q, want %q", unit, k, svc[k], want)
		}
	}
	exec0 := strings.Fields(svc["ExecStart"])
	if len(exec0) < 2 || exec0[0] != "/usr/local/bin/netstackd" {
		t.Fatalf("ExecStart=%q: want /usr/local/bin/netstackd and flags", svc["ExecStart"])
	}
	if _, err := exec.LookPath("systemd-analyze"); err == nil {
		// verify wants the binary to exist: check a copy that names ours.
		text, _ := os.ReadFile(unit)
		copyPath := filepath.Join(t.TempDir(), "netstackd.service")
		if err := os.WriteFile(copyPath, bytes.ReplaceAll(text, []byte("/usr/local/bin/netstackd"), []byte(netstackdBin)), 0o644); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(t.Context(), netnstest.CommandTimeout)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "systemd-analyze", "verify", copyPath).CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
			t.Errorf("systemd-analyze verify: %v\n%s", err, out)
		}
	}
	netnstest.RequireCommand(t, "setpriv", "util-linux") // to run ExecStart as the unit would

	tp := netnstest.NewUplink(t)
	tp.StartServers(t)
	socks := tp.StartLoggingSOCKS5(t, hwSocks, nil)
	before := tp.Daemon.RoutingState(t)
	uid, gid := throwawayUser(t)
	openTUNDevice(t)
	bin := worldExecutableCopy(t, netstackdBin)

	args := []string{"setpriv", "--reuid=" + uid, "--regid=" + gid, "--clear-groups",
		"--inh-caps=-all,+net_admin", "--ambient-caps=-all,+net_admin", "--bounding-set=-all,+net_admin", "--no-new-privs", bin}
	for _, a := range exec0[1:] {
		args = append(args, strings.ReplaceAll(a, "192.0.2.10:1080", hwSocks.String()))
	}
	notify := netnstest.ListenNotify(t)
	logPath := filepath.Join(t.TempDir(), "netstackd.log")
	logf, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := tp.Daemon.Command(ctx, args...)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+notify.Path)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	var waitErr error
	go func() {
		waitErr = cmd.Wait()
		close(exited)
	}()
	readLog := func() string { b, _ := os.ReadFile(logPath); return string(b) }
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGKILL) // by PID; a no-op once it exited
		<-exited
		if t.Failed() {
			t.Logf("netstackd's output:\n%s", readLog())
		}
	})

	if err := notify.Ready(netnstest.TestContext(t, 20*time.Second), exited); err != nil {
		t.Fatalf("ExecStart %s: %v\n%s", strings.Join(args, " "), err, readLog())
	}
	wantBody(t, tp, httpURL(netnstest.ServerIPv6, "/"), netnstest.HelloBody)
	if dst := netip.AddrPortFrom(netnstest.ServerIPv6, netnstest.HTTPPort); !hasRequest(socks.Requests(), dst) {
		t.Errorf("the proxy saw no CONNECT to %s: %v", dst, socks.Requests())
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-exited:
		if waitErr != nil {
			t.Errorf("netstackd exited with %v on SIGTERM", waitErr)
		}
	case <-time.After(stopWithin):
		t.Fatalf("netstackd did not stop within %v of SIGTERM", stopWithin)
	}
	if strings.Contains(readLog(), "WARNING: DATA RACE") {
		t.Errorf("netstackd reported a data race")
	}
	if after := tp.Daemon.RoutingState(t); after != before {
		t.Errorf("routing state after the unit's stop differs:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// TestExamplesExecutable: every script in examples/ can be run as its
// header says, by its path; the tests run copies, which would not notice.
func TestExamplesExecutable(t *testing.T) {
	scripts, err := filepath.Glob(filepath.Join("..", "..", "examples", "*.sh"))
	if err != nil || len(scripts) == 0 {
		t.Fatalf("no scripts in examples/ (%v)", err)
	}
	for _, s := range scripts {
		fi, err := os.Stat(s)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm()&0o111 != 0o111 {
			t.Errorf("%s has mode %04o: not executable by everyone", s, fi.Mode().Perm())
		}
	}
}
