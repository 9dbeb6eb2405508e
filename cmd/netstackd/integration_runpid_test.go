package main_test

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// testRunEndsLeftovers: a process the command backgrounds is gone once `run`
// returns (the init of run's PID namespace exits with the program, and the
// kernel kills the rest), unless --keep-processes; the program's status is
// still netstackd's, and /proc inside is the PID namespace's (issue 15).
func testRunEndsLeftovers(t *testing.T, run func(t *testing.T, args ...string) *netnstest.Result) {
	// The sleep is told apart from every other process by its argument:
	// sleep takes fractions, and these digits are the test's own.
	seq := 0
	leftover := func() (arg string, cmd string) {
		seq++
		arg = fmt.Sprintf("600.%d%03d", os.Getpid(), seq)
		// Its output goes elsewhere: a kept sleep would otherwise hold
		// the pipe that carries the command's stdout.
		return arg, "sleep " + arg + " >/dev/null 2>&1 & exit 3"
	}

	t.Run("gone", func(t *testing.T) {
		arg, cmd := leftover()
		r := run(t, "--dns", "off", "--", "sh", "-c", cmd)
		if r.ExitCode != 3 {
			t.Errorf("exit %d, want the program's 3: %s", r.ExitCode, r)
		}
		if pids := processesWithArgs("sleep", arg); len(pids) > 0 {
			t.Errorf("sleep %s backgrounded by the command still runs after run returned: pids %v", arg, pids)
			killAll(t, pids)
		}
	})
	t.Run("keep-processes", func(t *testing.T) {
		arg, cmd := leftover()
		r := run(t, "--keep-processes", "--dns", "off", "--", "sh", "-c", cmd)
		pids := processesWithArgs("sleep", arg)
		t.Cleanup(func() { killAll(t, pids) })
		if r.ExitCode != 3 || len(pids) != 1 {
			t.Errorf("with --keep-processes: exit %d, sleep %s as pids %v; want exit 3 and one sleep still running: %s", r.ExitCode, arg, pids, r)
		}
	})
	t.Run("proc", func(t *testing.T) {
		// /proc inside lists the init (PID 1), the shell and ls, with
		// the PIDs of the namespace, and nothing of the host.
		r := run(t, "--dns", "off", "--", "sh", "-c", "echo $$; ls /proc")
		var pids []int
		for _, f := range strings.Fields(r.Stdout) {
			if n, err := strconv.Atoi(f); err == nil {
				pids = append(pids, n)
			}
		}
		if r.ExitCode != 0 || len(pids) != 4 || !slices.Contains(pids[1:], 1) || !slices.Contains(pids[1:], pids[0]) {
			t.Errorf("$$ and the PIDs in /proc inside = %v, want $$ then 1, $$ and ls's: %s", pids, r)
		}
	})
}

// processesWithArgs lists the processes whose command line is exactly args.
func processesWithArgs(args ...string) []int {
	want := []byte(strings.Join(args, "\x00") + "\x00")
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if b, err := os.ReadFile("/proc/" + e.Name() + "/cmdline"); err == nil && bytes.Equal(b, want) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killAll sends SIGKILL to each of pids, through a pidfd opened after the
// process was found by processesWithArgs (its command line, unique to the
// test, identifies it: a reused PID would not carry it).
func killAll(t *testing.T, pids []int) {
	for _, pid := range pids {
		before, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // gone already
		}
		// The pidfd pins the process: is it still the one found?
		if after, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); !bytes.Equal(before, after) {
			unix.Close(fd)
			continue
		}
		if err := unix.PidfdSendSignal(fd, unix.SIGKILL, nil, 0); err != nil && err != unix.ESRCH {
			t.Errorf("kill leftover %d: %v", pid, err)
		}
		unix.Close(fd)
	}
}
