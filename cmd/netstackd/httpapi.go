package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/internal/pcap"
	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/stack"
)

// The HTTP listener of --metrics: /metrics, /healthz and, with --pprof,
// /debug/pprof/. It runs while the stack serves: started once the stack is
// up, shut down before the stack closes, so a scrape never reads a stack
// that is gone.

const (
	// healthInterval is how often the upstream proxy is probed for
	// /healthz: a dead proxy shows within it, and one TCP handshake with
	// the proxy every few seconds costs nothing.
	healthInterval = 5 * time.Second
	// apiShutdownLimit bounds waiting for requests in progress (a scrape,
	// a CPU profile) at stop; past it their connections are closed.
	apiShutdownLimit = 2 * time.Second
)

// apiConfig is what the listener serves.
type apiConfig struct {
	addr    string // host:port (parseMetricsAddr)
	pprof   bool   // mount /debug/pprof/
	metrics metricsSources
	dialer  proxy.Dialer  // probed for /healthz when it has a proxy (proxy.Prober)
	timeout time.Duration // bound on one probe
	done    <-chan struct{}
	// mount, if not nil, adds handlers of other parts (the live flow
	// view) to the mux before it serves.
	mount func(*http.ServeMux)
	log   *slog.Logger
}

// apiServer owns the listener, its HTTP server and the health prober.
type apiServer struct {
	srv       *http.Server
	mux       *http.ServeMux
	ln        net.Listener
	health    *upstreamHealth
	cancel    context.CancelFunc
	wg        sync.WaitGroup // the server's Serve loop and the prober
	closeOnce sync.Once
	log       *slog.Logger
}

// startAPI listens on cfg.addr and serves there until Close.
func startAPI(cfg apiConfig) (*apiServer, error) {
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: listen on %s: %w", cfg.addr, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	a := &apiServer{mux: http.NewServeMux(), ln: ln, cancel: cancel, log: cfg.log, health: cfg.metrics.health}

	reg := prometheus.NewRegistry() // private: nothing another package registers leaks in
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		newMetricsCollector(cfg.metrics),
	)
	a.mux.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{
		ErrorLog:            slog.NewLogLogger(cfg.log.Handler(), slog.LevelWarn),
		MaxRequestsInFlight: 4, // a scrape storm costs no more than four snapshots at once
	}))
	a.mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, r *http.Request) {
		st := a.health.status()
		select {
		case <-cfg.done:
			st = healthStatus{reason: "stack stopped serving"}
		default:
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !st.ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, st.reason)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	if cfg.pprof {
		// On our mux, not http.DefaultServeMux, which importing
		// net/http/pprof fills for every listener in the process.
		a.mux.HandleFunc("/debug/pprof/", pprof.Index)
		a.mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
		a.mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
		a.mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
		a.mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	}
	if cfg.mount != nil {
		cfg.mount(a.mux)
	}

	a.srv = &http.Server{
		Handler:           a.mux,
		ReadHeaderTimeout: 5 * time.Second,
		IdleTimeout:       time.Minute,
		ErrorLog:          slog.NewLogLogger(cfg.log.Handler(), slog.LevelDebug),
	}
	a.wg.Go(func() { a.health.run(ctx, cfg.dialer, cfg.timeout) })
	a.wg.Go(func() {
		if err := a.srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			cfg.log.Error("metrics listener failed", "addr", ln.Addr(), "err", err)
		}
	})
	cfg.log.Info("metrics listening", "addr", ln.Addr(), "pprof", cfg.pprof)
	return a, nil
}

// Addr is the address the listener is bound to.
func (a *apiServer) Addr() net.Addr { return a.ln.Addr() }

// Close stops the prober and the server, letting requests in progress
// finish for at most apiShutdownLimit, and waits for both. Safe to call
// twice, and on a nil server (no --metrics).
func (a *apiServer) Close() {
	if a == nil {
		return
	}
	a.closeOnce.Do(func() {
		a.cancel()
		ctx, cancel := context.WithTimeout(context.Background(), apiShutdownLimit)
		defer cancel()
		if err := a.srv.Shutdown(ctx); err != nil {
			a.log.Debug("metrics listener: requests cut at shutdown", "err", err)
			a.srv.Close()
		}
		a.wg.Wait()
	})
}

// healthStatus is the last verdict on the upstream.
type healthStatus struct {
	ok     bool
	reason string // why not ok
}

// upstreamHealth caches the verdict of a background probe, so that
// /healthz answers at once and a burst of health checks dials nothing.
type upstreamHealth struct {
	last   atomic.Pointer[healthStatus]
	log    *slog.Logger
	probed bool // a probe has answered: owned by the one goroutine that probes
}

