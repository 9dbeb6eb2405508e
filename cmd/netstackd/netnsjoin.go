package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/tundev"
)

// Serving a namespace that belongs to another user namespace, as rootless
// containers' do (podman, rootlesskit, bubblewrap, `unshare -rn`): an
// unprivileged netstackd may not enter it, since setns(2) into a network
// namespace wants CAP_SYS_ADMIN in the caller's own user namespace too. It
// may join the user namespace that owns it, where it has every capability,
// as pasta does; but a multithreaded process cannot join a user namespace,
// and a Go process is multithreaded from its start. So a helper joins both
// namespaces single-threaded (util-linux nsenter, which then execs
// netstackd), creates and configures the TUN there and passes its
// descriptor back over a socketpair (SCM_RIGHTS), as run's namespace child
// does (run.go). netstackd serves it from its own namespaces.

// Descriptors the nsenter child inherits, after the socket (childSock).
const (
	joinUserFD = childSock + 1 // the user namespace that owns the netns
	joinNetFD  = childSock + 2 // the netns
)

// netnsHelper is the child that created the TUN inside a namespace
// netstackd could not enter. nil means there is none: the methods then act
// on the device alone.
type netnsHelper struct {
	child  *nsChild
	sock   *os.File
	stderr *bytes.Buffer // nsenter's words, read once the child is reaped
}

// createTUN creates the TUN cfg describes, through a helper when cfg's
// namespace belongs to a user namespace netstackd must join first.
func createTUN(cfg tundev.Config, log *slog.Logger) (*tundev.Device, *netnsHelper, error) {
	if cfg.NetnsPath == "" {
		dev, err := tundev.Create(cfg)
		return dev, nil, err
	}
	user, net, err := joinNeeded(cfg.NetnsPath)
	if err != nil {
		return nil, nil, err
	}
	if user == nil {
		dev, err := tundev.Create(cfg)
		return dev, nil, err
	}
	defer user.Close()
	defer net.Close()
	start := time.Now()
	h, dev, err := startHelper(cfg, user, net)
	if err != nil {
		return nil, nil, fmt.Errorf("--netns %s is owned by another user namespace: %w", cfg.NetnsPath, err)
	}
	log.Info("tun created by a helper in the netns's user namespace", "tun", dev.Name(), "netns", cfg.NetnsPath,
		"took", time.Since(start).Round(time.Millisecond))
	return dev, h, nil
}

// joinNeeded opens the netns at path and, if netstackd cannot enter it
// itself, returns it with the user namespace that owns it; else nils.
func joinNeeded(path string) (user, net *os.File, err error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		why := ""
		switch {
		case errors.Is(err, fs.ErrNotExist) && strings.HasPrefix(path, "/proc/"):
			why = " (no such process)"
		case errors.Is(err, fs.ErrPermission):
			why = " (another user's process: serve only your own, or run as root)"
		}
		return nil, nil, fmt.Errorf("open netns %s: %w%s", path, err, why)
	}
	net = os.NewFile(uintptr(fd), path)
	// NS_GET_USERNS (ioctl_ns(2), Linux 4.9) gives the owner; EPERM when
	// it lies outside our own user namespace, which we could not join
	// anyway: tundev.Create then says what it can.
	ufd, err := unix.IoctlRetInt(fd, unix.NS_GET_USERNS)
	if err != nil {
		net.Close()
		return nil, nil, nil
	}
	user = os.NewFile(uintptr(ufd), "owner of "+path)
	unix.CloseOnExec(ufd)
	var owner, ours unix.Stat_t
	if err := unix.Fstat(ufd, &owner); err != nil {
		user.Close()
		net.Close()
		return nil, nil, fmt.Errorf("stat owner of netns %s: %w", path, err)
	}
	// With CAP_SYS_ADMIN here (root), setns works from an ancestor user
	// namespace: the existing path.
	if err := unix.Stat("/proc/self/ns/user", &ours); err != nil || (owner.Dev == ours.Dev && owner.Ino == ours.Ino) || haveCapSysAdmin() {
		user.Close()
		net.Close()
		return nil, nil, nil
	}
	return user, net, nil
}

