package main_test

// TestIntegrationFlows needs the daemon's HTTP listener (--metrics ADDR),
// which is written on another branch of issue 16: until both are merged it
// skips, saying so. After the merge it runs with the other integration
// tests (bash scripts/test.sh -run TestIntegrationFlows -- ./cmd/netstackd).

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/netnstest"
)

// liveFlow is an entry of GET /flows, read by the names scripts rely on.
type liveFlow struct {
	ID          uint64 `json:"id"`
	Proto       string `json:"proto"`
	Direction   string `json:"direction"`
	Destination string `json:"destination"`
	Upstream    string `json:"upstream"`
	UpBytes     uint64 `json:"up_bytes"`
	DownBytes   uint64 `json:"down_bytes"`
}

// TestIntegrationFlows: GET /flows lists a live download (curl
// --limit-rate through netstackd) with growing byte counts, `netstackd
// flows` prints it, and DELETE /flows/ID ends it with a reset that curl
// reports.
func TestIntegrationFlows(t *testing.T) {
	requireBinary(t)
	if help, _ := exec.Command(netstackdBin, "--help").CombinedOutput(); !bytes.Contains(help, []byte("--metrics")) {
		t.Skip("this netstackd has no --metrics listener yet (issue 16, merged separately)")
	}
	tp := netnstest.New(t)
	tp.StartServers(t)
	// The listener is on the daemon namespace's loopback: no other test
	// shares that namespace, so a fixed port is free.
	const metrics = "127.0.0.1:19090"
	startNetstackd(t, tp, "--metrics", metrics)
	api := &http.Client{
		Timeout: 10 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			return tp.Daemon.DialContext(ctx, network, metrics)
		}},
	}
	list := func() []liveFlow {
		t.Helper()
		resp, err := api.Get("http://" + metrics + "/flows")
		if err != nil {
			t.Fatalf("GET /flows: %v", err)
		}
		defer resp.Body.Close()
		var flows []liveFlow
		if err := json.NewDecoder(resp.Body).Decode(&flows); err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("GET /flows: %s, %v", resp.Status, err)
		}
		return flows
	}

	ctx := netnstest.TestContext(t, 90*time.Second)
	dl := startSlowDownload(t, tp)

	server := serverAddr(netnstest.ServerIPv4, netnstest.HTTPPort)
	find := func() (liveFlow, bool) {
		for _, f := range list() {
			if f.Proto == "tcp" && f.Destination == server {
				return f, true
			}
		}
		return liveFlow{}, false
	}
	var first, later liveFlow
	err := netnstest.Poll(ctx, 50*time.Millisecond, func() (bool, error) {
		f, ok := find()
		if !ok || f.DownBytes == 0 {
			return false, nil
		}
		if first.ID == 0 {
			first = f
			return false, nil
		}
		later = f
		return f.DownBytes >= first.DownBytes+256<<10, nil // a second's worth more
	})
	if err != nil {
		t.Fatalf("no growing download in GET /flows (first %+v, last %+v): %v", first, later, err)
	}
	if later.ID != first.ID || later.Direction != "outbound" || later.Upstream != server || later.UpBytes == 0 {
		t.Fatalf("download listed as %+v, then %+v", first, later)
	}
	t.Logf("download: %d then %d bytes down", first.DownBytes, later.DownBytes)

	// The same flow in the table a person reads.
	r := tp.Daemon.Exec(t, 15*time.Second, netstackdBin, "flows", "--metrics", metrics)
	id := strconv.FormatUint(later.ID, 10)
	if r.Err != nil || !strings.Contains(r.Stdout, server) || !strings.Contains(r.Stdout, "\n"+id+" ") {
		t.Fatalf("netstackd flows: %s", r)
	}

	req, _ := http.NewRequest(http.MethodDelete, "http://"+metrics+"/flows/"+id, nil)
	resp, err := api.Do(req)
	if err != nil {
		t.Fatalf("DELETE /flows/%s: %v", id, err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNoContent {
		t.Fatalf("DELETE /flows/%s: %s", id, resp.Status)
	}
	dl.waitReset(t, "DELETE", 15*time.Second)
	if _, ok := find(); ok {
		t.Error("the reset download is still listed")
	}
}

// slowDownload is curl fetching 100 MiB at 256 KiB/s in tp's client
// namespace: far longer than a test, so that only a reset ends it early.
type slowDownload struct {
	done   chan error // curl's exit
	stderr bytes.Buffer
}

// startSlowDownload starts the download; it is killed when the test ends.
func startSlowDownload(t *testing.T, tp *netnstest.Topology) *slowDownload {
	t.Helper()
	// A reset reaches curl only once it has read what its socket holds
	// (Linux keeps the received data queued ahead of the error): with the
	// default receive buffer, up to 6 MiB, 25 s at this rate. 256 KiB is a
	// second's worth. The namespace is the test's own.
	if r := tp.Client.Exec(t, 10*time.Second, "sysctl", "-qw", "net.ipv4.tcp_rmem=4096 65536 262144"); r.Err != nil {
		t.Fatalf("bound the client's receive buffer: %s", r)
	}
	ctx := netnstest.TestContext(t, 90*time.Second)
	cmd := tp.Client.Command(ctx, "curl", "-sS", "-g", "--max-time", "60", "--limit-rate", "256K", "-o", "/dev/null",
		httpURL(netnstest.ServerIPv4, fmt.Sprintf("/bytes?n=%d", 100<<20)))
	d := &slowDownload{done: make(chan error, 1)}
	cmd.Stderr = &d.stderr
	if err := cmd.Start(); err != nil {
		t.Fatalf("start curl: %v", err)
	}
	go func() { d.done <- cmd.Wait() }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		err := <-d.done
		d.done <- err
	})
	return d
}

// waitReset waits up to bound, after what (the cause), for curl to end
// saying its connection was reset (curl: (56) Recv failure: Connection
// reset by peer), and returns how long that took.
func (d *slowDownload) waitReset(t *testing.T, what string, bound time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	select {
	case err := <-d.done:
		d.done <- err // for the cleanup
		if err == nil || !strings.Contains(d.stderr.String(), "reset") {
			t.Fatalf("curl after %s: %v: %s", what, err, d.stderr.String())
		}
	case <-time.After(bound):
		t.Fatalf("curl still downloading %v after %s", bound, what)
	}
	return time.Since(start)
}
