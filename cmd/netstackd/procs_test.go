package main

import (
	"io"
	"strings"
	"testing"
)

func TestChooseProcs(t *testing.T) {
	for _, tc := range []struct {
		flag, avail int
		env         bool
		want        int
	}{
		{0, 1, false, 1},
		{0, 2, false, 1},
		{0, 3, false, 1},
		{0, 16, false, 8},
		{0, 16, true, 16}, // GOMAXPROCS in the environment: the runtime's choice stands
		{3, 16, false, 3},
		{5, 2, true, 5}, // the flag wins over the environment
	} {
		if got := chooseProcs(tc.flag, tc.avail, tc.env); got != tc.want {
			t.Errorf("chooseProcs(%d, %d, %v) = %d, want %d", tc.flag, tc.avail, tc.env, got, tc.want)
		}
	}
}

func TestProcsFlag(t *testing.T) {
	o, err := parseFlags([]string{"--procs", "3"}, false, io.Discard)
	if err != nil || o.procs != 3 {
		t.Fatalf("--procs 3: %v, procs %d", err, o.procs)
	}
	var stdout, stderr strings.Builder
	if code := run([]string{"--procs", "-1"}, &stdout, &stderr); code != exitUsage {
		t.Fatalf("--procs -1: exit code %d, want %d", code, exitUsage)
	}
	if msg := stderr.String(); strings.Count(msg, "\n") != 1 || !strings.Contains(msg, "--procs -1") {
		t.Errorf("stderr %q, want one line naming --procs", msg)
	}
}