// newUpstreamHealth starts not ok until the first probe says otherwise: a
// proxy nobody has heard from is not known to be usable. A dialer with no
// proxy (Direct) is healthy from the start. Each change of verdict is
// logged: the proxy not answering at warn level, answering at info.
func newUpstreamHealth(d proxy.Dialer, log *slog.Logger) *upstreamHealth {
	h := &upstreamHealth{log: log}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	st := &healthStatus{reason: "upstream not probed yet"}
	if _, ok := d.(proxy.Prober); !ok {
		st = &healthStatus{ok: true}
	}
	h.last.Store(st)
	return h
}

func (h *upstreamHealth) status() healthStatus { return *h.last.Load() }

// probe checks d once, within timeout, and keeps and logs the verdict; it
// reports false when ctx ended first. Only one goroutine probes: run's,
// with --metrics, or netstackd's check at start without it.
func (h *upstreamHealth) probe(ctx context.Context, d proxy.Dialer, timeout time.Duration) bool {
	if _, ok := d.(proxy.Prober); !ok {
		return true
	}
	pctx, cancel := context.WithTimeout(ctx, timeout)
	start := time.Now()
	err := proxy.Probe(pctx, d)
	cancel()
	if ctx.Err() != nil {
		return false
	}
	was := h.last.Load().ok
	st := &healthStatus{ok: true}
	if err != nil {
		st = &healthStatus{reason: fmt.Sprintf("upstream %v does not answer: %v", d, err)}
	}
	h.last.Store(st)
	first := !h.probed
	h.probed = true
	switch {
	case err == nil && (first || !was):
		h.log.Info("proxy answers", "proxy", d, "took", time.Since(start).Round(time.Microsecond))
	case err != nil && (first || was):
		h.log.Warn("proxy does not answer: flows through it fail until it does", "proxy", d, "err", err)
	}
	return true
}

// run probes d every healthInterval until ctx ends.
func (h *upstreamHealth) run(ctx context.Context, d proxy.Dialer, timeout time.Duration) {
	if _, ok := d.(proxy.Prober); !ok {
		return
	}
	timeout = min(timeout, healthInterval)
	tick := time.NewTicker(healthInterval)
	defer tick.Stop()
	for h.probe(ctx, d, timeout) {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
	}
}

// startMetrics starts the --metrics listener on the running stack st; nil
// without --metrics.
func startMetrics(opts *options, up *upstream, st *stack.Stack, resolver *dns.Server, refused *refusals, capture *pcap.Switch, health *upstreamHealth, log *slog.Logger) (*apiServer, error) {
	if opts.metricsAddr == "" {
		return nil, nil
	}
	mode := "proxy"
	if _, ok := up.dialer.(proxy.Direct); ok {
		mode = "direct"
	}
	return startAPI(apiConfig{
		addr:  opts.metricsAddr,
		pprof: opts.pprof,
		metrics: metricsSources{
			stack:    st.Stats,
			dns:      resolver,
			refused:  refused,
			health:   health,
			mode:     mode,
			upstream: fmt.Sprint(up.dialer),
		},
		dialer:  up.dialer,
		timeout: opts.dialTimeout,
		done:    st.Done(),
		mount: func(mux *http.ServeMux) {
			// The live flow view (flows.go): GET /flows, DELETE /flows/ID.
			flows := newFlowsHandler(st)
			mux.Handle("/flows", flows)
			mux.Handle("/flows/", flows)
			if capture != nil {
				mux.Handle("/pcap", pcapHandler(capture, log))
			}
		},
		log: log,
	})
}

// pcapHandler turns --pcap recording off and on while netstackd runs:
// GET /pcap says whether it records and where, POST /pcap?recording=false
// stops and closes the file, POST /pcap?recording=true starts a new one at
// the same path (the file is fixed at start: a request names no path, so
// the listener cannot be made to write anywhere else).
func pcapHandler(capture *pcap.Switch, log *slog.Logger) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.Method {
		case http.MethodGet:
		case http.MethodPost:
			on, err := strconv.ParseBool(r.URL.Query().Get("recording"))
			if err != nil {
				http.Error(w, "want ?recording=true or ?recording=false", http.StatusBadRequest)
				return
			}
			if on {
				err = capture.On()
			} else {
				err = capture.Off()
			}
			if err != nil {
				http.Error(w, err.Error(), http.StatusInternalServerError)
				return
			}
			log.Info("pcap: switched by request", "file", capture.Path(), "recording", on)
		default:
			w.Header().Set("Allow", "GET, POST")
			http.Error(w, "GET or POST", http.StatusMethodNotAllowed)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(struct {
			File      string `json:"file"`
			Recording bool   `json:"recording"`
		}{capture.Path(), capture.Recording()})
	})
}
