package main_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// Bounds of TestRunCannotRunCommand: one `netstackd run` that cannot run
// its command takes milliseconds; past runOnceLimit it hung.
const (
	runOnceLimit     = 10 * time.Second
	cannotRunLimit   = 90 * time.Second // the whole test
	cannotRunWorkers = 4
)

// TestRunCannotRunCommand: `netstackd run -- CMD` exits as a shell does when
// CMD cannot be run, every time: 127 when there is nothing of that name, 126
// when it is there but cannot be run, with one line on stderr that names
// CMD. Each case runs many times, because the status used to depend on
// which of the namespace child's message and exit netstackd saw first: 1 or
// 137, or a hang with SIGINT captured when the exit was taken twice.
func TestRunCannotRunCommand(t *testing.T) {
	requireBinary(t)
	ns := netnstest.NewNetns(t)
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("not a program\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// Executable, but neither ELF nor a script: execve fails with ENOEXEC
	// only in the namespace child, after the stack has started.
	garbage := filepath.Join(dir, "garbage")
	if err := os.WriteFile(garbage, []byte("\x7fELF but not really"), 0o755); err != nil {
		t.Fatal(err)
	}
	inPath := "PATH=" + dir + string(filepath.ListSeparator) + os.Getenv("PATH")

	ctx := netnstest.TestContext(t, cannotRunLimit)
	for _, tc := range []struct {
		name string
		cmd  string
		env  []string // added to the environment
		runs int
		want int
		why  string // the reason after "netstackd: run: CMD: "
	}{
		{"nonexistent", "/nonexistent", nil, 100, 127, "command not found"},
		{"not-executable", plain, nil, 100, 126, "permission denied"},
		{"directory", dir, nil, 100, 126, "is a directory"},
		{"not-in-path", "netstackd-test-no-such-command", nil, 20, 127, "command not found"},
		{"in-path-not-executable", "plain", []string{inPath}, 20, 126, "permission denied"},
		{"in-path-exec-format", "garbage", []string{inPath}, 100, 126, "exec format error"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			wantLine := fmt.Sprintf("netstackd: run: %s: %s", tc.cmd, tc.why)
			args := []string{netstackdBin, "run", "--dns", "off", "--", tc.cmd, "arg"}
			codes := map[int]int{}
			var mu sync.Mutex
			var first string // the first wrong outcome, in full
			start := time.Now()
			runParallel(ctx, tc.runs, cannotRunWorkers, func() {
				code, stderr, err := runOnce(ctx, ns, tc.env, args)
				mu.Lock()
				defer mu.Unlock()
				codes[code]++
				if code != tc.want || !strings.Contains(stderr, wantLine) {
					if first == "" {
						first = fmt.Sprintf("exit %d (%v), stderr:\n%s", code, err, stderr)
					}
				}
			})
			if ctx.Err() != nil {
				t.Fatalf("ran out of time after %v: %v", time.Since(start).Round(time.Millisecond), context.Cause(ctx))
			}
			if codes[tc.want] != tc.runs || first != "" {
				t.Errorf("netstackd run -- %s: exits %s in %d runs, want %d and %q every time; first wrong one: %s",
					tc.cmd, codeCounts(codes), tc.runs, tc.want, wantLine, first)
			}
			t.Logf("%d runs, exits %s, in %v", tc.runs, codeCounts(codes), time.Since(start).Round(time.Millisecond))
		})
	}
}

// runOnce runs args in ns with env added, killed after runOnceLimit, and
// returns its exit status (-1 when killed: it hung), its stderr and the
// error from exec.
func runOnce(ctx context.Context, ns netnstest.Netns, env, args []string) (int, string, error) {
	ctx, cancel := context.WithTimeout(ctx, runOnceLimit)
	defer cancel()
	cmd := ns.Command(ctx, args...)
	cmd.Env = append(os.Environ(), env...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	if ctx.Err() != nil {
		return -1, stderr.String(), fmt.Errorf("hung: killed after %v", runOnceLimit)
	}
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return -1, stderr.String(), err
	}
	return cmd.ProcessState.ExitCode(), stderr.String(), err
}

// runParallel calls fn n times, at most workers at once, and stops starting
// new calls once ctx ends.
func runParallel(ctx context.Context, n, workers int, fn func()) {
	jobs := make(chan struct{})
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for range jobs {
				fn()
			}
		})
	}
	defer wg.Wait()
	defer close(jobs)
	for range n {
		if ctx.Err() != nil {
			return
		}
		select {
		case jobs <- struct{}{}:
		case <-ctx.Done():
			return
		}
	}
}

// codeCounts formats exit statuses and how often each came: "127×98 1×2".
func codeCounts(codes map[int]int) string {
	var parts []string
	for _, c := range slices.Sorted(maps.Keys(codes)) {
		parts = append(parts, fmt.Sprintf("%d×%d", c, codes[c]))
	}
	return strings.Join(parts, " ")
}
