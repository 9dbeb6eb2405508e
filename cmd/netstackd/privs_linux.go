package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Dropping privileges once set up: the TUN exists, routes and rules are in
// place, published ports are bound. What stays needed is little:
//
//   - host-wide mode keeps CAP_NET_ADMIN, to set SO_MARK on every new
//     upstream socket and to remove its rules and routes on exit;
//   - otherwise nothing: the TUN fd and the listeners are open already, and
//     closing the TUN's last fd deletes the interface netstackd created.
//     (CAP_NET_RAW is never needed: ping sockets are granted by
//     net.ipv4.ping_group_range, by group, not by capability.)
//
// Credentials and capabilities are per thread in Linux, and a Go process has
// many threads. syscall.Setresuid and friends change every thread (Go 1.16;
// in cgo builds glibc does it). Keeping a capability across the change needs
// PR_SET_KEEPCAPS and capset(2) on every thread too, for which Go has
// syscall.AllThreadsSyscall, available only in builds without cgo. So
// host-wide mode with --user needs CGO_ENABLED=0; without host-wide mode any
// build works, since the kernel clears every thread's capabilities itself
// when its uids leave 0 (capabilities(7), "Effect of user ID changes").
// Either way the result is read back from /proc/self/task/*/status for
// every thread, and a mismatch is an error.

// canKeepCaps reports whether this build can change capabilities on every
// thread (it has no cgo).
func canKeepCaps() bool {
	// getpid gives every thread the same answer, as AllThreadsSyscall
	// requires; under cgo it fails with ENOTSUP before running it.
	_, _, errno := syscall.AllThreadsSyscall(unix.SYS_GETPID, 0, 0, 0)
	return errno != syscall.ENOTSUP
}

// errNeedsNoCgo explains why --user cannot keep CAP_NET_ADMIN in this build.
var errNeedsNoCgo = errors.New("--user in host-wide mode must keep CAP_NET_ADMIN on every thread, which Go can do only in a build without cgo: build netstackd with CGO_ENABLED=0, or run it as the user with the capability given by the service manager (systemd: User= and AmbientCapabilities=CAP_NET_ADMIN)")

// dropPrivileges switches every thread of the process to u, with no
// supplementary groups, and leaves it CAP_NET_ADMIN (effective and
// permitted) if keepNetAdmin, else no capability at all. It also sets
// no_new_privs on every thread, so that nothing netstackd might exec could
// gain privileges.
func dropPrivileges(u userSpec, keepNetAdmin bool) error {
	var keep uint64
	if keepNetAdmin {
		keep = 1 << unix.CAP_NET_ADMIN
	}
	allThreads := canKeepCaps()
	if keepNetAdmin && !allThreads {
		return errNeedsNoCgo
	}
	if allThreads {
		if err := allThreadsPrctl(unix.PR_SET_NO_NEW_PRIVS, 1); err != nil {
			return fmt.Errorf("set no_new_privs: %w", err)
		}
		if err := allThreadsPrctl(unix.PR_SET_KEEPCAPS, boolArg(keepNetAdmin)); err != nil {
			return fmt.Errorf("set keepcaps: %w", err)
		}
	} else if err := noNewPrivsTSYNC(); err != nil {
		return fmt.Errorf("set no_new_privs: %w", err)
	}
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("drop supplementary groups: %w", err)
	}
	if err := syscall.Setresgid(u.gid, u.gid, u.gid); err != nil {
		return fmt.Errorf("switch to gid %d: %w", u.gid, err)
	}
	if err := syscall.Setresuid(u.uid, u.uid, u.uid); err != nil {
		return fmt.Errorf("switch to uid %d: %w", u.uid, err)
	}
	if allThreads {
		if err := allThreadsCapset(keep); err != nil {
			return fmt.Errorf("set capabilities to %#x: %w", keep, err)
		}
		if err := allThreadsPrctl(unix.PR_SET_KEEPCAPS, 0); err != nil {
			return fmt.Errorf("clear keepcaps: %w", err)
		}
	}
	return checkThreads(u, keep)
}

