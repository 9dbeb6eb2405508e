// Command netstackd runs a userspace TCP/IP stack on a TUN device and relays
// every connection that enters it directly or through an upstream proxy.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"runtime/trace"
	"sync"
	"syscall"
	"time"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/internal/pcap"
	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
	"github.com/netstackd/netstackd/tundev"
)

// Exit codes: 2 is a usage error, as for flag and most Unix tools.
const (
	exitOK    = 0
	exitFail  = 1
	exitUsage = 2
)

func main() {
	if blob := os.Getenv(childEnv); blob != "" {
		os.Exit(runChild(blob))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	if len(args) > 0 && args[0] == "flows" {
		return runFlows(args[1:], stdout, stderr)
	}
	runMode := len(args) > 0 && args[0] == "run"
	if runMode {
		args = args[1:]
	}
	opts, err := parseFlags(args, runMode, stdout)
	if errors.Is(err, errHelp) || errors.Is(err, errVersion) {
		return exitOK
	}
	if err != nil {
		fmt.Fprintf(stderr, "netstackd: %v (see netstackd --help)\n", err)
		return exitUsage
	}
	if opts.user != nil && opts.hostWide && !canKeepCaps() {
		fmt.Fprintf(stderr, "netstackd: %v\n", errNeedsNoCgo)
		return exitUsage
	}
	level := new(slog.LevelVar) // a reload (SIGHUP) may change it
	level.Set(opts.logLevel)
	log := newLogger(stderr, opts.logFormat, level)
	refused := &refusals{log: log}
	// Flows through an upstream that goes down are reset (upstreams.go);
	// the stack is set once it runs.
	resets := &flowReset{log: log}
	up, err := newUpstream(context.Background(), opts, refused, resets.upstreamDown, log)
	if err != nil {
		fmt.Fprintf(stderr, "netstackd: --proxy: %v\n", err)
		if errors.Is(err, errResolveProxy) {
			return exitFail
		}
		return exitUsage
	}
	if up.routes, err = newRouter(opts, up, refused, log); err != nil {
		fmt.Fprintf(stderr, "netstackd: %v\n", err)
		return exitUsage
	}
	defer up.routes.Close()
	if up.live != nil {
		// Its health checks run from here, whatever the mode, and log
		// each upstream's state as it changes: a proxy that does not
		// answer is said at start, not first learnt from a client's
		// refused connection. A reload may replace the group; the one
		// in use then is closed here, after the reloader has stopped.
		defer up.live.Close()
	}
	dialer := up.dialer
	for _, rec := range []struct {
		flag, path string
		start      func(io.Writer) error
		stop       func()
	}{
		{"--cpu-profile", opts.cpuProfile, pprof.StartCPUProfile, pprof.StopCPUProfile},
		{"--exec-trace", opts.execTrace, trace.Start, trace.Stop},
	} {
		if rec.path == "" {
			continue
		}
		stop, err := startRecording(rec.path, rec.start, rec.stop)
		if err != nil {
			fmt.Fprintf(stderr, "netstackd: %s: %v\n", rec.flag, err)
			return exitUsage
		}
		defer stop()
	}
	var capture *pcap.Switch // on from the start; /pcap on the --metrics listener turns it off and on
	if opts.pcapPath != "" {
		capture = pcap.NewSwitch(pcap.Config{Path: opts.pcapPath, Interface: opts.tun, MaxSize: int64(opts.pcapMaxSize), Logger: log})
		if err := capture.On(); err != nil {
			fmt.Fprintf(stderr, "netstackd: --pcap: %v\n", err)
			return exitUsage
		}
		// Closed after the stack (deferred earlier, runs later), so the
		// last packets are in the file.
		defer func() {
			if err := capture.Off(); err != nil {
				log.Warn("pcap: close", "file", opts.pcapPath, "err", err)
			}
		}()
	}
	_, envProcs := os.LookupEnv("GOMAXPROCS")
	procs := chooseProcs(opts.procs, runtime.GOMAXPROCS(0), envProcs)
	runtime.GOMAXPROCS(procs)
	log.Info("CPUs for Go code", "procs", procs, "cpus", runtime.NumCPU())
	// Give memory back after bursts (memtrim.go), for as long as we run.
	trimCtx, stopTrim := context.WithCancel(context.Background())
	var trimming sync.WaitGroup
	trimming.Go(func() {
		tick := time.NewTicker(memoryTrimInterval)
		defer tick.Stop()
		newMemoryTrimmer(log).run(trimCtx, tick.C)
	})
	defer func() {
		stopTrim()
		trimming.Wait()
	}()
	opts.nofileSoft = sizeTables(opts, up, log)
	dnsDialer := dialer
	if _, ok := dialer.(proxy.Direct); ok {
		// The DNS upstream is the operator's choice, and often on
		// loopback (a local stub resolver): not refused as a client's
		// loopback flow is.
		dnsDialer = up.direct
	}
	resolver, err := newDNS(opts, dnsDialer, up.direct.Resolver, up.routes.namePolicy, log)
	if err != nil {
		fmt.Fprintf(stderr, "netstackd: %v\n", err)
		return exitUsage
	}
	if resolver != nil {
		defer resolver.Close()
	}
	gw4, gw6, target := gateways(opts)
	pubs, err := listenPublished(opts.publish, target, log)
	if err != nil {
		fmt.Fprintf(stderr, "netstackd: %v\n", err)
		return exitFail
	}
	defer pubs.close()
	serveTUN := func(dev *tundev.Device) (*tunService, error) {
		st, err := startStack(dev, capture, opts, up, resolver, gw4, gw6, log)
		if err != nil {
			return nil, err
		}
		pubs.serve(st)
		svc := &tunService{st: st, pubs: pubs, dns: resolver, refused: refused, log: log}
		resets.st.Store(st)
		if svc.api, err = startMetrics(opts, up, st, resolver, refused, capture, log); err != nil {
			svc.Stop()
			return nil, err
		}
		return svc, nil
	}

	if runMode {
		code, err := runCommand(opts, serveTUN, log)
		if err != nil {
			log.Error("netstackd run failed", "err", err)
			if code == exitOK {
				code = exitFail
			}
		}
		return code
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	hups, stopHups := notifyReload()
	defer stopHups()
	reloadCtx, stopReloads := context.WithCancel(ctx)
	var reloading sync.WaitGroup
	rl := newReloader(args, opts, level, up, resets.upstreamDown, resolver, log)
	rl.stack = resets.st.Load
	reloading.Go(func() { rl.run(reloadCtx, hups) })
	defer func() {
		stopReloads()
		reloading.Wait()
	}()
	if err := serve(ctx, opts, hostWideExcludes(opts, up), serveTUN, log); err != nil {
		log.Error("netstackd failed", "err", err)
		return exitFail
	}
	return exitOK
}

// tunService is the stack serving one TUN, with the published ports that
// feed it.
type tunService struct {
	st      *stack.Stack
	pubs    *publisher
	dns     *dns.Server // nil with --dns off
	refused *refusals
	api     *apiServer // --metrics (httpapi.go); nil without
	log     *slog.Logger
}

// Stop closes the metrics listener and the published ports, then the stack
// and its TUN, and says in one line what the run did: flows, and each kind
// of failure.
func (s *tunService) Stop() error {
	s.api.Close()
	s.pubs.close()
	err := s.st.Close()
	st := s.st.Stats()
	attrs := []any{
		"tcp_flows", st.TCPFlows, "tcp_dial_failed", st.TCPDialFailed, "tcp_refused", st.TCPRefused,
		"tcp_over_limit", st.TCPLimited, "udp_flows", st.UDPFlows, "udp_dropped_table_full", st.Drops.UDPTableFull,
		"refused_destinations", s.refused.count.Load(),
	}
	if s.dns != nil {
		attrs = append(attrs, "dns_pool_exhausted", s.dns.Stats().PoolExhausted)
	}
	s.log.Info("summary", attrs...)
	return err
}

// Done is closed when the stack can no longer serve; Err says why.
func (s *tunService) Done() <-chan struct{} { return s.st.Done() }
func (s *tunService) Err() error            { return s.st.Err() }

// startStack runs the stack on dev; closing the stack closes dev.
func startStack(dev *tundev.Device, capture *pcap.Switch, opts *options, up *upstream, resolver *dns.Server, gw4, gw6 netip.Addr, log *slog.Logger) (*stack.Stack, error) {
	dialer := up.dialer
	var sdev stack.Device = dev
	if capture != nil {
		sdev = pcap.Tap(dev, capture)
	}
	cfg := stack.Config{
		Device:        sdev,
		Dialer:        dialer,
		PingControl:   up.direct.Control,
		Refuse:        up.refuse,
		Logger:        log,
		MaxFlows:      opts.maxFlows,
		MaxUDPFlows:   opts.maxUDPFlows,
		MaxPingFlows:  opts.maxPingFlows,
		DialTimeout:   opts.dialTimeout,
		AcceptFirst:   opts.acceptFirst,
		HalfCloseIdle: opts.halfCloseIdle,
		UDPTimeout:    opts.udpTimeout,
		TCP:           opts.tcp,
		Gateway4:      gw4,
		Gateway6:      gw6,
	}
	cfg.MaxInFlight, cfg.MaxInFlightPerSource = opts.maxInFlight, opts.maxInFlightPerSource
	cfg.HandshakeTimeout = opts.handshakeTimeout
	if u := up.udp(); u != nil {
		cfg.UDP = u
	} else if len(opts.rules) > 0 {
		// The default upstream carries no UDP, but a rule may send UDP
		// elsewhere: the NAT must exist, and refuses the rest.
		cfg.UDP = noUDP{}
	}
	cfg.Route, cfg.SniffTimeout = up.routes.route, opts.sniffTimeout
	_, cfg.ForwardPing = dialer.(proxy.Direct)
	if resolver != nil {
		cfg.DNS = resolver
		if resolver.Mode() == dns.ModeFakeIP {
			cfg.Names = resolver
		}
		cfg.AddrNames = resolver.NameOf
	}
	st, err := stack.New(cfg)
	if err != nil {
		dev.Close()
		return nil, err
	}
	return st, nil
}

// gateways picks the addresses the stack owns on the TUN's link (published
// connections come from them) and the address published ports reach: the
// --dns-addr and the next free address of the IPv6 TUN prefix, and the first
// IPv4 TUN address (or IPv6 when there is none).
func gateways(opts *options) (gw4, gw6, target netip.Addr) {
	taken := func(a netip.Addr) bool {
		for _, p := range opts.addrs {
			if p.Addr() == a {
				return true
			}
		}
		return false
	}
	// firstFree is the first address of p after its network address that
	// the TUN does not use.
	firstFree := func(p netip.Prefix) netip.Addr {
		a := p.Masked().Addr().Next()
		for range 16 {
			if p.Contains(a) && !taken(a) {
				return a
			}
			a = a.Next()
		}
		return netip.Addr{}
	}
	for _, p := range opts.addrs {
		if p.Addr().Is4() && !gw4.IsValid() {
			gw4 = firstFree(p)
			if opts.dnsAddr.Is4() && p.Contains(opts.dnsAddr) && !taken(opts.dnsAddr) {
				gw4 = opts.dnsAddr
			}
			target = p.Addr()
		}
		if p.Addr().Is6() && !gw6.IsValid() {
			gw6 = firstFree(p)
			if !target.IsValid() {
				target = p.Addr()
			}
		}
	}
	return gw4, gw6, target
}

// newDNS builds the resolver for the chosen mode; nil in off mode. direct,
// if not nil, resolves the names under --dns-direct (host-wide mode's
// marked resolver).
func newDNS(opts *options, dialer proxy.Dialer, direct *net.Resolver, policy func(string) dns.NameAction, log *slog.Logger) (*dns.Server, error) {
	mode, err := dns.ParseMode(opts.dnsMode)
	if err != nil {
		return nil, fmt.Errorf("--dns: %w", err)
	}
	if mode == dns.ModeOff {
		return nil, nil
	}
	cfg := dns.Config{
		Mode:           mode,
		FakeRanges:     opts.fakeRanges,
		DirectSuffixes: opts.dnsDirect,
		Upstream:       opts.dnsUpstream,
		Dialer:         dialer,
		Policy:         policy,
		Logger:         log.With("component", "dns"),
	}
	if direct != nil {
		cfg.DirectResolver = direct
	}
	srv, err := dns.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("dns: %w", err)
	}
	return srv, nil
}

// serve brings the data path up in the order that makes readiness
// observable: the stack serves the TUN before the link goes up, and the routes
// appear last, so a caller that sees them knows every packet will be answered.
// In host-wide mode the routes go into their own table and the rules that
// lead to it come last (hostwide.go). Privileges are dropped (--user) once
// all of that is in place, before readiness is reported.
func serve(ctx context.Context, opts *options, excludes []netip.Prefix, serveTUN func(*tundev.Device) (*tunService, error), log *slog.Logger) error {
	ctx, stopWatch, err := watchNetnsProcess(ctx, opts.netns, log)
	if err != nil {
		return err
	}
	defer stopWatch()
	var dev *tundev.Device
	var helper *netnsHelper // created the TUN in a netns netstackd cannot enter (netnsjoin.go)
	if opts.tunFD >= 0 {
		// The runtime that passed the descriptor owns the interface and its
		// configuration: netstackd only moves packets.
		dev, err = tundev.FromFile(os.NewFile(uintptr(opts.tunFD), "tun-fd"), opts.mtu)
	} else {
		cfg := tundev.Config{
			Name:      opts.tun,
			NetnsPath: opts.netns,
			MTU:       opts.mtu,
			Addrs:     opts.addrs,
			Routes:    opts.routes,
			NoOffload: opts.noOffload,
			Queues:    opts.queues,
			Logger:    log,
		}
		if opts.hostWide {
			cfg.Routes = nil // into the policy table below, not main
		}
		dev, helper, err = createTUN(cfg, log)
		defer helper.close()
	}
	if err != nil {
		return tunHint(err, false)
	}
	svc, err := serveTUN(dev)
	if err != nil {
		return err
	}
	defer func() {
		_ = notify("STOPPING=1")
		if err := svc.Stop(); err != nil {
			log.Warn("close", "err", err)
		}
		log.Info("stopped")
	}()
	if err := helper.up(dev); err != nil {
		return err
	}
	if opts.hostWide {
		warnStrictRPFilter(dev.Name(), log)
		pol, err := tundev.InstallPolicy(tundev.PolicyConfig{
			Link:    dev.Name(),
			Routes:  opts.routes,
			Exclude: excludes,
			Mark:    opts.fwmark,
			Table:   opts.table,
			Logger:  log,
		})
		if err != nil {
			return err
		}
		// Deferred after stopStack, so it runs first: traffic leaves
		// the TUN's table before the TUN goes.
		defer func() {
			if err := pol.Close(); err != nil {
				log.Warn("remove host-wide routing", "err", err)
			}
		}()
	}
	if opts.user != nil {
		if err := dropPrivileges(*opts.user, opts.hostWide); err != nil {
			return fmt.Errorf("--user %s: %w", opts.user.spec, err)
		}
		log.Info("privileges dropped", "uid", opts.user.uid, "gid", opts.user.gid, "keep", keptCaps(opts.hostWide))
	}
	// Report what netstackd configured: a --tun-fd interface is its
	// owner's, whatever --addr and --route say.
	addrs, routes := fmt.Sprint(opts.addrs), fmt.Sprint(opts.routes)
	if opts.tunFD >= 0 {
		addrs = "none (--tun-fd: the owner's)"
		routes = addrs
	}
	log.Info("ready", "tun", dev.Name(), "netns", opts.netns, "mtu", dev.MTU(), "offloads", dev.Offloads(),
		"addrs", addrs, "routes", routes, "via", upstreamNames(opts.proxies), "hostwide", opts.hostWide)
	if err := notify("READY=1"); err != nil {
		log.Warn("sd_notify", "err", err)
	}
	select {
	case <-ctx.Done():
	case <-svc.Done():
		// The TUN is gone (its interface was deleted): there is
		// nothing left to serve, and a supervisor must see it.
		return fmt.Errorf("tun %s is gone, stopping: %w", dev.Name(), svc.Err())
	}
	log.Info("stopping")
	watchShutdown(log)
	return nil
}

// newLogger writes lines of the given format (--log-format) at level and
// above to w.
func newLogger(w io.Writer, format string, level slog.Leveler) *slog.Logger {
	o := &slog.HandlerOptions{Level: level}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, o))
	}
	return slog.New(slog.NewTextHandler(w, o))
}

// shutdownLimit bounds an orderly stop. Past it netstackd prints where every
// goroutine is, to find what held it, and exits 1: a supervisor waiting on
// a stop must not wait for ever.
const shutdownLimit = 15 * time.Second

func watchShutdown(log *slog.Logger) {
	time.AfterFunc(shutdownLimit, func() {
		log.Error("shutdown is stuck; goroutines follow", "after", shutdownLimit)
		_ = pprof.Lookup("goroutine").WriteTo(os.Stderr, 2)
		os.Exit(exitFail)
	})
}

// startRecording creates path and starts a recorder (a CPU profile, an
// execution trace) writing to it; the func it returns stops the recorder
// and closes the file.
func startRecording(path string, start func(io.Writer) error, stop func()) (func(), error) {
	f, err := os.Create(path)
	if err != nil {
		return nil, err
	}
	if err := start(f); err != nil {
		f.Close()
		return nil, err
	}
	return func() {
		stop()
		f.Close()
	}, nil
}
