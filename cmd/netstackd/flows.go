package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/netstackd/netstackd/stack"
)

// The live view of flows (issue 16): GET /flows and DELETE /flows/ID on the
// HTTP listener, and `netstackd flows`, which reads them.

const (
	// flowsDefaultMax is how many flows GET /flows returns without ?max=,
	// and flowsMaxCap the most it returns with one: the answer stays a
	// few megabytes at worst, whatever the number of flows.
	flowsDefaultMax = 1000
	flowsMaxCap     = 10000
	// flowsDefaultAddr is where `netstackd flows` looks for the daemon's
	// HTTP listener (--metrics) unless told otherwise.
	flowsDefaultAddr = "127.0.0.1:9090"
)

// flowJSON is one flow in GET /flows. Its field names are what scripts
// read: add, never rename.
type flowJSON struct {
	ID    uint64 `json:"id"`
	Proto string `json:"proto"` // "tcp" or "udp"
	// Direction is "outbound" for a flow from behind the TUN, "inbound"
	// for one to a published port.
	Direction   string `json:"direction"`
	Client      string `json:"client"`
	Destination string `json:"destination"`
	// Name is the name the destination stands for, and NameFrom how it
	// is known: "fake-ip" (a fake address our DNS gave), "dns" (a real
	// address our DNS gave for it) or "sniffed" (TLS SNI, HTTP Host or
	// QUIC Initial).
	Name     string `json:"name,omitempty"`
	NameFrom string `json:"name_from,omitempty"`
	// Upstream is the far socket's peer: the destination, or the proxy.
	Upstream string `json:"upstream,omitempty"`
	// Via is the name of the upstream (--proxy NAME=) the flow went
	// through; empty when direct.
	Via string `json:"via,omitempty"`
	// Rule is the routing rule that decided the flow, as
	// `rule N "TEXT"`; empty when none did.
	Rule       string  `json:"rule,omitempty"`
	UpBytes    uint64  `json:"up_bytes"`   // from the client
	DownBytes  uint64  `json:"down_bytes"` // to the client
	AgeSeconds float64 `json:"age_seconds"`
	State      string  `json:"state"`
}

func toFlowJSON(f stack.FlowInfo) flowJSON {
	dir := "outbound"
	if f.Inbound {
		dir = "inbound"
	}
	return flowJSON{
		ID: f.ID, Proto: f.Proto, Direction: dir,
		Client: f.Client.String(), Destination: f.Destination.String(), Name: f.Name, NameFrom: f.NameFrom, Upstream: f.Upstream, Via: f.Via, Rule: f.Rule,
		UpBytes: f.Up, DownBytes: f.Down, AgeSeconds: f.Age.Seconds(), State: f.State,
	}
}

// flowLister is what the handler needs of the stack: *stack.Stack fits.
type flowLister interface {
	Flows(max int) []stack.FlowInfo
	CloseFlow(id uint64) bool
}

// newFlowsHandler serves GET /flows (a JSON array of the live flows, sorted
// by id; ?max=N, default 1000, at most 10000) and DELETE /flows/ID (resets
// that flow: 204, or 404 for an id with no live flow). Other methods get 405.
// Mount it for both "/flows" and "/flows/" without stripping the prefix.
func newFlowsHandler(st *stack.Stack) http.Handler { return flowsHandler(st) }

func flowsHandler(st flowLister) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /flows", func(w http.ResponseWriter, r *http.Request) {
		limit := flowsDefaultMax
		if s := r.URL.Query().Get("max"); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n <= 0 {
				http.Error(w, fmt.Sprintf("max=%q: want a positive number", s), http.StatusBadRequest)
				return
			}
			limit = min(n, flowsMaxCap)
		}
		flows := st.Flows(limit)
		out := make([]flowJSON, len(flows))
		for i, f := range flows {
			out[i] = toFlowJSON(f)
		}
		w.Header().Set("Content-Type", "application/json")
		w.Header().Set("Cache-Control", "no-store")
		// An error here is the client going away: nothing to tell it.
		_ = json.NewEncoder(w).Encode(out)
	})
	mux.HandleFunc("DELETE /flows/{id}", func(w http.ResponseWriter, r *http.Request) {
		id, err := strconv.ParseUint(r.PathValue("id"), 10, 64)
		if err != nil {
			http.Error(w, fmt.Sprintf("flow id %q: want a number", r.PathValue("id")), http.StatusBadRequest)
			return
		}
		if !st.CloseFlow(id) {
			http.Error(w, fmt.Sprintf("no live flow %d", id), http.StatusNotFound)
			return
		}
		w.WriteHeader(http.StatusNoContent)
	})
	return mux
}

