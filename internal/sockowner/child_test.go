package sockowner

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the processes whose sockets are looked up:
// started again with childEnv set, TestMain runs runChild instead of the
// tests. The child starts as root, joins the namespace, becomes the uid it
// was given and only then opens its socket, so the kernel records that uid.
const (
	childEnv       = "SOCKOWNER_TEST_CHILD" // the mode, see runChild
	childNetnsEnv  = "SOCKOWNER_TEST_NETNS"
	childUIDEnv    = "SOCKOWNER_TEST_UID"
	childTargetEnv = "SOCKOWNER_TEST_TARGET"
	childDualEnv   = "SOCKOWNER_TEST_DUAL" // "1": an IPv6 socket reaching IPv4
)

// Modes of a child.
const (
	modeTCP          = "tcp"           // connect and send a byte
	modeUDPUnbound   = "udp-unbound"   // sendto from a socket never bound
	modeUDPBound     = "udp-bound"     // bind to loopback, port 0, then sendto
	modeUDPConnected = "udp-connected" // connect, then send
)

// child is a process started by startChild, holding its socket until the
// test ends.
type child struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser
	done  chan error
}

// startChild starts the test binary as a child in the namespace at
// netnsPath (none: stay), as uid, opening a socket of the given mode to
// target. It returns once the child reports that the socket connected or
// sent. The child ends when its stdin closes, in t.Cleanup at the latest.
func startChild(t testing.TB, netnsPath string, uid uint32, mode string, target netip.AddrPort, dual bool) *child {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	cmd := exec.CommandContext(ctx, exe)
	cmd.Env = append(os.Environ(),
		childEnv+"="+mode,
		childNetnsEnv+"="+netnsPath,
		childUIDEnv+"="+strconv.FormatUint(uint64(uid), 10),
		childTargetEnv+"="+target.String(),
	)
	if dual {
		cmd.Env = append(cmd.Env, childDualEnv+"=1")
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.Stderr = os.Stderr
	cmd.WaitDelay = time.Second
	stdin, err := cmd.StdinPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatalf("start child %s: %v", mode, err)
	}
	c := &child{cmd: cmd, stdin: stdin, done: make(chan error, 1)}
	ready := make(chan string, 1)
	go func() {
		line, _ := bufio.NewReader(stdout).ReadString('\n')
		ready <- line
		io.Copy(io.Discard, stdout) //nolint:errcheck // until the child exits
		c.done <- cmd.Wait()
	}()
	t.Cleanup(func() {
		c.stop(t)
		cancel()
	})
	select {
	case line := <-ready:
		if line != "ready\n" {
			t.Fatalf("child %s to %s: said %q, want ready", mode, target, line)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("child %s to %s: not ready after 10 s", mode, target)
	}
	return c
}

// pid is the child's process ID.
func (c *child) pid() int { return c.cmd.Process.Pid }

// stop closes the child's stdin and waits for it to exit; the context of
// startChild kills it should it not. Safe to call twice.
func (c *child) stop(t testing.TB) {
	t.Helper()
	c.stdin.Close()
	if c.done == nil {
		return
	}
	select {
	case err := <-c.done:
		if err != nil {
			t.Errorf("child %d: %v", c.pid(), err)
		}
	case <-time.After(10 * time.Second):
		t.Errorf("child %d did not exit within 10 s of its stdin closing", c.pid())
		c.cmd.Process.Kill()
		<-c.done
	}
	c.done = nil
}

// runChild is the child's main: see the constants above. It prints
// "ready" once its datagram or connection is out, then holds the socket
// until stdin closes.
func runChild() error {
	// setns(2) moves this thread only: the socket must be opened here.
	runtime.LockOSThread()
	if path := os.Getenv(childNetnsEnv); path != "" {
		fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open netns: %w", err)
		}
		if err := unix.Setns(fd, unix.CLONE_NEWNET); err != nil {
			return fmt.Errorf("enter netns: %w", err)
		}
		unix.Close(fd)
	}
	uid, err := strconv.Atoi(os.Getenv(childUIDEnv))
	if err != nil {
		return fmt.Errorf("uid: %w", err)
	}
	// syscall's setters change every thread of the process (Go 1.16+).
	if err := syscall.Setgroups(nil); err != nil {
		return fmt.Errorf("setgroups: %w", err)
	}
	if err := syscall.Setgid(uid); err != nil {
		return fmt.Errorf("setgid: %w", err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("setuid: %w", err)
	}
	// A process that changed its uid is not dumpable, so its /proc
	// directory stays root's; after an exec, as with setpriv or login, it
	// would be the user's. Look like the latter, as a user's program does.
	if err := unix.Prctl(unix.PR_SET_DUMPABLE, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("set dumpable: %w", err)
	}
	target, err := netip.ParseAddrPort(os.Getenv(childTargetEnv))
	if err != nil {
		return fmt.Errorf("target: %w", err)
	}
	mode := os.Getenv(childEnv)
	fd, err := childSocket(mode, target, os.Getenv(childDualEnv) == "1")
	if err != nil {
		return fmt.Errorf("%s to %s: %w", mode, target, err)
	}
	defer unix.Close(fd)
	fmt.Println("ready")
	io.Copy(io.Discard, os.Stdin) //nolint:errcheck // EOF is the signal to go
	return nil
}

// childSocket opens a socket as mode says and sends one byte to target.
// With dual, an IPv4 target is reached from an IPv6 socket through its
// IPv4-mapped address.
func childSocket(mode string, target netip.AddrPort, dual bool) (int, error) {
	fam := unix.AF_INET
	if target.Addr().Is6() || dual {
		fam = unix.AF_INET6
	}
	typ := unix.SOCK_DGRAM
	if mode == modeTCP {
		typ = unix.SOCK_STREAM
	}
	fd, err := unix.Socket(fam, typ|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	sa := sockaddr(fam, target)
	switch mode {
	case modeTCP, modeUDPConnected:
		err = unix.Connect(fd, sa)
		if err == nil {
			_, err = unix.Write(fd, []byte{'x'})
		}
	case modeUDPBound:
		lo := netip.AddrPortFrom(netip.IPv6Loopback(), 0)
		if target.Addr().Is4() {
			lo = netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), 0)
		}
		err = unix.Bind(fd, sockaddr(fam, lo))
		if err == nil {
			err = unix.Sendto(fd, []byte{'x'}, 0, sa)
		}
	case modeUDPUnbound:
		err = unix.Sendto(fd, []byte{'x'}, 0, sa)
	default:
		err = fmt.Errorf("unknown mode %q", mode)
	}
	if err != nil {
		unix.Close(fd)
		return -1, err
	}
	return fd, nil
}

// sockaddr is ap for a socket of family fam: an IPv4 address becomes
// IPv4-mapped for an IPv6 socket.
func sockaddr(fam int, ap netip.AddrPort) unix.Sockaddr {
	if fam == unix.AF_INET {
		return &unix.SockaddrInet4{Addr: ap.Addr().As4(), Port: int(ap.Port())}
	}
	return &unix.SockaddrInet6{Addr: ap.Addr().As16(), Port: int(ap.Port())}
}

// isChild reports whether this process was started by startChild.
func isChild() bool { return strings.TrimSpace(os.Getenv(childEnv)) != "" }
