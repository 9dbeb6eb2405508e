package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
)

// errVersion is returned when the user asked for the version or the
// manual page: printed, nothing to run.
var errVersion = errors.New("version requested")

const usageHead = `netstackd: a userspace TCP/IP stack on a TUN device that relays every
connection directly or through a proxy.

Usage:
  netstackd [flags]                  serve a TUN device
  netstackd run [flags] -- CMD ARGS  run CMD with a network of its own, served by netstackd
  netstackd flows [--close ID]       list the live flows of a daemon started with --metrics
`

const runUsageHead = `netstackd run: run a command with a network namespace of its own, whose
only way out is netstackd. No root needed where unprivileged user namespaces
are allowed.

Usage:
  netstackd run [flags] -- CMD ARGS
`

const usageExamples = `
Examples:
  netstackd run --socks 127.0.0.1:1080 -- curl http://example.test/
      one program through a SOCKS5 proxy, rootless
  netstackd --netns /run/netns/box --socks 127.0.0.1:1080 --publish 8080:80
      serve a container's namespace, and publish its port 80 on 8080
  netstackd --socks proxy.lan:1080 --route 0.0.0.0/0 --route ::/0
      the whole host (host-wide mode; as root)

Durations take a unit: 10s, 500ms, 2m. Exit status: 0 on success, 1 on
failure, 2 on a usage error; run exits with the command's status.
`

// flagGroups orders the usage text by topic. Every flag is in exactly one
// group (TestFlagGroupsCoverEveryFlag), so a new flag has to be placed.
var flagGroups = []struct {
	title string
	names []string
}{
	{"Modes", []string{"netns", "tun-fd", "keep-processes"}},
	{"Upstream", []string{"proxy", "socks", "dial-timeout", "tcp-handshake", "allow-host-loopback"}},
	{"DNS", []string{"dns", "dns-addr", "dns-upstream", "dns-direct", "fake-ip-range"}},
	{"Routing rules", []string{"rule", "sniff-timeout", "dial-sniffed-name"}},
	{"Addresses, routes and the TUN", []string{"tun", "addr", "route", "mtu", "queues", "no-offload", "publish"}},
	{"Host-wide mode", []string{"fwmark", "table", "exclude", "user"}},
	{"Limits and timeouts", []string{"max-flows", "max-inflight", "max-inflight-per-source", "tcp-handshake-timeout", "udp-timeout", "tcp-half-close-timeout"}},
	{"TCP tuning", []string{"tcp-rmem", "tcp-wmem", "tcp-cc", "tcp-sack", "tcp-rack", "tcp-moderate-rcvbuf", "tcp-nagle"}},
	{"Debugging", []string{"log-level", "log-format", "metrics", "pprof", "procs", "cpu-profile", "exec-trace", "version", "print-man", "pcap", "pcap-max-size"}},
	{"Configuration file", []string{"config", "print-config"}},
}

// notForRun are the flags that run refuses: its TUN is one it creates in a
// namespace of its own, and it runs as whoever starts it.
var notForRun = map[string]bool{"netns": true, "tun-fd": true, "queues": true, "table": true, "exclude": true, "user": true}

// printUsage lists the flags GNU-style, with two dashes, as users type them,
// grouped by topic; run's usage leaves out the flags run refuses.
func printUsage(w io.Writer, fs *flag.FlagSet, runMode bool) {
	head := usageHead
	if runMode {
		head = runUsageHead
	}
	fmt.Fprint(w, head)
	listed := map[string]bool{}
	group := func(title string, names []string) {
		var flags []*flag.Flag
		for _, n := range names {
			listed[n] = true
			if f := fs.Lookup(n); f != nil && !(runMode && notForRun[n]) {
				flags = append(flags, f)
			}
		}
		if len(flags) == 0 {
			return
		}
		fmt.Fprintf(w, "\n%s:\n", title)
		for _, f := range flags {
			printFlag(w, f)
		}
	}
	for _, g := range flagGroups {
		group(g.title, g.names)
	}
	var rest []string
	fs.VisitAll(func(f *flag.Flag) {
		if !listed[f.Name] {
			rest = append(rest, f.Name)
		}
	})
	group("Other", rest)
	if !runMode {
		fmt.Fprint(w, usageExamples)
	}
}

