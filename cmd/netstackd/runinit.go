package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// The namespace child of `run` is, unless --keep-processes, the first
// process of a new PID namespace: its init. The program is not made PID 1
// itself, because PID 1 of a namespace receives no signal it has no handler
// for (pid_namespaces(7)), so a program that relies on the default action
// of SIGINT or SIGTERM could then be neither interrupted nor stopped. The
// init is minimal, as tini and `docker run --init` are: it starts the
// program, passes on the signals netstackd forwards, reaps the orphans that
// the kernel reparents to it, and exits with the program's status. When it
// exits, the kernel kills every process left in the namespace and waits for
// them to be gone (zap_pid_ns_processes), so nothing the program started
// outlives `run`.

// forwardedSignals are the signals a terminal or supervisor sends that
// `run` passes on to the program.
var forwardedSignals = []os.Signal{syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGUSR1, syscall.SIGUSR2, syscall.SIGWINCH}

// runInit is the namespace child's life as init, from the go byte on: sock
// is its end of the socketpair, env the program's environment. It returns
// the status to exit with: the program's, 128+N when a signal N killed it,
// or 127/126 when it could not be started.
//
// The goroutine that passes signals on is never joined: the process ends
// with os.Exit once the program is reaped, and it with it.
func runInit(cfg childConfig, sock *os.File, env []string) int {
	// The terminal sends its signals to the whole foreground process
	// group: to the program, which handles them itself, and to netstackd,
	// which forwards them through sock. Catching them here, unread, drops
	// the copy the init gets (the Go runtime's default would end the init
	// on SIGINT and SIGTERM). They are not ignored (SIG_IGN): the program
	// would inherit that.
	signal.Notify(make(chan os.Signal, 1), forwardedSignals...)

	// The program must not inherit the socket.
	unix.CloseOnExec(childSock)
	prog, err := os.StartProcess(cfg.Path, cfg.Command, &os.ProcAttr{Env: env, Files: []*os.File{os.Stdin, os.Stdout, os.Stderr}})
	if err != nil {
		return cannotRun(cfg.Command[0], err)
	}
	go passSignals(sock, prog)
	return reapUntil(prog.Pid)
}

// passSignals sends the program each signal netstackd forwards, one byte
// each, until netstackd closes its end (it is gone; Pdeathsig ends us).
func passSignals(sock *os.File, prog *os.Process) {
	var b [1]byte
	for {
		n, err := sock.Read(b[:])
		if err != nil || n != 1 {
			return
		}
		// Through the pidfd: an error means the program is gone.
		_ = prog.Signal(syscall.Signal(b[0]))
	}
}

// reapUntil reaps every child of the init, the orphans reparented to it
// included, until pid exits, and returns the exit status for it.
func reapUntil(pid int) int {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			// ECHILD while the program was not reaped cannot happen.
			fmt.Fprintf(os.Stderr, "netstackd: run: wait for the program: %v\n", err)
			return exitFail
		}
		if got != pid {
			continue // an orphan
		}
		if ws.Signaled() {
			return 128 + int(ws.Signal())
		}
		return ws.ExitStatus()
	}
}

// mountProc mounts a /proc of the init's PID namespace over /proc in its
// mount namespace, made private first so the mount stays there. Without it
// /proc/self would name the host's process of the PID getpid gives, and ps
// inside would list the host's processes.
func mountProc() error {
	if err := makeMountsPrivate(); err != nil {
		return err
	}
	// MS_NOSUID|MS_NODEV|MS_NOEXEC, as every distribution mounts it.
	if err := unix.Mount("proc", "/proc", "proc", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, ""); err != nil {
		return fmt.Errorf("mount /proc of the new PID namespace: %w", err)
	}
	return nil
}

// makeMountsPrivate stops mounts made in the child's mount namespace from
// propagating to the one it was cloned from. Doing it twice is harmless.
func makeMountsPrivate() error {
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make mounts private: %w", err)
	}
	return nil
}
