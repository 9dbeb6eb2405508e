package netnstest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// StopGrace is how long a process's cleanup waits after SIGTERM before it
// sends SIGKILL.
const StopGrace = 5 * time.Second

// maxLifetime bounds a process when the test has no deadline.
const maxLifetime = 15 * time.Minute

// Process is a program started in a namespace by Start. Its PID is the
// program's own (`ip netns exec` execs it in place), so signals reach it
// directly.
type Process struct {
	Name    string // the program, for messages
	logPath string
	cmd     *exec.Cmd
	cancel  context.CancelFunc
	done    chan struct{}
	err     error // from Wait; read after done is closed
}

var procSeq atomic.Int64

// Start runs args in n with stdout and stderr appended to a log file in
// t.TempDir, and returns once `ip netns exec` has exec'd the program, so
// that PID is the program's. Its cleanup sends SIGTERM to a process still
// running, SIGKILL after StopGrace, waits for it, and logs its output if t
// failed. Should the test binary die first, the kernel kills the process
// (PR_SET_PDEATHSIG). A program of a Debian package RequireCommand knows
// skips t when missing; any other fails it.
func (n Netns) Start(t testing.TB, args ...string) *Process {
	t.Helper()
	return n.start(t, nil, args)
}

// StartLimited is Start with the program's open-file limit, soft and hard,
// set to nofile by prlimit(1), which execs it: a Go program keeps that limit
// (the runtime raises only a soft limit below the hard one).
func (n Netns) StartLimited(t testing.TB, nofile uint64, args ...string) *Process {
	t.Helper()
	RequireCommand(t, "prlimit", "util-linux")
	return n.start(t, []string{"prlimit", fmt.Sprintf("--nofile=%d:%d", nofile, nofile), "--"}, args)
}

// start runs wrapper, which must exec args, or args alone.
func (n Netns) start(t testing.TB, wrapper, args []string) *Process {
	t.Helper()
	requireKnown(t, args[0])
	prog, err := exec.LookPath(args[0])
	if err != nil {
		t.Fatalf("start %s: %v", args[0], err)
	}
	if prog, err = filepath.EvalSymlinks(prog); err != nil {
		t.Fatalf("start %s: %v", args[0], err)
	}
	if prog, err = filepath.Abs(prog); err != nil {
		t.Fatalf("start %s: %v", args[0], err)
	}
	p := &Process{
		Name:    filepath.Base(prog),
		logPath: filepath.Join(t.TempDir(), fmt.Sprintf("%s-%d.log", filepath.Base(prog), procSeq.Add(1))),
		done:    make(chan struct{}),
	}
	logf, err := os.Create(p.logPath)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close() // the child has its own copy

	life := maxLifetime
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			life = time.Until(dl)
		}
	}
	var ctx context.Context
	ctx, p.cancel = context.WithTimeout(context.Background(), life)
	p.cmd = n.Command(ctx, append(wrapper, args...)...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	p.cmd.WaitDelay = time.Second
	if err := p.cmd.Start(); err != nil {
		p.cancel()
		t.Fatalf("start %s in %s: %v", strings.Join(args, " "), n, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if _, err := p.Stop(syscall.SIGTERM, StopGrace); err != nil {
			t.Errorf("stop %s: %v", p, err)
		}
		p.cancel()
		if t.Failed() {
			t.Logf("output of %s:\n%s", p, clip(p.Log(), 64<<10))
		}
	})

	// Until ip has exec'd the program, a signal would hit ip.
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	err = Poll(ctx, 5*time.Millisecond, func() (bool, error) {
		select {
		case <-p.done:
			return false, fmt.Errorf("exited: %v", p.err)
		default:
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", p.PID()))
		return err == nil && exe == prog, nil
	})
	if err != nil {
		t.Fatalf("start %s in %s: %v\n%s", strings.Join(args, " "), n, err, p.Log())
	}
	return p
}

func (p *Process) String() string { return fmt.Sprintf("%s[%d]", p.Name, p.PID()) }

// PID is the program's process ID.
func (p *Process) PID() int { return p.cmd.Process.Pid }

// LogPath is the file that receives the program's stdout and stderr.
func (p *Process) LogPath() string { return p.logPath }

// Log returns what the program has written so far.
func (p *Process) Log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(read log: %v)", err)
	}
	return string(b)
}