func printFlag(w io.Writer, f *flag.Flag) {
	name, usage := flag.UnquoteUsage(f)
	line := "  --" + f.Name
	if name != "" {
		line += " " + name
	}
	fmt.Fprintf(w, "%s\n      %s", line, usage)
	if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "[]" && f.DefValue != "false" && !strings.Contains(usage, "default") {
		fmt.Fprintf(w, " (default %s)", f.DefValue)
	}
	fmt.Fprintln(w)
}

// explainFlagError rewords the flag package's errors, which spell flags
// with one dash and say "parse error", into what a user of the two-dash
// --help can act on. Its messages have been stable since Go 1.0
// (src/flag/flag.go, failf), and TestFlagErrors pins each one.
func explainFlagError(fs *flag.FlagSet, err error) error {
	msg := err.Error()
	if name, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
		if s := closestFlag(fs, name); s != "" {
			return fmt.Errorf("unknown flag --%s (did you mean --%s?)", name, s)
		}
		return fmt.Errorf("unknown flag --%s", name)
	}
	if name, ok := strings.CutPrefix(msg, "flag needs an argument: -"); ok {
		return fmt.Errorf("--%s needs a value", name)
	}
	if rest, ok := strings.CutPrefix(msg, "bad flag syntax: "); ok {
		return fmt.Errorf("bad flag syntax %q: flags are --NAME or --NAME=VALUE", rest)
	}
	// invalid value "V" for flag -NAME: REASON
	// invalid boolean value "V" for -NAME: REASON
	var value, name, reason string
	for _, prefix := range []string{"invalid value ", "invalid boolean value "} {
		rest, ok := strings.CutPrefix(msg, prefix)
		if !ok {
			continue
		}
		q, err := strconv.QuotedPrefix(rest)
		if err != nil {
			break
		}
		value, _ = strconv.Unquote(q)
		rest = strings.TrimPrefix(strings.TrimPrefix(rest[len(q):], " for flag -"), " for -")
		name, reason, _ = strings.Cut(rest, ": ")
		break
	}
	f := fs.Lookup(name)
	if f == nil {
		return err
	}
	if g, ok := f.Value.(flag.Getter); ok {
		switch g.Get().(type) {
		case time.Duration:
			if _, nerr := strconv.ParseFloat(value, 64); nerr == nil {
				return fmt.Errorf("--%s %q: a duration needs a unit (did you mean %ss?)", name, value, value)
			}
			return fmt.Errorf("--%s %q: want a duration such as 10s, 500ms or 2m", name, value)
		case bool:
			return fmt.Errorf("--%s=%q: want true or false", name, value)
		case int, int64, uint, uint64:
			if strings.Contains(reason, "out of range") {
				return fmt.Errorf("--%s %q: out of range", name, value)
			}
			return fmt.Errorf("--%s %q: want a whole number", name, value)
		}
	}
	return fmt.Errorf("--%s %q: %s", name, value, reason)
}

// closestFlag suggests the flag the user probably meant: one whose name
// starts with what was typed, or is at most two edits away from it.
func closestFlag(fs *flag.FlagSet, typed string) string {
	typed = strings.TrimLeft(typed, "-")
	best, bestDist := "", 3
	fs.VisitAll(func(f *flag.Flag) {
		d := editDistance(typed, f.Name)
		if len(typed) >= 3 && strings.HasPrefix(f.Name, typed) {
			d = 1
		}
		if d < bestDist {
			best, bestDist = f.Name, d
		}
	})
	return best
}