// haveCapSysAdmin reports whether CAP_SYS_ADMIN is in our effective set.
func haveCapSysAdmin() bool { return haveCap(unix.CAP_SYS_ADMIN) }

// haveCap reports whether capability c (below 32) is in our effective set.
func haveCap(c int) bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return false
	}
	return data[0].Effective&(1<<c) != 0
}

// joinedCapable checks, in the helper, that nsenter's exec left it the
// capabilities that creating the TUN needs. It does only when our uid is
// root in the joined user namespace, as rootless podman, rootlesskit and
// `unshare -r` map it: execve(2) drops every capability of any other uid
// (capabilities(7)), and only a program that stays single-threaded and
// never execs, as pasta, can do without.
func joinedCapable() error {
	if haveCap(unix.CAP_NET_ADMIN) && haveCap(unix.CAP_SYS_ADMIN) {
		return nil
	}
	return fmt.Errorf("no CAP_NET_ADMIN in the namespace's user namespace: your uid is %d there, not root (map yourself to root when creating it: unshare -r, bwrap --uid 0)", os.Geteuid())
}

// startHelper starts the helper in the namespaces user and net and returns
// it with the TUN it created, still down.
func startHelper(cfg tundev.Config, user, net *os.File) (*netnsHelper, *tundev.Device, error) {
	nsenter, err := exec.LookPath("nsenter")
	if err != nil {
		return nil, nil, errors.New("joining it needs nsenter (util-linux) in PATH")
	}
	self, err := os.Executable()
	if err != nil {
		return nil, nil, fmt.Errorf("find own executable: %w", err)
	}
	blob, err := jsonConfig(childConfig{Join: true, Tun: cfg.Name, MTU: cfg.MTU, NoOffload: cfg.NoOffload, Addrs: cfg.Addrs, Routes: cfg.Routes})
	if err != nil {
		return nil, nil, err
	}
	parentEnd, childEnd, err := childSocketpair()
	if err != nil {
		return nil, nil, err
	}
	// --preserve-credentials: no setgroups or setuid, which a namespace
	// made by `unshare -r` refuses; our uid is root there already, and so
	// the helper keeps its capabilities across nsenter's exec.
	cmd := exec.Command(nsenter, "--preserve-credentials",
		fmt.Sprintf("--user=/proc/self/fd/%d", joinUserFD), fmt.Sprintf("--net=/proc/self/fd/%d", joinNetFD), "--", self)
	cmd.Env = append(os.Environ(), childEnv+"="+blob)
	h := &netnsHelper{sock: parentEnd, stderr: &bytes.Buffer{}}
	cmd.Stdout, cmd.Stderr = io.Discard, h.stderr
	cmd.ExtraFiles = []*os.File{childEnd, user, net}
	// Not relied on (joining a user namespace may clear it): the helper
	// also ends when our end of the socket closes.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	h.child, err = startChild(cmd)
	childEnd.Close()
	if err != nil {
		parentEnd.Close()
		return nil, nil, fmt.Errorf("start nsenter: %w", err)
	}
	tun, err := receiveTUN(parentEnd, time.Now().Add(tunWithin))
	if errors.Is(err, io.EOF) {
		<-h.child.exited
		parentEnd.Close()
		return nil, nil, fmt.Errorf("nsenter: %v: %s", h.child.err, strings.TrimSpace(h.stderr.String()))
	}
	if err != nil {
		h.close()
		return nil, nil, err
	}
	dev, err := tundev.FromFile(tun, cfg.MTU)
	if err != nil {
		tun.Close()
		h.close()
		return nil, nil, err
	}
	return h, dev, nil
}

