package main

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/tundev"
)

// TestFlagErrors pins the rewording of each of the flag package's errors:
// two dashes as --help spells them, and what to type instead.
func TestFlagErrors(t *testing.T) {
	tests := []struct {
		args []string
		want string
	}{
		{[]string{"--dial-timeout", "10"}, `--dial-timeout "10": a duration needs a unit (did you mean 10s?)`},
		{[]string{"--udp-timeout=soon"}, `--udp-timeout "soon": want a duration such as 10s, 500ms or 2m`},
		{[]string{"--dial-timout", "10s"}, "unknown flag --dial-timout (did you mean --dial-timeout?)"},
		{[]string{"--sock", "h:1"}, "unknown flag --sock (did you mean --socks?)"},
		{[]string{"--frobnicate"}, "unknown flag --frobnicate"},
		{[]string{"--mtu", "big"}, `--mtu "big": want a whole number`},
		{[]string{"--mtu", "99999999999999999999"}, `--mtu "99999999999999999999": out of range`},
		{[]string{"--tcp-sack=maybe"}, `--tcp-sack="maybe": want true or false`},
		{[]string{"--dns"}, "--dns needs a value"},
		{[]string{"---dns", "off"}, `bad flag syntax "---dns": flags are --NAME or --NAME=VALUE`},
		{[]string{"--addr", "foo"}, `--addr "foo": "foo" is not a CIDR`},
		{[]string{"--log-level", "loud"}, `--log-level "loud": unknown level "loud"`},
	}
	oneDash := regexp.MustCompile(`(^|[\s"(])-[a-z]`)
	for _, tc := range tests {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, err := parseFlags(tc.args, false, &strings.Builder{})
			if err == nil {
				t.Fatal("no error")
			}
			if got := err.Error(); !strings.HasPrefix(got, tc.want) {
				t.Errorf("error %q, want it to start with %q", got, tc.want)
			}
			if oneDash.MatchString(strings.ReplaceAll(err.Error(), "---dns", "")) {
				t.Errorf("error %q spells a flag with one dash", err)
			}
		})
	}
}

func TestUsageGroupsEveryFlag(t *testing.T) {
	var out strings.Builder
	if _, err := parseFlags([]string{"--help"}, false, &out); !errors.Is(err, errHelp) {
		t.Fatalf("err %v, want errHelp", err)
	}
	if strings.Contains(out.String(), "\nOther:") {
		t.Errorf("a flag is in no group of flagGroups:\n%s", out.String()[strings.Index(out.String(), "\nOther:"):])
	}
	for _, g := range flagGroups {
		if !strings.Contains(out.String(), "\n"+g.title+":\n") {
			t.Errorf("usage lacks the group %q", g.title)
		}
	}
	if !strings.Contains(out.String(), "Examples:") {
		t.Error("usage has no examples")
	}
}

func TestRunUsageLeavesOutRefusedFlags(t *testing.T) {
	var out strings.Builder
	if _, err := parseFlags([]string{"--help"}, true, &out); !errors.Is(err, errHelp) {
		t.Fatalf("err %v, want errHelp", err)
	}
	for name := range notForRun {
		if strings.Contains(out.String(), "  --"+name+" ") || strings.Contains(out.String(), "  --"+name+"\n") {
			t.Errorf("run's usage lists --%s, which run refuses", name)
		}
		// And run does refuse it: the usage must not hide a flag run takes.
		if _, err := parseFlags([]string{"--" + name, flagSample(name), "--", "true"}, true, &strings.Builder{}); err == nil {
			t.Errorf("run accepts --%s, but its usage leaves it out", name)
		}
	}
	for _, want := range []string{"netstackd run [flags] -- CMD ARGS", "--socks", "--publish"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("run's usage lacks %q", want)
		}
	}
}

// flagSample is a valid value for each flag run refuses.
func flagSample(name string) string {
	return map[string]string{"netns": "/run/netns/x", "tun-fd": "3", "queues": "2", "table": "100", "exclude": "10.0.0.0/8", "user": "nobody"}[name]
}

func TestVersion(t *testing.T) {
	var out strings.Builder
	_, err := parseFlags([]string{"--version"}, false, &out)
	if !errors.Is(err, errVersion) {
		t.Fatalf("err %v, want errVersion", err)
	}
	if !regexp.MustCompile(`^netstackd \S+.*, go1\.\S+ linux/\w+\n$`).MatchString(out.String()) {
		t.Errorf("version line %q", out.String())
	}
	if code := run([]string{"--version"}, &strings.Builder{}, &strings.Builder{}); code != exitOK {
		t.Errorf("--version exits %d, want 0", code)
	}
}

func TestTUNHint(t *testing.T) {
	tests := []struct {
		err     error
		runMode bool
		want    string
	}{
		{fmt.Errorf("create tun: open /dev/net/tun: %w", unix.EACCES), false, "chmod 0666 /dev/net/tun"},
		{fmt.Errorf("create tun: open /dev/net/tun: %w", unix.EACCES), true, "chmod 0666 /dev/net/tun"},
		{fmt.Errorf("create tun: %w", unix.EPERM), false, "needs CAP_NET_ADMIN"},
		{fmt.Errorf("create tun: %w", unix.EPERM), false, "netstackd run"},
		{fmt.Errorf("create tun: %w", unix.EPERM), true, "user namespace"},
		{fmt.Errorf("create tun: %w", unix.EBUSY), false, "device or resource busy"},
		{fmt.Errorf("create tun: %w: 198.18.0.1/15 on netstack0 overlaps it", tundev.ErrAddrInUse), false, "give this one other --addr"},
	}
	for _, tc := range tests {
		got := tunHint(tc.err, tc.runMode)
		if !strings.Contains(got.Error(), tc.want) {
			t.Errorf("tunHint(%v, run %v) = %q, want it to contain %q", tc.err, tc.runMode, got, tc.want)
		}
		if !errors.Is(got, errors.Unwrap(tc.err)) {
			t.Errorf("tunHint(%v) lost its cause", tc.err)
		}
	}
	if tunHint(nil, false) != nil {
		t.Error("tunHint(nil) is not nil")
	}
}

// TestManPageUpToDate: netstackd.1 is what --print-man writes from the flag
// definitions; a flag added or changed without rewriting it fails here
// (netstackd --print-man > netstackd.1).
func TestManPageUpToDate(t *testing.T) {
	var out strings.Builder
	if _, err := parseFlags([]string{"--print-man"}, false, &out); !errors.Is(err, errVersion) {
		t.Fatalf("err %v, want errVersion", err)
	}
	committed, err := os.ReadFile("../../netstackd.1")
	if err != nil {
		t.Fatal(err)
	}
	if string(committed) != out.String() {
		t.Errorf("netstackd.1 is stale: run go run ./cmd/netstackd --print-man > netstackd.1")
	}
	for _, g := range flagGroups {
		for _, n := range g.names {
			if !strings.Contains(out.String(), `\fB\-\-`+strings.ReplaceAll(n, "-", `\-`)+`\fR`) {
				t.Errorf("the manual lacks --%s", n)
			}
		}
	}
}
