package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/tundev"
)

// The run subcommand gives one program a network of its own: a child
// process is started in new network (and, unprivileged, user) namespaces,
// creates the TUN there and passes its descriptor back over a socketpair
// (SCM_RIGHTS); it then execs the program. The parent stays in the original
// namespace, runs the stack on the descriptor and makes every upstream
// connection. A multithreaded Go process cannot join a user namespace with
// setns, hence the re-exec.
//
// Unless --keep-processes, the child is also the first process of a new PID
// namespace and stays there as its init (runinit.go): it runs the program,
// and when the program exits, so does the init, and the kernel kills
// whatever the program left behind in the namespace.

const (
	childEnv  = "NETSTACKD_NS_CHILD" // set in the child's environment, holds childConfig
	childSock = 3                    // the child's end of the socketpair (ExtraFiles[0])
	goByte    = 'g'                  // parent to child: the stack serves the TUN
)

// childConfig is what the child needs to set up its namespace.
type childConfig struct {
	Tun string `json:"tun"`
	MTU int    `json:"mtu"`
	// NoOffload: --no-offload, for the TUN the child creates.
	NoOffload bool           `json:"no_offload"`
	Addrs     []netip.Prefix `json:"addrs"`
	Routes    []netip.Prefix `json:"routes"`
	DNS       netip.Addr     `json:"dns,omitzero"`
	// Init: the child is PID 1 of a new PID namespace and stays its init
	// (runinit.go) rather than exec the program in its place.
	Init bool `json:"init,omitempty"`
	// Join: the child was started by nsenter in the namespaces of a
	// --netns it serves (netnsjoin.go), and runs no program.
	Join bool `json:"join,omitempty"`
	// Path is the program to exec, found by the parent (lookCommand).
	Path    string   `json:"path"`
	Command []string `json:"command"` // its argv
	// NofileSoft is the soft open-file limit to exec the program with
	// when netstackd raised its own (fdlimit.go); 0 leaves it to Go's
	// runtime, which restores the original.
	NofileSoft uint64 `json:"nofile_soft,omitzero"`
}

