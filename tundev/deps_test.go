package tundev_test

import (
	"context"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestImports keeps tundev at the bottom of the graph: it must not know the
// stack, the proxies, DNS or gVisor (STYLE.md section 1).
func TestImports(t *testing.T) {
	gobin, err := exec.LookPath("go")
	if err != nil {
		t.Skip("go command not found")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, gobin, "list", "-deps", "github.com/netstackd/netstackd/tundev").CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps: %v: %s", err, out)
	}
	forbidden := []string{
		"gvisor.dev/",
		"github.com/miekg/dns",
		"github.com/netstackd/netstackd/stack",
		"github.com/netstackd/netstackd/proxy",
		"github.com/netstackd/netstackd/dns",
	}
	for dep := range strings.Lines(string(out)) {
		dep = strings.TrimSpace(dep)
		for _, f := range forbidden {
			if strings.HasPrefix(dep, f) {
				t.Errorf("tundev depends on %s", dep)
			}
		}
	}
}
