package main_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// runTimeout bounds one `netstackd run`: namespace set-up, the program (curl
// gives up after curlMaxTime) and the stack's shutdown.
const (
	runTimeout  = 30 * time.Second
	curlMaxTime = "10"
)

// TestIntegrationRun drives `netstackd run -- CMD`: netstackd runs in the
// daemon namespace (no default route) and gives CMD a network namespace of
// its own, served by its stack, from which CMD reaches the server namespace
// directly or through microsocks. CMD's exit status (128+N when killed by
// signal N) becomes netstackd's, and signals to netstackd reach CMD.
func TestIntegrationRun(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)
	tp.StartMicrosocks(t, socks4)

	t.Run("root", func(t *testing.T) {
		testRunFetch(t, tp, nil)
		t.Run("id", func(t *testing.T) {
			// As root run makes no user namespace: the program is the
			// real root, with the identity mapping.
			r := runNetstackd(t, tp, nil, "--dns", "off", "--", "sh", "-c", "id -u; cat /proc/self/uid_map")
			f := strings.Fields(r.Stdout)
			if r.ExitCode != 0 || len(f) != 4 || f[0] != "0" || f[1] != "0" || f[2] != "0" || f[3] != "4294967295" {
				t.Errorf("id -u and uid_map inside = %q, want 0 and the identity map 0 0 4294967295: %s", r.Stdout, r)
			}
		})
	})
	t.Run("exit-status", func(t *testing.T) { testRunExitStatus(t, tp, nil) })
	t.Run("leftovers", func(t *testing.T) {
		testRunEndsLeftovers(t, func(t *testing.T, args ...string) *netnstest.Result {
			t.Helper()
			return runNetstackd(t, tp, nil, args...)
		})
	})
	t.Run("unprivileged", func(t *testing.T) { testRunUnprivileged(t, tp) })
	t.Run("signal-forwarding", func(t *testing.T) { testRunSignal(t, tp) })
	t.Run("tun-gone", func(t *testing.T) {
		// The program deletes its own TUN (it is root in its namespace):
		// netstackd must end it and say why, not leave it running
		// without a network (issue 14).
		r := runNetstackd(t, tp, nil, "--dns", "off", "--", "sh", "-c", "ip link del netstack0 && exec sleep 25")
		if r.ExitCode != 1 || r.Elapsed > 10*time.Second || !strings.Contains(r.Stderr, "tun is gone") {
			t.Errorf("after the program deleted its TUN: exit %d after %v, want 1 within 10s with \"tun is gone\": %s",
				r.ExitCode, r.Elapsed.Round(time.Millisecond), r)
		}
	})
}

// runNetstackd runs `[prefix...] netstackd run args...` in the daemon
// namespace, bounded by runTimeout, and fails t if netstackd reported a data
// race. prefix is a command that execs the rest (setpriv).
func runNetstackd(t *testing.T, tp *netnstest.Topology, prefix []string, args ...string) *netnstest.Result {
	t.Helper()
	return runNetstackdBin(t, tp, netstackdBin, prefix, args...)
}

// runNetstackdBin is runNetstackd with the netstackd binary at bin.
func runNetstackdBin(t *testing.T, tp *netnstest.Topology, bin string, prefix []string, args ...string) *netnstest.Result {
	t.Helper()
	a := append(append(append([]string{}, prefix...), bin, "run"), args...)
	r := tp.Daemon.Exec(t, runTimeout, a...)
	if strings.Contains(r.Stderr, "WARNING: DATA RACE") {
		t.Errorf("netstackd reported a data race: %s", r)
	}
	t.Logf("%s: exit %d after %v", strings.Join(args, " "), r.ExitCode, r.Elapsed.Round(time.Millisecond))
	return r
}

