package netnstest

import (
	"os/exec"
	"testing"
)

// debianPackages names the Debian package that ships each program the
// helpers or the tests run, for the hint in RequireCommand's skip message.
// scripts/deps.sh installs them all.
var debianPackages = map[string]string{
	"curl":       "curl",
	"danted":     "dante-server",
	"dig":        "dnsutils",
	"dnsmasq":    "dnsmasq-base",
	"getent":     "libc-bin",
	"hping3":     "hping3",
	"ip":         "iproute2",
	"iperf3":     "iperf3",
	"jq":         "jq",
	"microsocks": "microsocks",
	"nsenter":    "util-linux",
	"ping":       "iputils-ping",
	"prlimit":    "util-linux",
	"setpriv":    "util-linux",
	"socat":      "socat",
	"ss":         "iproute2",
	"ssh":        "openssh-client",
	"sshd":       "openssh-server",
	"sysctl":     "procps",
	"tcpdump":    "tcpdump",
	"tinyproxy":  "tinyproxy",
	"unshare":    "util-linux",
	"useradd":    "passwd",
	"userdel":    "passwd",
}

// RequireCommand skips t unless the program name is in PATH, saying which
// Debian package provides it, and returns the program's path. A missing
// program is the machine's lack, not the code's fault: the test skips
// rather than fails, as it does when not root.
func RequireCommand(t testing.TB, name, debianPackage string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Skipf("needs %s (apt-get install %s)", name, debianPackage)
	}
	return path
}

// requireKnown is RequireCommand for a program the helpers run on a
// caller's behalf (Start, Exec): a program named as in debianPackages is
// required, so that its absence skips t; any other, a path to a binary the
// test built above all, is left to fail where it is run.
func requireKnown(t testing.TB, name string) {
	t.Helper()
	if pkg, ok := debianPackages[name]; ok {
		RequireCommand(t, name, pkg)
	}
}
