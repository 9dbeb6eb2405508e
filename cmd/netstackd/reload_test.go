package main

import (
	"log/slog"
	"os"
	"slices"
	"strings"
	"testing"
)

// TestReloadKeepsReporting: a key that cannot change while running is
// reported as kept by every reload that finds it changed, not only the
// first, even when the same reload applied another key; a key applied is
// not reported again.
func TestReloadKeepsReporting(t *testing.T) {
	path := writeFile(t, "socks = \"127.0.0.1:1080\"\nlog-level = \"info\"\n")
	args := []string{"--config", path}
	opts, err := parseFlags(args, false, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	level := new(slog.LevelVar)
	level.Set(opts.logLevel)
	up, err := newUpstream(t.Context(), opts, &refusals{log: slog.New(slog.DiscardHandler)}, nil, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	live := up.live
	t.Cleanup(live.Close)
	r := newReloader(args, opts, level, up, nil, nil, slog.New(slog.DiscardHandler))

	if err := os.WriteFile(path, []byte("socks = \"127.0.0.1:1081\"\nlog-level = \"debug\"\nmtu = 1400\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	changed, kept, err := r.reload(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Contains(changed, "log-level") || !slices.Contains(changed, "proxy") || !slices.Equal(kept, []string{"mtu"}) {
		t.Fatalf("first reload: changed %v, kept %v; want log-level and proxy changed, mtu kept", changed, kept)
	}
	if level.Level() != slog.LevelDebug || live.String() != "proxy1=socks5://127.0.0.1:1081" {
		t.Fatalf("after the reload: level %v, proxy %s", level.Level(), live)
	}
	changed, kept, err = r.reload(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(changed) != 0 || !slices.Equal(kept, []string{"mtu"}) {
		t.Fatalf("second reload of the same file: changed %v, kept %v; want nothing changed, mtu kept again", changed, kept)
	}
	if opts.logLevel != slog.LevelInfo || ups(opts) != "proxy1=socks5://127.0.0.1:1080" {
		t.Errorf("the reload wrote the running options: level %v, proxy %s", opts.logLevel, ups(opts))
	}

	if err := os.WriteFile(path, []byte("socks = ["), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := r.reload(t.Context()); err == nil {
		t.Fatal("a file that does not parse was accepted")
	}
	if live.String() != "proxy1=socks5://127.0.0.1:1081" {
		t.Errorf("a refused reload changed the proxy to %s", live)
	}
}

// TestReloadDNSUpstream: a changed --dns-upstream is applied to the
// resolver at once; the DNS mode is kept.
func TestReloadDNSUpstream(t *testing.T) {
	path := writeFile(t, "dns-upstream = \"127.0.0.1:5301\"\n")
	args := []string{"--config", path}
	opts, err := parseFlags(args, false, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	discard := slog.New(slog.DiscardHandler)
	up, err := newUpstream(t.Context(), opts, &refusals{log: discard}, nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	resolver, err := newDNS(opts, up.direct, nil, nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	defer resolver.Close()
	r := newReloader(args, opts, new(slog.LevelVar), up, nil, resolver, discard)
	if err := os.WriteFile(path, []byte("dns-upstream = \"127.0.0.1:5302\"\ndns = \"fake-ip\"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	changed, kept, err := r.reload(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(changed, []string{"dns-upstream"}) || !slices.Contains(kept, "dns") || resolver.Upstream() != "127.0.0.1:5302" {
		t.Errorf("changed %v, kept %v, resolver upstream %s; want dns-upstream changed to 127.0.0.1:5302 and dns kept", changed, kept, resolver.Upstream())
	}
}

// TestReloadHostWideRules: in host-wide mode a reload keeps the proxies it
// started with, and the rules it compiles again still name them
// (proxy:NAME): the reload is applied, not refused for want of a proxy.
func TestReloadHostWideRules(t *testing.T) {
	path := writeFile(t, "socks = \"127.0.0.1:1080\"\nrule = [\"port:80=proxy:proxy1\"]\n")
	args := []string{"--config", path}
	opts, err := parseFlags(args, false, &strings.Builder{})
	if err != nil {
		t.Fatal(err)
	}
	discard := slog.New(slog.DiscardHandler)
	refused := &refusals{log: discard}
	up, err := newUpstream(t.Context(), opts, refused, nil, discard)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.live.Close)
	if up.routes, err = newRouter(opts, up, refused, discard); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(up.routes.Close)
	// What host-wide mode changes for a reload; the rest of its set-up
	// (marks, a routing table) needs root and plays no part here.
	opts.hostWide = true
	r := newReloader(args, opts, new(slog.LevelVar), up, nil, nil, discard)
	if err := os.WriteFile(path, []byte("socks = \"127.0.0.1:1080\"\nrule = [\"port:81=proxy:proxy1\"]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	changed, _, err := r.reload(t.Context())
	if err != nil {
		t.Fatalf("reload with a proxy:NAME rule in host-wide mode: %v", err)
	}
	if !slices.Contains(changed, "rule") {
		t.Fatalf("changed %v, want rule", changed)
	}
}