// testRunFetch fetches the hello page from inside `netstackd run`, over IPv4
// and IPv6, directly and through microsocks. With a proxy the default DNS
// mode is fake-ip; the URLs hold addresses and --dns is off anyway.
func testRunFetch(t *testing.T, tp *netnstest.Topology, run func(t *testing.T, args ...string) *netnstest.Result) {
	if run == nil {
		run = func(t *testing.T, args ...string) *netnstest.Result {
			t.Helper()
			return runNetstackd(t, tp, nil, args...)
		}
	}
	for _, via := range []struct {
		name string
		args []string
	}{
		{"direct", nil},
		{"microsocks", []string{"--socks", socks4.String()}},
	} {
		for _, ip := range []struct {
			name string
			url  string
		}{
			{"ipv4", httpURL(netnstest.ServerIPv4, "/")},
			{"ipv6", httpURL(netnstest.ServerIPv6, "/")},
		} {
			t.Run(via.name+"-"+ip.name, func(t *testing.T) {
				args := append(append([]string{}, via.args...), "--dns", "off", "--",
					"curl", "-sS", "-g", "--max-time", curlMaxTime, ip.url)
				r := run(t, args...)
				if r.ExitCode != 0 || r.Stdout != netnstest.HelloBody {
					t.Errorf("GET %s inside run = %q, exit %d; want %q, exit 0: %s", ip.url, r.Stdout, r.ExitCode, netnstest.HelloBody, r)
				}
			})
		}
	}
}

// testRunExitStatus: the program's exit status is netstackd's, and a
// program killed by signal N makes netstackd exit 128+N. The second case
// keeps the default DNS mode (remote), whose resolver is never asked.
func testRunExitStatus(t *testing.T, tp *netnstest.Topology, run func(t *testing.T, args ...string) *netnstest.Result) {
	if run == nil {
		run = func(t *testing.T, args ...string) *netnstest.Result {
			t.Helper()
			return runNetstackd(t, tp, nil, args...)
		}
	}
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"exit-7", []string{"--dns", "off", "--", "sh", "-c", "exit 7"}, 7},
		{"killed-by-sigterm", []string{"--", "sh", "-c", "kill -TERM $$"}, 128 + int(syscall.SIGTERM)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if r := run(t, tc.args...); r.ExitCode != tc.want {
				t.Errorf("netstackd run %s: exit %d, want %d: %s", strings.Join(tc.args, " "), r.ExitCode, tc.want, r)
			}
		})
	}
}

// testRunUnprivileged runs netstackd as a throwaway system user with no
// capabilities: run then makes a user namespace too, in which the program is
// root, mapped to that user. /dev/net/tun is made world-accessible for the
// duration (as distributions that allow rootless TUNs ship it).
func testRunUnprivileged(t *testing.T, tp *netnstest.Topology) {
	netnstest.RequireCommand(t, "setpriv", "util-linux")
	if msg := userNamespacesForbidden(); msg != "" {
		t.Skip(msg)
	}
	uid, gid := throwawayUser(t)
	openTUNDevice(t)
	bin := worldExecutableCopy(t, netstackdBin)
	setpriv := []string{"setpriv", "--reuid=" + uid, "--regid=" + gid, "--clear-groups", "--inh-caps=-all"}

	// The environment itself, without netstackd: may this user make a user
	// namespace (seccomp, LSMs and the like can forbid it beyond sysctls)?
	if _, err := exec.LookPath("unshare"); err == nil {
		r := tp.Daemon.Exec(t, netnstest.CommandTimeout, append(append([]string{}, setpriv...), "unshare", "--user", "--map-root-user", "--net", "true")...)
		if r.ExitCode != 0 {
			t.Skipf("uid %s cannot create user namespaces here (unshare --user: exit %d, %s)", uid, r.ExitCode, strings.TrimSpace(r.Stderr))
		}
	}

	run := func(t *testing.T, args ...string) *netnstest.Result {
		t.Helper()
		return runNetstackdBin(t, tp, bin, setpriv, args...)
	}
	testRunFetch(t, tp, run)
	testRunExitStatus(t, tp, run)
	t.Run("leftovers", func(t *testing.T) { testRunEndsLeftovers(t, run) })
	t.Run("id", func(t *testing.T) {
		r := run(t, "--dns", "off", "--", "id", "-u")
		if r.ExitCode != 0 || r.Stdout != "0\n" {
			t.Errorf("id -u inside = %q, exit %d; want 0 (root of the user namespace run makes): %s", r.Stdout, r.ExitCode, r)
		}
		// Root inside is the throwaway user outside, and only it.
		r = run(t, "--dns", "off", "--", "cat", "/proc/self/uid_map", "/proc/self/gid_map")
		if f := strings.Fields(r.Stdout); r.ExitCode != 0 || len(f) != 6 ||
			f[0] != "0" || f[1] != uid || f[2] != "1" || f[3] != "0" || f[4] != gid || f[5] != "1" {
			t.Errorf("uid_map and gid_map inside = %q, want 0 %s 1 and 0 %s 1: %s", r.Stdout, uid, gid, r)
		}
		t.Logf("inside: id -u = 0, uid_map/gid_map %q", strings.Join(strings.Fields(r.Stdout), " "))
	})
}

