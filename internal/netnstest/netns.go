package netnstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Do runs fn on an OS thread that has joined n for the duration of fn.
// Sockets fn creates belong to n for their whole life and can be used from
// any goroutine afterwards. Goroutines fn starts do not run in n. fn must not
// call Do itself.
func (n Netns) Do(fn func() error) error {
	errc := make(chan error, 1)
	go func() { errc <- n.doLocked(fn) }()
	return <-errc
}

// doLocked is the body of the goroutine Do starts. When it cannot move its
// thread back it returns with the thread still locked, so the runtime ends
// the thread with the goroutine instead of reusing a thread in the wrong
// namespace.
func (n Netns) doLocked(fn func() error) error {
	runtime.LockOSThread()
	orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open own netns: %w", err)
	}
	defer unix.Close(orig)
	target, err := unix.Open(n.Path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("open netns %s: %w", n.Path, err)
	}
	defer unix.Close(target)
	if err := unix.Setns(target, unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter netns %s: %w", n.Name, err)
	}
	ferr := fn()
	if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
		return errors.Join(ferr, fmt.Errorf("leave netns %s: %w", n.Name, err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// Listen opens a listener in n. address must hold an IP literal: a name
// lookup could run on another thread, outside n.
func (n Netns) Listen(network, address string) (net.Listener, error) {
	var ln net.Listener
	err := n.Do(func() error {
		var err error
		ln, err = net.Listen(network, address)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("listen %s %s in %s: %w", network, address, n.Name, err)
	}
	return ln, nil
}

// DialContext connects from n. address must hold an IP literal. With a
// single literal address net.Dialer creates the socket on the calling
// goroutine, which is the one Do placed in n.
func (n Netns) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var d net.Dialer
		var err error
		c, err = d.DialContext(ctx, network, address)
		return err
	})
	return c, err
}

// Result is what a finished command did.
type Result struct {
	Args     []string
	Stdout   string
	Stderr   string
	ExitCode int           // -1 when killed by a signal or not started
	Err      error         // from exec: start failure, non-zero exit, timeout
	Elapsed  time.Duration // from start to exit
}

func (r *Result) String() string {
	return fmt.Sprintf("`%s`: exit %d after %v (%v)\nstdout: %s\nstderr: %s",
		strings.Join(r.Args, " "), r.ExitCode, r.Elapsed.Round(time.Millisecond), r.Err,
		clip(r.Stdout, 4096), clip(r.Stderr, 4096))
}

// Command returns `ip netns exec NAME args...` bound to ctx. `ip netns exec`
// execs the program in place, so the PID of the returned command is that of
// the program.
func (n Netns) Command(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", n.Name}, args...)...)
}

// Exec runs args in n, killed after timeout, and returns what it did. When
// the command fails the result is logged to t. A program of a Debian package
// RequireCommand knows (curl, dig, ping...) skips t when missing.
func (n Netns) Exec(t testing.TB, timeout time.Duration, args ...string) *Result {
	t.Helper()
	return n.ExecInput(t, timeout, nil, args...)
}

// ExecInput is Exec with stdin as the command's standard input.
func (n Netns) ExecInput(t testing.TB, timeout time.Duration, stdin io.Reader, args ...string) *Result {
	t.Helper()
	requireKnown(t, args[0])
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := n.Command(ctx, args...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = time.Second
	start := time.Now()
	err := cmd.Run()
	r := &Result{
		Args:     cmd.Args,
		Stdout:   stdout.String(),
		Stderr:   stderr.String(),
		ExitCode: -1,
		Err:      err,
		Elapsed:  time.Since(start),
	}
	if cmd.ProcessState != nil {
		r.ExitCode = cmd.ProcessState.ExitCode()
	}
	if ctx.Err() != nil {
		r.Err = fmt.Errorf("%w (timeout %v)", err, timeout)
	}
	if r.Err != nil {
		t.Logf("command failed: %s", r)
	}
	return r
}

// clip keeps the last limit bytes of s.
func clip(s string, limit int) string {
	if len(s) <= limit {
		return s
	}
	return fmt.Sprintf("[%d bytes cut]...%s", len(s)-limit, s[len(s)-limit:])
}

// HasDefaultRoute reports whether n has an IPv4 (or, with ipv6, an IPv6)
// default route out of dev.
func (n Netns) HasDefaultRoute(ctx context.Context, ipv6 bool, dev string) (bool, error) {
	fam := "-4"
	if ipv6 {
		fam = "-6"
	}
	out, err := ipOutput(ctx, "-n", n.Name, fam, "-o", "route", "show", "default")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		for i := 0; i+1 < len(f); i++ {
			if f[i] == "dev" && f[i+1] == dev {
				return true, nil
			}
		}
	}
	return false, nil
}

// HasLink reports whether n has a link named dev.
func (n Netns) HasLink(ctx context.Context, dev string) (bool, error) {
	out, err := ipOutput(ctx, "-n", n.Name, "-o", "link", "show")
	if err != nil {
		return false, err
	}
	for _, line := range strings.Split(out, "\n") {
		// "7: netstack0: <POINTOPOINT,...> mtu 1500 ..." or, for a veth,
		// "2: to-server@if2: <...> ..."
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		name, _, _ := strings.Cut(strings.TrimSuffix(f[1], ":"), "@")
		if name == dev {
			return true, nil
		}
	}
	return false, nil
}