const flowsUsage = `netstackd flows: list the live flows of a running netstackd, or close one.
It asks the daemon's HTTP listener (netstackd --metrics ADDR).

Usage:
  netstackd flows [--metrics ADDR] [--max N]   print the flows as a table
  netstackd flows [--metrics ADDR] --close ID  reset flow ID (both sides)

Flags:
`

// runFlows is the flows subcommand.
func runFlows(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("netstackd flows", flag.ContinueOnError)
	fs.SetOutput(stderr)
	addr := fs.String("metrics", flowsDefaultAddr, "`ADDR` of the daemon's HTTP listener, as its --metrics was given (PORT, :PORT or HOST:PORT)")
	closeID := fs.String("close", "", "reset the flow with this `ID` instead of listing")
	limit := fs.Int("max", flowsDefaultMax, "list at most `N` flows, the oldest ids first (the daemon caps it at 10000)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), flowsUsage)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stdout)
			fs.Usage()
			return exitOK
		}
		return exitUsage
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "netstackd flows: unexpected argument %q (see netstackd flows --help)\n", fs.Arg(0))
		return exitUsage
	}
	base, err := flowsURL(*addr)
	if err != nil {
		fmt.Fprintf(stderr, "netstackd flows: --metrics: %v\n", err)
		return exitUsage
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	client := &http.Client{}
	if *closeID != "" {
		id, err := strconv.ParseUint(*closeID, 10, 64)
		if err != nil {
			fmt.Fprintf(stderr, "netstackd flows: --close %q: want a flow id (a number)\n", *closeID)
			return exitUsage
		}
		if err := closeFlow(ctx, client, base, id); err != nil {
			fmt.Fprintf(stderr, "netstackd flows: %v\n", err)
			return exitFail
		}
		fmt.Fprintf(stdout, "flow %d reset\n", id)
		return exitOK
	}
	if *limit <= 0 {
		fmt.Fprintf(stderr, "netstackd flows: --max %d: want a positive number\n", *limit)
		return exitUsage
	}
	flows, err := fetchFlows(ctx, client, base, *limit)
	if err != nil {
		fmt.Fprintf(stderr, "netstackd flows: %v\n", err)
		return exitFail
	}
	// The upstreams first, when the daemon serves them (an older one
	// does not: 404).
	if ups, err := fetchUpstreams(ctx, client, strings.TrimSuffix(base, "/flows")+"/upstreams"); err != nil {
		fmt.Fprintf(stderr, "netstackd flows: %v\n", err)
		return exitFail
	} else if ups != nil {
		if err := printUpstreams(stdout, ups); err != nil {
			fmt.Fprintf(stderr, "netstackd flows: %v\n", err)
			return exitFail
		}
	}
	if err := printFlows(stdout, flows); err != nil {
		fmt.Fprintf(stderr, "netstackd flows: %v\n", err)
		return exitFail
	}
	return exitOK
}

// flowsURL is the /flows URL of the listener at addr, written as the
// daemon's --metrics takes it (PORT, :PORT or HOST:PORT).
func flowsURL(addr string) (string, error) {
	hostPort, err := parseMetricsAddr(addr)
	if err != nil {
		return "", err
	}
	u := url.URL{Scheme: "http", Host: hostPort, Path: "/flows"}
	return u.String(), nil
}

func fetchFlows(ctx context.Context, c *http.Client, base string, limit int) ([]flowJSON, error) {
	var flows []flowJSON
	if err := getJSON(ctx, c, base+"?max="+strconv.Itoa(limit), 64<<20, &flows); err != nil {
		return nil, fmt.Errorf("get flows: %w", err)
	}
	return flows, nil
}

// errNotFound is getJSON's error for a 404.
var errNotFound = errors.New("not found")

// getJSON decodes the answer to GET u, at most limit bytes, into out.
func getJSON(ctx context.Context, c *http.Client, u string, limit int64, out any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
	if err != nil {
		return err
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("is netstackd running with --metrics? %w", err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusOK:
	case http.StatusNotFound:
		return fmt.Errorf("%s: %w", u, errNotFound)
	default:
		return fmt.Errorf("%s: %s", u, statusText(resp))
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, limit)).Decode(out); err != nil {
		return fmt.Errorf("read %s: %w", u, err)
	}
	return nil
}