// runCommand is the parent side of `netstackd run`. It returns the exit
// status for netstackd: the program's own, or 128+signal; 127 or 126, as a
// shell gives, when the program is not found or cannot be run.
//
// Every path waits for the namespace child exactly once: after a failure
// before the go byte the child is killed and reaped, and netstackd exits
// exitFail whatever the child's status was.
func runCommand(opts *options, serveTUN func(dev *tundev.Device) (*tunService, error), log *slog.Logger) (int, error) {
	// Found here, before any namespace exists, so a mistyped command
	// costs nothing and the answer does not depend on the child's timing.
	path, err := lookCommand(opts.command[0])
	if err != nil {
		return cannotRun(opts.command[0], err), nil
	}
	parentEnd, childEnd, err := childSocketpair()
	if err != nil {
		return exitFail, err
	}
	defer parentEnd.Close()

	cfg := childConfig{Tun: opts.tun, MTU: opts.mtu, NoOffload: opts.noOffload, Addrs: opts.addrs, Routes: opts.routes, Path: path, Command: opts.command,
		NofileSoft: opts.nofileSoft, Init: !opts.keepProcesses}
	if opts.dnsMode != "off" {
		cfg.DNS = opts.dnsAddr
	}
	blob, err := jsonConfig(cfg)
	if err != nil {
		childEnd.Close()
		return exitFail, err
	}
	self, err := os.Executable()
	if err != nil {
		childEnd.Close()
		return exitFail, fmt.Errorf("find own executable: %w", err)
	}
	cmd := exec.Command(self)
	cmd.Args = []string{"netstackd-run"}
	cmd.Env = append(os.Environ(), childEnv+"="+blob)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{childEnd}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS,
		Pdeathsig:  syscall.SIGKILL, // never outlive netstackd: its network would be dead
	}
	if cfg.Init {
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWPID
	}
	if os.Geteuid() != 0 {
		// Root in a user namespace of our own owns the new network
		// namespace, so it may create the TUN; it maps to the caller.
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}}
		cmd.SysProcAttr.GidMappingsEnableSetgroups = false
	}
	child, err := startChild(cmd)
	childEnd.Close()
	if err != nil {
		return exitFail, fmt.Errorf("start namespace child (unprivileged user namespaces may be disabled: sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces): %w", err)
	}

	// Forward the signals a terminal or supervisor sends to the program,
	// which decides itself how to end; its exit ends us.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigs)

	tun, err := receiveTUN(parentEnd, time.Now().Add(tunWithin))
	if errors.Is(err, io.EOF) {
		<-child.exited
		return exitFail, fmt.Errorf("namespace child ended before it sent the tun: %v", child.err)
	}
	if err != nil {
		return exitFail, child.abort(err)
	}
	dev, err := tundev.FromFile(tun, opts.mtu)
	if err != nil {
		tun.Close()
		return exitFail, child.abort(err)
	}
	svc, err := serveTUN(dev)
	if err != nil {
		return exitFail, child.abort(err)
	}
	defer func() {
		if err := svc.Stop(); err != nil {
			log.Warn("close", "err", err)
		}
	}()
	if _, err := parentEnd.Write([]byte{goByte}); err != nil {
		return exitFail, child.abort(fmt.Errorf("start program: %w", err))
	}
	for {
		select {
		case sig := <-sigs:
			if !cfg.Init {
				_ = child.cmd.Process.Signal(sig)
				break
			}
			// The init passes it on to the program; a signal
			// sent to the init itself would be dropped
			// (runinit.go). A gone child is the next case.
			_, _ = parentEnd.Write([]byte{byte(sig.(syscall.Signal))})
		case <-child.exited:
			return exitStatus(child.err), nil
		case <-svc.Done():
			// The program's network is gone: it must not run on
			// believing it has one.
			return exitFail, child.abort(fmt.Errorf("tun is gone, program killed: %w", svc.Err()))
		}
	}
}

// childSocketpair makes the socketpair to a namespace child. Our end is
// non-blocking, so the runtime's poller owns it and a read deadline bounds
// the wait for the TUN; the child's stays blocking.
func childSocketpair() (parentEnd, childEnd *os.File, err error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	if err := unix.SetNonblock(fds[0], true); err != nil {
		unix.Close(fds[0])
		unix.Close(fds[1])
		return nil, nil, fmt.Errorf("socketpair: %w", err)
	}
	return os.NewFile(uintptr(fds[0]), "child-parent"), os.NewFile(uintptr(fds[1]), "child-child"), nil
}

// jsonConfig encodes cfg for the child's environment.
func jsonConfig(cfg childConfig) (string, error) {
	b, err := json.Marshal(cfg)
	if err != nil {
		return "", fmt.Errorf("child config: %w", err)
	}
	return string(b), nil
}

// tunWithin bounds the namespace child's set-up, up to the TUN it sends.
const tunWithin = 30 * time.Second

// nsChild is the namespace child, started. One goroutine waits for it;
// exited is closed once it has been reaped, and err then holds its status
// for any number of readers, so no path can take the exit from another.
type nsChild struct {
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // from cmd.Wait; read only after exited is closed
}

// startChild starts cmd and waits for it on one locked OS thread:
// Pdeathsig fires when the thread that started the child exits, not the
// process (golang/go#27505).
func startChild(cmd *exec.Cmd) (*nsChild, error) {
	c := &nsChild{cmd: cmd, exited: make(chan struct{})}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := cmd.Start(); err != nil {
			started <- err
			return
		}
		started <- nil
		c.err = cmd.Wait()
		close(c.exited)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return c, nil
}

// abort ends a child that has not started the program: it kills it (which
// may have exited already), waits until it is reaped and returns err.
func (c *nsChild) abort(err error) error {
	_ = c.cmd.Process.Kill()
	<-c.exited
	return err
}

