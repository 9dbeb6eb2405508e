package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"runtime"
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
	Command   []string       `json:"command"`
}

// runCommand is the parent side of `netstackd run`. It returns the exit
// status for netstackd: the program's own, or 128+signal.
func runCommand(opts *options, serveTUN func(dev *tundev.Device) (*tunService, error), log *slog.Logger) (int, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return exitFail, fmt.Errorf("socketpair: %w", err)
	}
	parentEnd := os.NewFile(uintptr(fds[0]), "run-parent")
	childEnd := os.NewFile(uintptr(fds[1]), "run-child")
	defer parentEnd.Close()

	cfg := childConfig{Tun: opts.tun, MTU: opts.mtu, NoOffload: opts.noOffload, Addrs: opts.addrs, Routes: opts.routes, Command: opts.command}
	if opts.dnsMode != "off" {
		cfg.DNS = opts.dnsAddr
	}
	blob, err := json.Marshal(cfg)
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
	cmd.Env = append(os.Environ(), childEnv+"="+string(blob))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{childEnd}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Cloneflags: syscall.CLONE_NEWNET | syscall.CLONE_NEWNS,
		Pdeathsig:  syscall.SIGKILL, // never outlive netstackd: its network would be dead
	}
	if os.Geteuid() != 0 {
		// Root in a user namespace of our own owns the new network
		// namespace, so it may create the TUN; it maps to the caller.
		cmd.SysProcAttr.Cloneflags |= syscall.CLONE_NEWUSER
		cmd.SysProcAttr.UidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getuid(), Size: 1}}
		cmd.SysProcAttr.GidMappings = []syscall.SysProcIDMap{{ContainerID: 0, HostID: os.Getgid(), Size: 1}}
		cmd.SysProcAttr.GidMappingsEnableSetgroups = false
	}
	// Pdeathsig fires when the thread that started the child exits, not the
	// process (golang/go#27505): start and wait on one locked thread.
	started := make(chan error, 1)
	waitErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		err := cmd.Start()
		started <- err
		if err == nil {
			waitErr <- cmd.Wait()
		}
	}()
	err = <-started
	childEnd.Close()
	if err != nil {
		return exitFail, fmt.Errorf("start namespace child (unprivileged user namespaces may be disabled: sysctl kernel.unprivileged_userns_clone / user.max_user_namespaces): %w", err)
	}

	// Forward the signals a terminal or supervisor sends to the program,
	// which decides itself how to end; its exit ends us.
	sigs := make(chan os.Signal, 8)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH)
	defer signal.Stop(sigs)

	tun, err := receiveTUN(parentEnd, waitErr)
	if err != nil {
		_ = cmd.Process.Kill()
		return exitStatus(<-waitErr), err
	}
	dev, err := tundev.FromFile(tun, opts.mtu)
	if err != nil {
		tun.Close()
		_ = cmd.Process.Kill()
		<-waitErr
		return exitFail, err
	}
	svc, err := serveTUN(dev)
	if err != nil {
		_ = cmd.Process.Kill()
		<-waitErr
		return exitFail, err
	}
	defer func() {
		if err := svc.Stop(); err != nil {
			log.Warn("close", "err", err)
		}
	}()
	if _, err := parentEnd.Write([]byte{goByte}); err != nil {
		_ = cmd.Process.Kill()
		return exitStatus(<-waitErr), fmt.Errorf("start program: %w", err)
	}
	for {
		select {
		case sig := <-sigs:
			_ = cmd.Process.Signal(sig)
		case err := <-waitErr:
			return exitStatus(err), nil
		case <-svc.Done():
			// The program's network is gone: it must not run on
			// believing it has one.
			_ = cmd.Process.Kill()
			<-waitErr
			return exitFail, fmt.Errorf("tun is gone, program killed: %w", svc.Err())
		}
	}
}

// receiveTUN waits for the child to send the TUN descriptor, or to die.
func receiveTUN(sock *os.File, waitErr <-chan error) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	got := make(chan result, 1)
	go func() {
		buf := make([]byte, 512)
		oob := make([]byte, unix.CmsgSpace(4))
		rc, err := sock.SyscallConn()
		if err != nil {
			got <- result{err: err}
			return
		}
		var n, oobn int
		var rerr error
		err = rc.Read(func(fd uintptr) bool {
			n, oobn, _, _, rerr = unix.Recvmsg(int(fd), buf, oob, unix.MSG_CMSG_CLOEXEC)
			return rerr != unix.EAGAIN
		})
		if err = errors.Join(err, rerr); err != nil {
			got <- result{err: fmt.Errorf("receive tun from child: %w", err)}
			return
		}
		if n > 0 && oobn == 0 {
			got <- result{err: fmt.Errorf("namespace set-up failed: %s", buf[:n])}
			return
		}
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil || len(msgs) != 1 {
			got <- result{err: fmt.Errorf("receive tun from child: no descriptor (%v)", err)}
			return
		}
		fds, err := unix.ParseUnixRights(&msgs[0])
		if err != nil || len(fds) != 1 {
			got <- result{err: fmt.Errorf("receive tun from child: bad rights message (%v)", err)}
			return
		}
		got <- result{f: os.NewFile(uintptr(fds[0]), "tun from child")}
	}()
	select {
	case r := <-got:
		return r.f, r.err
	case err := <-waitErr:
		return nil, fmt.Errorf("namespace child exited before sending the tun: %v", err)
	case <-time.After(30 * time.Second):
		return nil, errors.New("namespace child sent no tun within 30s")
	}
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

// runChild is the child side: it runs inside the new namespaces, before
// anything else in main. It never returns on success: it execs the program.
func runChild(blob string) int {
	sock := os.NewFile(childSock, "run-socket")
	fail := func(err error) int {
		// The parent prints it: our stderr is the program's.
		_, _ = sock.Write([]byte(err.Error()))
		return exitFail
	}
	var cfg childConfig
	if err := json.Unmarshal([]byte(blob), &cfg); err != nil {
		return fail(fmt.Errorf("child config: %w", err))
	}
	if len(cfg.Command) == 0 {
		return fail(errors.New("no command"))
	}
	path, err := exec.LookPath(cfg.Command[0])
	if err != nil {
		return fail(err)
	}
	dev, err := tundev.Create(tundev.Config{
		Name: cfg.Tun, NetnsPath: "/proc/self/ns/net", MTU: cfg.MTU, Addrs: cfg.Addrs, Routes: cfg.Routes,
		NoOffload: cfg.NoOffload,
	})
	if err != nil {
		return fail(err)
	}
	tun, err := dev.DupFile()
	if err != nil {
		return fail(err)
	}
	if err := unix.Sendmsg(childSock, []byte{'t'}, unix.UnixRights(int(tun.Fd())), nil, 0); err != nil {
		return fail(fmt.Errorf("send tun: %w", err))
	}
	tun.Close()
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
	sock.Close()
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if len(kv) < len(childEnv)+1 || kv[:len(childEnv)+1] != childEnv+"=" {
			env = append(env, kv)
		}
	}
	err = syscall.Exec(path, cfg.Command, env)
	fmt.Fprintf(os.Stderr, "netstackd: exec %s: %v\n", path, err)
	return 127
}

// bindResolvConf points the namespace's resolver at the stack's DNS address
// by bind-mounting a file over /etc/resolv.conf in our own mount namespace.
func bindResolvConf(dns netip.Addr) error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
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