func closeFlow(ctx context.Context, c *http.Client, base string, id uint64) error {
	u := base + "/" + strconv.FormatUint(id, 10)
	req, err := http.NewRequestWithContext(ctx, http.MethodDelete, u, nil)
	if err != nil {
		return fmt.Errorf("close flow %d: %w", id, err)
	}
	resp, err := c.Do(req)
	if err != nil {
		return fmt.Errorf("close flow %d (is netstackd running with --metrics?): %w", id, err)
	}
	defer resp.Body.Close()
	switch resp.StatusCode {
	case http.StatusNoContent, http.StatusOK:
		return nil
	case http.StatusNotFound:
		return fmt.Errorf("close flow %d: no such live flow", id)
	}
	return fmt.Errorf("close flow %d: %s", id, statusText(resp))
}

// statusText is the response's status and the start of its body.
func statusText(resp *http.Response) string {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if msg := strings.TrimSpace(string(body)); msg != "" {
		return resp.Status + ": " + msg
	}
	return resp.Status
}

// fetchUpstreams reads GET /upstreams; nil, nil from a daemon without it.
func fetchUpstreams(ctx context.Context, c *http.Client, u string) ([]upstreamJSON, error) {
	var ups []upstreamJSON
	err := getJSON(ctx, c, u, 1<<20, &ups)
	if errors.Is(err, errNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("get upstreams: %w", err)
	}
	return ups, nil
}

// printUpstreams writes the upstreams as a table, and a blank line.
func printUpstreams(w io.Writer, ups []upstreamJSON) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "UPSTREAM\tSTATE\tSINCE\tFLOWS\tURL\tERROR")
	for _, u := range ups {
		since, errText := u.Since, u.Error
		if since == "" {
			since = "-"
		}
		if errText == "" {
			errText = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\n", u.Name, u.State, since, u.FlowsActive, u.URL, errText)
	}
	fmt.Fprintln(tw)
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}

// printFlows writes flows as a table for a person.
func printFlows(w io.Writer, flows []flowJSON) error {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "ID\tPROTO\tCLIENT\tDESTINATION\tUPSTREAM\tUP\tDOWN\tAGE\tSTATE\tRULE")
	for _, f := range flows {
		proto := f.Proto
		if f.Direction == "inbound" {
			proto += "-in"
		}
		dst := f.Destination
		switch {
		case f.NameFrom == "sniffed":
			dst = f.Name + " (sniffed " + f.Destination + ")"
		case f.Name != "":
			dst = f.Name + " (" + f.Destination + ")"
		}
		// The rule by its number: its text is in the JSON and the log.
		rule := "-"
		if n, _, ok := strings.Cut(strings.TrimPrefix(f.Rule, "rule "), " "); ok {
			rule = n
		}
		upstream := f.Upstream
		switch {
		case f.Via != "" && upstream != "":
			upstream = f.Via + "=" + upstream
		case f.Via != "":
			upstream = f.Via
		case upstream == "":
			upstream = "-"
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", f.ID, proto, f.Client, dst, upstream,
			humanBytes(f.UpBytes), humanBytes(f.DownBytes), humanAge(f.AgeSeconds), f.State, rule)
	}
	if err := tw.Flush(); err != nil {
		return fmt.Errorf("write table: %w", err)
	}
	return nil
}

// humanBytes writes n in binary units, three significant digits at most.
func humanBytes(n uint64) string {
	if n < 1024 {
		return strconv.FormatUint(n, 10) + " B"
	}
	v, unit := float64(n)/1024, "KiB"
	for _, next := range []string{"MiB", "GiB", "TiB", "PiB", "EiB"} {
		if v < 1024 {
			break
		}
		v, unit = v/1024, next
	}
	if v < 10 {
		return strconv.FormatFloat(v, 'f', 1, 64) + " " + unit
	}
	return strconv.FormatFloat(v, 'f', 0, 64) + " " + unit
}

// humanAge writes an age to the second, as "1h2m3s".
func humanAge(seconds float64) string {
	return (time.Duration(seconds * float64(time.Second))).Round(time.Second).String()
}