// receiveTUN reads the child's one message, the TUN descriptor or why the
// child could not create it, until deadline. It returns io.EOF when the
// child ended without a word.
func receiveTUN(sock *os.File, deadline time.Time) (*os.File, error) {
	if err := sock.SetReadDeadline(deadline); err != nil {
		return nil, fmt.Errorf("receive tun from child: %w", err)
	}
	rc, err := sock.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("receive tun from child: %w", err)
	}
	buf := make([]byte, 512)
	oob := make([]byte, unix.CmsgSpace(4))
	var n, oobn int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
		return rerr != unix.EAGAIN
	})
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return nil, fmt.Errorf("namespace child sent no tun within %v", tunWithin)
	}
	if err = errors.Join(err, rerr); err != nil {
		return nil, fmt.Errorf("receive tun from child: %w", err)
	}
	if n == 0 && oobn == 0 {
		return nil, io.EOF // a SOCK_SEQPACKET peer closed: the child is gone
	}
	if oobn == 0 {
		return nil, fmt.Errorf("namespace set-up failed: %s", buf[:n])
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return nil, fmt.Errorf("receive tun from child: no descriptor (%v)", err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		return nil, fmt.Errorf("receive tun from child: bad rights message (%v)", err)
	}
	return os.NewFile(uintptr(fds[0]), "tun from child"), nil
}

func exitStatus(err error) int {
	if err == nil {
		return exitOK
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ee.ExitCode()
	}
	return exitFail
}

// Exit statuses of a command that could not be run, as bash gives them
// (execute_cmd.c: EX_NOTFOUND, EX_NOEXEC).
const (
	exitNotFound = 127 // nothing by that name
	exitNoExec   = 126 // found, but not something the kernel will run
)

// lookCommand finds the program as a shell does: a name with a slash is
// taken as it is, others are searched for in PATH, where "." or an empty
// entry means the working directory. When PATH holds the name only as files
// that may not be run, bash takes the first of them and fails with
// "permission denied" (findcmd.c, file_to_lose_on); so does lookCommand.
func lookCommand(name string) (string, error) {
	path, err := exec.LookPath(name)
	if err == nil || errors.Is(err, exec.ErrDot) {
		// The user typed the command, as at a shell prompt, which
		// runs what a relative PATH entry finds.
		return path, nil
	}
	if strings.Contains(name, "/") || !errors.Is(err, exec.ErrNotFound) {
		return "", err
	}
	for _, dir := range filepath.SplitList(os.Getenv("PATH")) {
		if dir == "" {
			dir = "."
		}
		if st, serr := os.Stat(filepath.Join(dir, name)); serr == nil && !st.IsDir() {
			return "", &exec.Error{Name: name, Err: fs.ErrPermission}
		}
	}
	return "", err
}

// cannotRun reports on stderr, as a shell would, that the command name
// could not be run for err (from lookCommand or execve), and returns the
// exit status for it: exitNotFound when nothing of that name exists
// (ENOENT), exitNoExec for anything else (EACCES, EISDIR, ENOEXEC, EPERM).
// The message goes straight to stderr, as the program's own would, because
// the child, whose exec may fail too, has no other way out.
func cannotRun(name string, err error) int {
	code, why := exitNoExec, err.Error()
	var errno syscall.Errno
	switch {
	case errors.Is(err, exec.ErrNotFound), errors.Is(err, fs.ErrNotExist):
		code, why = exitNotFound, "command not found"
	case errors.As(err, &errno):
		why = errno.Error()
	case errors.Is(err, fs.ErrPermission):
		why = "permission denied"
	}
	fmt.Fprintf(os.Stderr, "netstackd: run: %s: %s\n", name, why)
	return code
}