// userNamespacesForbidden reports why an unprivileged user may not create a
// user namespace according to the sysctls, or "" if nothing forbids it.
func userNamespacesForbidden() string {
	read := func(path string) (int, bool) {
		b, err := os.ReadFile(path)
		if err != nil {
			return 0, false
		}
		n, err := strconv.Atoi(strings.TrimSpace(string(b)))
		return n, err == nil
	}
	// Debian and Ubuntu kernels; absent upstream.
	if n, ok := read("/proc/sys/kernel/unprivileged_userns_clone"); ok && n == 0 {
		return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone = 0)"
	}
	if n, ok := read("/proc/sys/user/max_user_namespaces"); !ok || n <= 0 {
		return fmt.Sprintf("user namespaces are disabled or unknown (user.max_user_namespaces = %d, readable %v)", n, ok)
	}
	// Ubuntu 23.10 and later: AppArmor confines unprivileged user
	// namespaces unless a profile allows them.
	if n, ok := read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"); ok && n != 0 {
		return "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = 1)"
	}
	return ""
}

// throwawayUser creates a system user without home or login shell, named
// after the test process, deletes it in t.Cleanup, and returns its uid and
// primary gid.
func throwawayUser(t *testing.T) (uid, gid string) {
	t.Helper()
	netnstest.RequireCommand(t, "useradd", "passwd")
	name := fmt.Sprintf("nstest%d", os.Getpid())
	if _, err := user.Lookup(name); err == nil {
		t.Fatalf("user %s already exists (left by an earlier run with this PID?); remove it with userdel %s", name, name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), netnstest.CommandTimeout)
	defer cancel()
	out, err := exec.CommandContext(ctx, "useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name).CombinedOutput()
	if err != nil {
		t.Fatalf("useradd %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), netnstest.CommandTimeout)
		defer cancel()
		if out, err := exec.CommandContext(ctx, "userdel", name).CombinedOutput(); err != nil {
			t.Errorf("userdel %s: %v: %s", name, err, out)
		}
	})
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatalf("look up the new user %s: %v", name, err)
	}
	if u.Uid == "0" || u.Gid == "0" {
		t.Fatalf("user %s has uid %s gid %s: not unprivileged", name, u.Uid, u.Gid)
	}
	return u.Uid, u.Gid
}

// openTUNDevice makes /dev/net/tun readable and writable by everyone until
// t's cleanup, which restores its exact mode.
func openTUNDevice(t *testing.T) {
	t.Helper()
	const dev = "/dev/net/tun"
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatalf("stat %s: %v", dev, err)
	}
	orig := st.Mode & 0o7777
	t.Cleanup(func() {
		if err := unix.Chmod(dev, orig); err != nil {
			t.Errorf("restore mode %#o of %s: %v", orig, dev, err)
			return
		}
		var st unix.Stat_t
		if err := unix.Stat(dev, &st); err != nil || st.Mode&0o7777 != orig {
			t.Errorf("%s has mode %#o after restoring %#o (%v)", dev, st.Mode&0o7777, orig, err)
		}
	})
	if err := unix.Chmod(dev, orig|0o666); err != nil {
		t.Fatalf("chmod %s: %v", dev, err)
	}
}