// editDistance is the Levenshtein distance between a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// version says which build this is: the module version when installed with
// go install at a version, else the commit it was built from.
func version() string {
	v := "devel"
	extra := ""
	if bi, ok := debug.ReadBuildInfo(); ok {
		if bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v = bi.Main.Version
		}
		var rev, modified string
		for _, s := range bi.Settings {
			switch s.Key {
			case "vcs.revision":
				rev = s.Value
			case "vcs.modified":
				modified = s.Value
			}
		}
		if rev != "" {
			if len(rev) > 12 {
				rev = rev[:12]
			}
			extra = " commit " + rev
			if modified == "true" {
				extra += " (modified)"
			}
		}
	}
	return fmt.Sprintf("netstackd %s%s, %s %s/%s", v, extra, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}

// writeManPage writes netstackd(1) in roff (man(7) macros) from the same
// flag definitions and groups as --help, so the manual cannot drift from
// the program: netstackd.1 at the top of the repository is its output, and
// TestManPageUpToDate fails when a flag changes and it was not rewritten
// (netstackd --print-man > netstackd.1).
func writeManPage(w io.Writer, fs *flag.FlagSet) {
	esc := func(s string) string {
		s = strings.ReplaceAll(s, `\`, `\e`)
		s = strings.ReplaceAll(s, "-", `\-`)
		if strings.HasPrefix(s, ".") || strings.HasPrefix(s, "'") {
			s = `\&` + s
		}
		return s
	}
	fmt.Fprint(w, `.TH NETSTACKD 1 "" "netstackd" "User Commands"
.SH NAME
netstackd \- a userspace TCP/IP stack on a TUN device that relays every connection directly or through a proxy
.SH SYNOPSIS
.B netstackd
.RI [ flags ]
.br
.B netstackd run
.RI [ flags ]
.B \-\-
.I command
.RI [ args ...]
.br
.B netstackd flows
.RB [ \\-\\-metrics
.IR addr ]
.RB [ \\-\\-close
.IR id ]
.SH DESCRIPTION
Every connection that enters the TUN is terminated in userspace (gVisor's netstack) and relayed
as a real socket from netstackd's own network namespace, or through a SOCKS5, SOCKS4 or HTTP CONNECT proxy.
UDP, ping and DNS work too; in fake-ip mode hostnames, not locally resolved addresses, reach the proxy.
.PP
.B netstackd run
runs one command in network, user and PID namespaces of its own whose only way out is netstackd; it needs no root
where unprivileged user namespaces are allowed.
With
.BR \-\-netns ,
netstackd serves a container's namespace; with a default
.B \-\-route
and no namespace it serves the whole host.
`)
	listed := map[string]bool{}
	for _, g := range flagGroups {
		fmt.Fprintf(w, ".SH %s\n", esc(strings.ToUpper(g.title)))
		for _, n := range g.names {
			f := fs.Lookup(n)
			if f == nil {
				continue
			}
			listed[n] = true
			name, usage := flag.UnquoteUsage(f)
			fmt.Fprintf(w, ".TP\n\\fB\\-\\-%s\\fR", esc(f.Name))
			if name != "" {
				fmt.Fprintf(w, " \\fI%s\\fR", esc(name))
			}
			fmt.Fprintf(w, "\n%s", esc(usage))
			if f.DefValue != "" && f.DefValue != "0" && f.DefValue != "[]" && f.DefValue != "false" && !strings.Contains(usage, "default") {
				fmt.Fprintf(w, " (default %s)", esc(f.DefValue))
			}
			fmt.Fprintln(w)
		}
	}
	fmt.Fprint(w, `.SH EXAMPLES
.nf
netstackd run \-\-socks 127.0.0.1:1080 \-\- curl http://example.test/
netstackd \-\-netns /run/netns/box \-\-socks 127.0.0.1:1080 \-\-publish 8080:80
netstackd \-\-socks proxy.lan:1080 \-\-route 0.0.0.0/0 \-\-route ::/0
.fi
.SH EXIT STATUS
0 after SIGINT or SIGTERM; 1 on a failure after start, or when the TUN is deleted; 2 on a usage error.
.B run
exits with the command's status, 128+N when a signal N ended it, 127 when it is not found and 126 when it cannot be run.
.SH SEE ALSO
.BR ip (8),
.BR ip\-netns (8),
.BR unshare (1),
.BR nsenter (1)
`)
}
