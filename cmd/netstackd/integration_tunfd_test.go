package main_test

import (
	"bufio"
	"context"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

// TestIntegrationTunFD plays a container runtime: it creates and configures
// the TUN in the client namespace itself and passes only the descriptor to
// netstackd (--tun-fd), which moves packets and configures nothing.
func TestIntegrationTunFD(t *testing.T) {
	requireBinary(t)
	tp := netnstest.New(t)
	tp.StartServers(t)

	dev, err := tundev.Create(tundev.Config{
		Name:      "rt0",
		NetnsPath: tp.Client.Path,
		Addrs:     []netip.Prefix{netip.MustParsePrefix("198.18.0.1/15"), netip.MustParsePrefix("fd00:1898::1/64")},
		Routes:    []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")},
	})
	if err != nil {
		t.Fatalf("runtime creates tun: %v", err)
	}
	defer dev.Close()
	f, err := dev.DupFile()
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", "netns", "exec", tp.Daemon.Name, netstackdBin, "--tun-fd", "3", "--dns", "off", "--log-level", "debug")
	cmd.ExtraFiles = []*os.File{f}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	var logLines []string
	var readyLine string
	ready := make(chan struct{})
	scanned := make(chan struct{})
	go func() {
		defer close(scanned)
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			logLines = append(logLines, sc.Text())
			if !once && strings.Contains(sc.Text(), "msg=ready") {
				once = true
				readyLine = sc.Text()
				close(ready)
			}
		}
	}()
	defer func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-scanned
			cmd.Wait()
		}
		if t.Failed() {
			t.Logf("netstackd log:\n%s", strings.Join(logLines, "\n"))
		}
	}()
	select {
	case <-ready:
	case <-scanned:
		t.Fatal("netstackd exited before it was ready")
	case <-ctx.Done():
		t.Fatal("netstackd not ready within a minute")
	}
	// Issue 15: the ready line listed the default addresses, which
	// netstackd never put on a descriptor it was handed.
	if strings.Contains(readyLine, "198.18.0.1") || !strings.Contains(readyLine, `addrs="none`) {
		t.Errorf("ready line claims addresses netstackd did not configure: %s", readyLine)
	}
	// The runtime brings the link up once netstackd serves it.
	if err := dev.Up(); err != nil {
		t.Fatalf("runtime sets tun up: %v", err)
	}
	for _, ip := range []string{netnstest.ServerIPv4.String(), "[" + netnstest.ServerIPv6.String() + "]"} {
		r := curl(t, tp, 10*time.Second, "http://"+ip+":"+strconv.Itoa(netnstest.HTTPPort)+"/")
		if r.Err != nil || r.Stdout != netnstest.HelloBody {
			t.Fatalf("GET via --tun-fd to %s: %v\n%s", ip, r.Err, r)
		}
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	<-scanned
	if err := cmd.Wait(); err != nil {
		t.Fatalf("netstackd exit after SIGTERM: %v", err)
	}
	if ok, err := tp.Client.HasLink(ctx, "rt0"); err != nil || !ok {
		t.Errorf("the runtime's tun is gone after netstackd exited (%v): --tun-fd must leave it alone", err)
	}
}