// worldExecutableCopy copies bin into a new directory that every user may
// search, removed in t.Cleanup: the test binary's own directories are
// private to root.
func worldExecutableCopy(t *testing.T, bin string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "netstackd-run-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src, err := os.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst := filepath.Join(dir, filepath.Base(bin))
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(f, src); err != nil {
		f.Close()
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	return dst
}

// testRunSignal: SIGTERM to netstackd reaches the program (sleep), which
// dies of it; netstackd exits 143 within stopWithin and leaves no sleep
// behind.
func testRunSignal(t *testing.T, tp *netnstest.Topology) {
	p := tp.Daemon.Start(t, netstackdBin, "run", "--dns", "off", "--", "sleep", "30")
	t.Cleanup(func() {
		if log := p.Log(); strings.Contains(log, "WARNING: DATA RACE") {
			t.Errorf("%s reported a data race:\n%s", p, log)
		}
	})

	// Signal only once the program runs: before, a signal would reach
	// netstackd or its namespace child rather than the program.
	ctx := netnstest.TestContext(t, 20*time.Second)
	start := time.Now()
	sleepPID, pidfd := 0, -1
	err := netnstest.Poll(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, errors.New("netstackd exited")
		default:
		}
		// netstackd, the init of run's PID namespace, the program.
		for _, pid := range grandchildrenOf(p.PID()) {
			if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); strings.TrimSpace(string(comm)) != "sleep" {
				continue
			}
			fd, err := unix.PidfdOpen(pid, 0)
			if err != nil {
				continue
			}
			// The pidfd pins the identity: check it is still our grandchild.
			if !slices.Contains(grandchildrenOf(p.PID()), pid) {
				unix.Close(fd)
				continue
			}
			sleepPID, pidfd = pid, fd
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("sleep did not start under %s: %v\n%s", p, err, p.Log())
	}
	defer unix.Close(pidfd)
	t.Logf("sleep[%d] running under %s after %v", sleepPID, p, time.Since(start).Round(time.Millisecond))

	start = time.Now()
	if err := p.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM to %s: %v", p, err)
	}
	st := p.Wait(stopWithin)
	took := time.Since(start)
	switch {
	case st == nil:
		t.Errorf("%s still running %v after SIGTERM", p, stopWithin)
	case st.ExitCode() != 128+int(syscall.SIGTERM):
		t.Errorf("%s exited with %v after SIGTERM, want status 143 (128+SIGTERM): %s", p, st, p.Log())
	default:
		t.Logf("%s exited 143 %v after SIGTERM", p, took.Round(time.Millisecond))
	}
	// netstackd reaps the program before exiting; whatever is left of it
	// would still answer a signal.
	if err := unix.PidfdSendSignal(pidfd, 0, nil, 0); !errors.Is(err, unix.ESRCH) {
		t.Errorf("sleep[%d] still exists after netstackd exited (signal 0: %v)", sleepPID, err)
		unix.PidfdSendSignal(pidfd, unix.SIGKILL, nil, 0)
	}
}

// grandchildrenOf lists the children of the children of pid.
func grandchildrenOf(pid int) []int {
	var g []int
	for _, c := range childrenOf(pid) {
		g = append(g, childrenOf(c)...)
	}
	return g
}

// childrenOf lists the processes whose parent is ppid.
func childrenOf(ppid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var kids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// "PID (COMM) STATE PPID ...": COMM may hold spaces and ')'.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && f[1] == strconv.Itoa(ppid) {
			kids = append(kids, pid)
		}
	}
	return kids
}