// noNewPrivsTSYNC sets no_new_privs on every thread where
// AllThreadsSyscall cannot (cgo builds): it sets it on one thread, then
// installs a seccomp filter that allows everything with
// SECCOMP_FILTER_FLAG_TSYNC, which gives every other thread the caller's
// filter and, with it, its no_new_privs (seccomp_sync_threads in
// kernel/seccomp.c). The kernel sees that such a filter always allows and
// skips it on every syscall (the constant-action bitmap, Linux 5.11).
func noNewPrivsTSYNC() error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return err
	}
	allow := []unix.SockFilter{{Code: unix.BPF_RET | unix.BPF_K, K: unix.SECCOMP_RET_ALLOW}}
	prog := unix.SockFprog{Len: uint16(len(allow)), Filter: &allow[0]}
	r, _, errno := unix.Syscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, unix.SECCOMP_FILTER_FLAG_TSYNC, uintptr(unsafe.Pointer(&prog)))
	runtime.KeepAlive(&prog)
	runtime.KeepAlive(allow)
	if errno != 0 {
		return fmt.Errorf("seccomp tsync: %w", errno)
	}
	if r != 0 {
		return fmt.Errorf("seccomp tsync: thread %d could not be synchronised", r)
	}
	return nil
}

func boolArg(b bool) uintptr {
	if b {
		return 1
	}
	return 0
}

func allThreadsPrctl(option int, arg uintptr) error {
	_, _, errno := syscall.AllThreadsSyscall6(unix.SYS_PRCTL, uintptr(option), arg, 0, 0, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// allThreadsCapset makes caps the effective and permitted set of every
// thread, with nothing inheritable (which also empties the ambient set).
func allThreadsCapset(caps uint64) error {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	data := [2]unix.CapUserData{
		{Effective: uint32(caps), Permitted: uint32(caps)},
		{Effective: uint32(caps >> 32), Permitted: uint32(caps >> 32)},
	}
	_, _, errno := syscall.AllThreadsSyscall(unix.SYS_CAPSET, uintptr(unsafe.Pointer(&hdr)), uintptr(unsafe.Pointer(&data[0])), 0)
	runtime.KeepAlive(&hdr)
	runtime.KeepAlive(&data)
	if errno != 0 {
		return errno
	}
	return nil
}

// checkThreads reads back every thread's credentials: all uids u.uid, all
// gids u.gid, effective, permitted and ambient capabilities exactly caps.
func checkThreads(u userSpec, caps uint64) error {
	tasks, err := filepath.Glob("/proc/self/task/*/status")
	if err != nil || len(tasks) == 0 {
		return fmt.Errorf("list threads: %v", err)
	}
	for _, path := range tasks {
		st, err := readStatus(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // the thread exited
		}
		if err != nil {
			return err
		}
		for _, f := range []struct {
			key  string
			want string
		}{
			{"Uid", strings.Repeat(strconv.Itoa(u.uid)+" ", 4)},
			{"Gid", strings.Repeat(strconv.Itoa(u.gid)+" ", 4)},
			{"Groups", ""},
			{"CapEff", fmt.Sprintf("%016x", caps)},
			{"CapPrm", fmt.Sprintf("%016x", caps)},
			{"CapAmb", fmt.Sprintf("%016x", 0)},
			{"NoNewPrivs", "1"},
		} {
			got := st[f.key]
			if f.key == "Uid" || f.key == "Gid" {
				got = strings.Join(strings.Fields(got), " ") + " "
			}
			if got != f.want {
				return fmt.Errorf("after dropping privileges, %s has %s %q, want %q", path, f.key, strings.TrimSpace(got), strings.TrimSpace(f.want))
			}
		}
	}
	return nil
}

// readStatus parses a /proc status file into its "Key:\tvalue" lines.
func readStatus(path string) (map[string]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	st := make(map[string]string)
	for line := range strings.Lines(string(b)) {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			st[k] = strings.TrimSpace(v)
		}
	}
	return st, nil
}

// keptCaps names what dropPrivileges keeps, for the log.
func keptCaps(keepNetAdmin bool) string {
	if keepNetAdmin {
		return "cap_net_admin"
	}
	return "none"
}
