package main

import (
	"io"
	"strings"
	"testing"
)

// TestParseFlagsNetnsPID: --netns takes a PID for /proc/PID/ns/net (issue
// 15); a path is kept as it is; --keep-processes is run's alone.
func TestParseFlagsNetnsPID(t *testing.T) {
	for _, tc := range []struct {
		args    []string
		run     bool
		netns   string
		wantErr string
	}{
		{args: []string{"--netns", "4242"}, netns: "/proc/4242/ns/net"},
		{args: []string{"--netns", "/run/netns/app"}, netns: "/run/netns/app"},
		{args: []string{"--netns", "/proc/7/ns/net"}, netns: "/proc/7/ns/net"},
		{args: []string{"--netns", "0"}, wantErr: "--netns 0"},
		{args: []string{"--keep-processes"}, wantErr: "--keep-processes applies to run only"},
		{args: []string{"--keep-processes", "--", "true"}, run: true},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			o, err := parseFlags(tc.args, tc.run, io.Discard)
			switch {
			case tc.wantErr != "":
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("error %v, want one with %q", err, tc.wantErr)
				}
			case err != nil:
				t.Errorf("error %v", err)
			case o.netns != tc.netns:
				t.Errorf("netns %q, want %q", o.netns, tc.netns)
			case tc.run && !o.keepProcesses:
				t.Errorf("keepProcesses not set")
			}
		})
	}
}
