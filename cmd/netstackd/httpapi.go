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
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/netstackd/netstackd/dns"
	"github.com/netstackd/netstackd/internal/pcap"
	"github.com/netstackd/netstackd/stack"
)

// The HTTP listener of --metrics: /metrics, /healthz and, with --pprof,
// /debug/pprof/. It runs while the stack serves: started once the stack is
// up, shut down before the stack closes, so a scrape never reads a stack
// that is gone.

const (
	// healthInterval is how often each upstream proxy is probed
	// (proxy.Group): a dead proxy shows within it, new flows move to the
	// next upstream, and one TCP handshake with each proxy every few
	// seconds costs nothing.
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
	done    <-chan struct{}
	// mount, if not nil, adds handlers of other parts (the live flow
	// view) to the mux before it serves.
	mount func(*http.ServeMux)
	log   *slog.Logger
}

// apiServer owns the listener and its HTTP server.
type apiServer struct {
	srv       *http.Server
	mux       *http.ServeMux
	ln        net.Listener
	wg        sync.WaitGroup // the server's Serve loop
	closeOnce sync.Once
	log       *slog.Logger
}

// startAPI listens on cfg.addr and serves there until Close.
func startAPI(cfg apiConfig) (*apiServer, error) {
	ln, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return nil, fmt.Errorf("--metrics: listen on %s: %w", cfg.addr, err)
	}
	a := &apiServer{mux: http.NewServeMux(), ln: ln, log: cfg.log}

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
		ok, reason := cfg.metrics.live.usable()
		select {
		case <-cfg.done:
			ok, reason = false, "stack stopped serving"
		default:
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if !ok {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, reason)
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

// Close stops the server, letting requests in progress finish for at most
// apiShutdownLimit, and waits for it. Safe to call twice, and on a nil
// server (no --metrics).
func (a *apiServer) Close() {
	if a == nil {
		return
	}
	a.closeOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), apiShutdownLimit)
		defer cancel()
		if err := a.srv.Shutdown(ctx); err != nil {
			a.log.Debug("metrics listener: requests cut at shutdown", "err", err)
			a.srv.Close()
		}
		a.wg.Wait()
	})
}

// startMetrics starts the --metrics listener on the running stack st; nil
// without --metrics.
func startMetrics(opts *options, up *upstream, st *stack.Stack, resolver *dns.Server, refused *refusals, capture *pcap.Switch, log *slog.Logger) (*apiServer, error) {
	if opts.metricsAddr == "" {
		return nil, nil
	}
	mode := "proxy"
	if up.live == nil {
		mode = "direct"
	}
	return startAPI(apiConfig{
		addr:  opts.metricsAddr,
		pprof: opts.pprof,
		metrics: metricsSources{
			stack:   st.Stats,
			dns:     resolver,
			refused: refused,
			live:    up.live,
			routes:  up.routes,
			mode:    mode,
		},
		done: st.Done(),
		mount: func(mux *http.ServeMux) {
			// The live flow view (flows.go): GET /flows, DELETE /flows/ID.
			flows := newFlowsHandler(st)
			mux.Handle("/flows", flows)
			mux.Handle("/flows/", flows)
			mux.Handle("GET /upstreams", upstreamsHandler(up.live, st.Flows))
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