// up sets the TUN up and adds its routes: the helper does, in its
// namespace, and then exits (close reaps it). With no helper, dev does.
func (h *netnsHelper) up(dev *tundev.Device) error {
	if h == nil {
		return dev.Up()
	}
	if _, err := h.sock.Write([]byte{goByte}); err != nil {
		return fmt.Errorf("set %s up: %w", dev.Name(), err)
	}
	// The helper answers once the link and routes are up; a helper
	// stuck in the kernel must not hold up start-up for ever.
	if err := h.sock.SetReadDeadline(time.Now().Add(tunWithin)); err != nil {
		return fmt.Errorf("set %s up: %w", dev.Name(), err)
	}
	var b [512]byte
	n, err := h.sock.Read(b[:])
	switch {
	case err != nil || n == 0:
		<-h.child.exited // so that its words are all in
		return fmt.Errorf("set %s up: helper ended (%v, %v): %s", dev.Name(), err, h.child.err, strings.TrimSpace(h.stderr.String()))
	case n != 1 || b[0] != upByte:
		return fmt.Errorf("set %s up: %s", dev.Name(), b[:n])
	}
	return nil
}

// close ends the helper if it still runs (after up it is on its way out)
// and waits for it. Safe on nil.
func (h *netnsHelper) close() {
	if h == nil {
		return
	}
	h.sock.Close()
	_ = h.child.abort(nil)
}

// upByte is the helper's answer to the go byte: the link is up, the routes
// are in.
const upByte = 'u'

// joinChild is the helper's side, in the joined namespaces, from the go
// byte on: it sets dev up and reports.
func joinChild(sock *os.File, dev *tundev.Device) int {
	for _, fd := range []int{joinUserFD, joinNetFD} {
		unix.Close(fd)
	}
	var b [1]byte
	if n, err := sock.Read(b[:]); err != nil || n != 1 || b[0] != goByte {
		return exitFail // netstackd is gone or failed: it reports why
	}
	if err := dev.Up(); err != nil {
		_, _ = sock.Write([]byte(err.Error()))
		return exitFail
	}
	// Our descriptors close as we exit, without undoing what Create
	// did: netstackd holds the TUN, which lives as long as it does.
	_, _ = sock.Write([]byte{upByte})
	return exitOK
}

// watchNetnsProcess returns ctx, which also ends once the process of a
// --netns /proc/PID/ns/net (or PID) exits, and the func that stops watching.
// Without it netstackd would serve on for ever: its TUN holds the namespace
// alive with no one left in it (when that was the container's first
// process, its PID namespace has gone with it). Other paths are not watched.
func watchNetnsProcess(ctx context.Context, path string, log *slog.Logger) (context.Context, func(), error) {
	var pid int
	if _, err := fmt.Sscanf(path, "/proc/%d/ns/net", &pid); err != nil || path != fmt.Sprintf("/proc/%d/ns/net", pid) {
		return ctx, func() {}, nil
	}
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if errors.Is(err, unix.ESRCH) {
		return nil, nil, fmt.Errorf("--netns %s: no process %d", path, pid)
	}
	if err != nil {
		// pidfd_open(2) needs Linux 5.3.
		log.Warn("netstackd will not stop by itself when the namespace's process exits", "pid", pid, "err", err)
		return ctx, func() {}, nil
	}
	// Non-blocking, so the runtime's poller waits for it to become
	// readable, which it does when the process exits (pidfd_open(2)).
	pf := os.NewFile(uintptr(fd), fmt.Sprintf("pidfd %d", pid))
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	wg.Go(func() {
		if waitProcessExit(pf) {
			log.Info("the process of --netns exited: stopping", "pid", pid)
			cancel()
		}
	})
	return ctx, func() {
		pf.Close() // wakes waitProcessExit
		wg.Wait()
		cancel()
	}, nil
}

// waitProcessExit waits until the process of pidfd pf exits (true) or pf
// is closed (false).
func waitProcessExit(pf *os.File) bool {
	rc, err := pf.SyscallConn()
	if err != nil {
		return false
	}
	err = rc.Read(func(fd uintptr) bool {
		n, _ := unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
		return n > 0
	})
	return err == nil
}