// runChild is the child side: it runs inside the new namespaces, before
// anything else in main, and returns the status to exit with. With
// --keep-processes it never returns on success: it execs the program;
// otherwise it runs the program as the PID namespace's init and returns its
// status (runinit.go). When the program cannot be run it returns 127 or
// 126, as a shell would. The --netns helper (cfg.Join) runs no program.
func runChild(blob string) int {
	sock := os.NewFile(childSock, "run-socket")
	fail := func(err error) int {
		// The parent reports it, with the status netstackd exits with.
		_, _ = sock.Write([]byte(err.Error()))
		return exitFail
	}
	var cfg childConfig
	if err := json.Unmarshal([]byte(blob), &cfg); err != nil {
		return fail(fmt.Errorf("child config: %w", err))
	}
	if !cfg.Join && (len(cfg.Command) == 0 || cfg.Path == "") {
		return fail(errors.New("no command"))
	}
	if cfg.Init {
		// Before anything reads /proc/self or /proc/PID/task/TID with
		// the PIDs getpid and gettid now give (the netlink library does).
		if err := mountProc(); err != nil {
			return fail(fmt.Errorf("%w (--keep-processes runs the program without a PID namespace)", err))
		}
	}
	if cfg.Join {
		if err := joinedCapable(); err != nil {
			return fail(err)
		}
	}
	dev, err := tundev.Create(tundev.Config{
		Name: cfg.Tun, NetnsPath: "/proc/self/ns/net", MTU: cfg.MTU, Addrs: cfg.Addrs, Routes: cfg.Routes,
		NoOffload: cfg.NoOffload,
	})
	if err != nil {
		return fail(tunHint(err, true))
	}
	tun, err := dev.DupFile()
	if err != nil {
		return fail(err)
	}
	if err := unix.Sendmsg(childSock, []byte{'t'}, unix.UnixRights(int(tun.Fd())), nil, 0); err != nil {
		return fail(fmt.Errorf("send tun: %w", err))
	}
	tun.Close()
	if cfg.Join {
		return joinChild(sock, dev)
	}
	var b [1]byte
	if n, err := sock.Read(b[:]); err != nil || n != 1 || b[0] != goByte {
		return exitFail // the parent is gone or failed: it reports why
	}
	if err := dev.Up(); err != nil {
		return fail(err)
	}
	if cfg.DNS.IsValid() {
		if err := bindResolvConf(cfg.DNS); err != nil {
			fmt.Fprintf(os.Stderr, "netstackd: %v (names resolve as configured on the host)\n", err)
		}
	}
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if len(kv) < len(childEnv)+1 || kv[:len(childEnv)+1] != childEnv+"=" {
			env = append(env, kv)
		}
	}
	if cfg.NofileSoft > 0 {
		var lim unix.Rlimit
		if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &lim); err == nil {
			lim.Cur = min(cfg.NofileSoft, lim.Max)
			_ = unix.Setrlimit(unix.RLIMIT_NOFILE, &lim) // at worst the program gets our raised limit
		}
	}
	if cfg.Init {
		// dev stays open: closing it would delete the interface.
		return runInit(cfg, sock, env)
	}
	sock.Close()
	err = syscall.Exec(cfg.Path, cfg.Command, env)
	return cannotRun(cfg.Command[0], err)
}

// bindResolvConf points the namespace's resolver at the stack's DNS address
// by bind-mounting a file over /etc/resolv.conf in our own mount namespace.
func bindResolvConf(dns netip.Addr) error {
	if err := makeMountsPrivate(); err != nil {
		return err
	}
	f, err := os.CreateTemp("", "netstackd-resolv-*.conf")
	if err != nil {
		return fmt.Errorf("resolv.conf: %w", err)
	}
	defer os.Remove(f.Name()) // the bind mount keeps the inode
	if _, err := fmt.Fprintf(f, "# written by netstackd run\nnameserver %s\noptions edns0\n", dns); err != nil {
		f.Close()
		return err
	}
	f.Close()
	if err := unix.Mount(f.Name(), "/etc/resolv.conf", "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s over /etc/resolv.conf: %w", f.Name(), err)
	}
	return nil
}