// Done is closed once the process has exited and been reaped.
func (p *Process) Done() <-chan struct{} { return p.done }

// Signal sends sig to the process. It goes through a pidfd, so it cannot hit
// another process that reused the PID.
func (p *Process) Signal(sig os.Signal) error { return p.cmd.Process.Signal(sig) }

// Wait waits up to timeout for the process to exit, and reports its state
// (nil if it is still running).
func (p *Process) Wait(timeout time.Duration) *os.ProcessState {
	tm := time.NewTimer(timeout)
	defer tm.Stop()
	select {
	case <-p.done:
		return p.cmd.ProcessState
	case <-tm.C:
		return nil
	}
}

// Stop sends sig unless the process has exited, waits up to grace, then
// sends SIGKILL and waits for the exit. It returns the exit state, and an
// error if SIGKILL was needed.
func (p *Process) Stop(sig os.Signal, grace time.Duration) (*os.ProcessState, error) {
	select {
	case <-p.done:
		return p.cmd.ProcessState, nil
	default:
	}
	if err := p.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return nil, fmt.Errorf("signal %v: %w", sig, err)
	}
	if st := p.Wait(grace); st != nil {
		return st, nil
	}
	p.Signal(syscall.SIGKILL)
	st := p.Wait(StopGrace)
	if st == nil {
		return nil, fmt.Errorf("still running %v after SIGKILL", StopGrace)
	}
	return st, fmt.Errorf("did not exit within %v of %v; killed", grace, sig)
}

// StartMicrosocks runs `microsocks -i IP -p PORT` in the server namespace and
// returns once it accepts connections from the daemon namespace.
func (tp *Topology) StartMicrosocks(t testing.TB, at netip.AddrPort) *Process {
	t.Helper()
	RequireCommand(t, "microsocks", "microsocks")
	p := tp.Server.Start(t, "microsocks", "-i", at.Addr().String(), "-p", fmt.Sprint(at.Port()))
	tp.waitListening(t, p, at)
	return p
}

// DantePort is where StartDante listens, on ServerIPv4 and ServerIPv6.
const DantePort = 1081

// StartDante runs the Dante SOCKS server (danted) in the server namespace,
// listening on ServerIPv4 and ServerIPv6 at DantePort, without
// authentication, and returns once it accepts connections from the daemon
// namespace. Unlike microsocks, which closes both sides of a connection at
// the first EOF, Dante relays a half-close.
func (tp *Topology) StartDante(t testing.TB) *Process {
	t.Helper()
	RequireCommand(t, "danted", "dante-server")
	conf := filepath.Join(t.TempDir(), "danted.conf")
	text := fmt.Sprintf(`logoutput: stderr
internal: %s port = %d
internal: %s port = %d
external: %s
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass { from: 0/0 to: 0/0 }
socks pass { from: 0/0 to: 0/0 command: connect }
`, ServerIPv4, DantePort, ServerIPv6, DantePort, ServerLink)
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	p := tp.Server.Start(t, "danted", "-f", conf)
	for _, ip := range []netip.Addr{ServerIPv4, ServerIPv6} {
		tp.waitListening(t, p, netip.AddrPortFrom(ip, DantePort))
	}
	return p
}

// waitListening polls until at accepts connections from the daemon
// namespace, and fails t if p exits first or CommandTimeout passes.
func (tp *Topology) waitListening(t testing.TB, p *Process, at netip.AddrPort) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), CommandTimeout)
	defer cancel()
	err := Poll(ctx, 10*time.Millisecond, func() (bool, error) {
		select {
		case <-p.Done():
			return false, fmt.Errorf("%s exited: %v", p, p.err)
		default:
		}
		c, err := tp.Daemon.DialContext(ctx, "tcp", at.String())
		if err != nil {
			return false, nil
		}
		c.Close()
		return true, nil
	})
	if err != nil {
		t.Fatalf("%s on %s not reachable from %s: %v\n%s", p.Name, at, tp.Daemon, err, p.Log())
	}
}
