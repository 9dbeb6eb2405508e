package proxy

import (
	"os/exec"
	"strings"
	"testing"
)

// TestDeps holds proxy to its place in the import graph: the standard
// library and its own codecs, nothing of the stack, the TUN or DNS.
func TestDeps(t *testing.T) {
	gotool, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go tool not in PATH")
	}
	out, err := exec.CommandContext(t.Context(), gotool, "list", "-deps",
		"-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", ".", "./socks5", "./socks4", "./httpconnect").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	allowed := map[string]bool{
		"github.com/netstackd/netstackd/proxy":             true,
		"github.com/netstackd/netstackd/proxy/socks5":      true,
		"github.com/netstackd/netstackd/proxy/socks4":      true,
		"github.com/netstackd/netstackd/proxy/httpconnect": true,
	}
	for dep := range strings.FieldsSeq(string(out)) {
		if !allowed[dep] {
			t.Errorf("proxy depends on %s; it may import only the standard library", dep)
		}
	}
}
