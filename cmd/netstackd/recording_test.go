package main

import (
	"io"
	"os"
	"path/filepath"
	"runtime/pprof"
	"runtime/trace"
	"strings"
	"testing"
)

// TestStartRecording: both recorders write a file that is complete once
// stopped: a trace starts with its header, a profile is gzip.
func TestStartRecording(t *testing.T) {
	for _, tc := range []struct {
		name   string
		start  func(w io.Writer) error
		stop   func()
		prefix string
	}{
		{"exec-trace", trace.Start, trace.Stop, "go 1."},
		{"cpu-profile", pprof.StartCPUProfile, pprof.StopCPUProfile, "\x1f\x8b"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), tc.name)
			stop, err := startRecording(path, tc.start, tc.stop)
			if err != nil {
				t.Fatalf("start: %v", err)
			}
			stop()
			b, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if !strings.HasPrefix(string(b), tc.prefix) {
				t.Errorf("%s starts %.8q, want %q", tc.name, b, tc.prefix)
			}
		})
	}
}

// TestRecordingFlagsExitUsage: a file that cannot be created is one line on
// stderr and exit status 2, before anything is set up.
func TestRecordingFlagsExitUsage(t *testing.T) {
	for _, flag := range []string{"--exec-trace", "--cpu-profile"} {
		t.Run(flag, func(t *testing.T) {
			var stdout, stderr strings.Builder
			bad := filepath.Join(t.TempDir(), "missing", "file")
			if code := run([]string{flag, bad}, &stdout, &stderr); code != exitUsage {
				t.Fatalf("exit code %d, want %d (stderr %q)", code, exitUsage, stderr.String())
			}
			if msg := stderr.String(); !strings.HasPrefix(msg, "netstackd: "+flag+": ") || strings.Count(msg, "\n") != 1 {
				t.Errorf("stderr %q, want one line naming %s", msg, flag)
			}
		})
	}
}
