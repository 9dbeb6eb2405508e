package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net"
	"net/netip"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/netstackd/netstackd/internal/pcap"
	"github.com/netstackd/netstackd/proxy"
	"github.com/netstackd/netstackd/rules"
	"github.com/netstackd/netstackd/stack"
	"github.com/netstackd/netstackd/tundev"
)

// options are the parsed command line.
type options struct {
	tun           string
	netns         string
	addrs         []netip.Prefix
	routes        []netip.Prefix
	routesSet     bool
	mtu           int
	noOffload     bool        // open the TUN without IFF_VNET_HDR
	queues        int         // TUN queues (IFF_MULTI_QUEUE), each read by its own goroutine
	proxies       []proxySpec // --proxy and --socks in order, named (upstreams.go); [direct] by default
	logLevel      slog.Level
	logFormat     string            // --log-format: text or json
	pcapPath      string            // --pcap: record what crosses the TUN there; "": don't
	pcapMaxSize   int               // --pcap-max-size: rotate at this many bytes
	effective     map[string]string // every configuration key's value in effect, for a reload to compare
	dialTimeout   time.Duration
	acceptFirst   bool // --tcp-handshake accept-first
	halfCloseIdle time.Duration
	maxFlows      int
	udpTimeout    time.Duration
	dnsMode       string
	dnsAddr       netip.Addr // the resolver address netstackd advertises (run's resolv.conf)
	fakeRanges    []netip.Prefix
	dnsDirect     []string
	dnsUpstream   string
	rules         []string      // --rule, in order: the routing rules (router.go)
	sniffTimeout  time.Duration // --sniff-timeout
	dialSniffed   bool          // --dial-sniffed-name
	configDir     string        // where relative list: paths of the rules are read from
	command       []string      // `run`: the program and its arguments
	keepProcesses bool          // `run`: no PID namespace; what the program leaves behind keeps running
	publish       []publishSpec
	cpuProfile    string
	execTrace     string
	metricsAddr   string         // --metrics: the HTTP listener's host:port (httpapi.go); "": none
	pprof         bool           // --pprof: /debug/pprof/ on that listener
	procs         int            // CPUs for Go code (GOMAXPROCS); 0: half of them (procs.go)
	tunFD         int            // serve this inherited TUN descriptor; -1: create one
	hostWide      bool           // default routes in netstackd's own namespace: policy routing (hostwide.go)
	fwmark        uint32         // SO_MARK of netstackd's own upstream sockets; 0: none
	table         int            // host-wide mode's routing table
	excludes      []netip.Prefix // kept off the TUN in host-wide mode
	user          *userSpec      // --user: switch to it once set up; nil: stay
	allowLoopback bool           // --allow-host-loopback: direct flows may reach netstackd's own loopback
	tcp           stack.TCPOptions

	// The open-file limit's say (fdlimit.go).
	maxFlowsSet  bool   // --max-flows given: a lower limit caps it with a warning
	maxUDPFlows  int    // sized against the limit at start; 0: stack's default
	maxPingFlows int    // likewise
	nofileSoft   uint64 // run's program gets this soft limit back; 0: Go's runtime restores it
	// Half-open TCP handshakes: --max-inflight, --max-inflight-per-source
	// (0: a quarter of maxInFlight), --tcp-handshake-timeout.
	maxInFlight, maxInFlightPerSource int
	handshakeTimeout                  time.Duration
}

// The values of --tcp-handshake.
const (
	handshakeDialFirst   = "dial-first"
	handshakeAcceptFirst = "accept-first"
)

// errHelp is returned when the user asked for the usage text.
var errHelp = errors.New("help requested")

func parseFlags(args []string, runMode bool, usageOut io.Writer) (*options, error) {
	o := &options{
		addrs: []netip.Prefix{netip.MustParsePrefix("198.18.0.1/15"), netip.MustParsePrefix("fd00:1898::1/64")},
	}
	var addrsSet bool
	fs := flag.NewFlagSet("netstackd", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.tun, "tun", "netstack0", "TUN device `name`; created if absent, an existing persistent device is attached to")
	fs.StringVar(&o.netns, "netns", "", "create and configure the TUN inside the network namespace at `path` (/run/netns/NAME or /proc/PID/ns/net) or of process PID (a rootless container's, as its user); outbound connections are still made from netstackd's own namespace")
	fs.Var(prefixList{&o.addrs, &addrsSet}, "addr", "TUN address `CIDR`, repeatable (default 198.18.0.1/15 and fd00:1898::1/64)")
	fs.Var(prefixList{&o.routes, &o.routesSet}, "route", "route `CIDR` through the TUN, repeatable; with --netns the default is 0.0.0.0/0 and ::/0, without --netns no route is touched")
	fs.IntVar(&o.mtu, "mtu", 1500, "TUN `MTU`")
	fs.IntVar(&o.queues, "queues", 1, "open the TUN with `N` queues (IFF_MULTI_QUEUE), each read by a goroutine of its own; 1 to 16 (helps only with many parallel flows and idle CPUs)")
	fs.BoolVar(&o.noOffload, "no-offload", false, "open the TUN without IFF_VNET_HDR: no TSO/USO, one packet per system call (for comparison and old kernels)")
	fs.Func("publish", "forward `[IP:]HOSTPORT:NSPORT[/udp]` from netstackd's side to that port behind the TUN, repeatable (without IP: all addresses)", func(v string) error {
		p, err := parsePublish(v)
		if err != nil {
			return err
		}
		o.publish = append(o.publish, p)
		return nil
	})
	fs.IntVar(&o.procs, "procs", 0, "run Go code on at most `N` CPUs at once (GOMAXPROCS); 0 means half the CPUs netstackd may use, at least 1, leaving the rest to the kernel work of its system calls and to the programs it serves (the GOMAXPROCS environment variable, when set, replaces that default)")
	fs.StringVar(&o.cpuProfile, "cpu-profile", "", "write a CPU profile (pprof) of the whole run to `file`, for performance work")
	fs.StringVar(&o.execTrace, "exec-trace", "", "write a Go execution trace of the whole run to `file` (go tool trace; -pprof=sched shows where goroutines waited for a CPU), for latency work")
	fs.Func("metrics", "serve /metrics (Prometheus), /healthz and, with --pprof, /debug/pprof/ over HTTP on `ADDR`: PORT or :PORT listens on 127.0.0.1, HOST:PORT where it says", func(v string) error {
		a, err := parseMetricsAddr(v)
		o.metricsAddr = a
		return err
	})
	fs.BoolVar(&o.pprof, "pprof", false, "serve Go's profiles (net/http/pprof) under /debug/pprof/ on the --metrics listener; anyone who reaches it can profile netstackd")
	fs.IntVar(&o.tunFD, "tun-fd", -1, "serve the TUN `descriptor` N that a container runtime opened and passed in (IFF_TUN|IFF_NO_PI); netstackd configures nothing on it")
	fs.Func("proxy", "upstream `[NAME=]URL`, repeatable: new flows go to the first one whose health check passes (unnamed ones are proxy1, proxy2, ...); URL is direct:// (default) | socks5://[user:pass@]host:port | socks4://[userid@]host:port (socks4a:// sends names) | http://[user:pass@]host:port (HTTP CONNECT)", func(v string) error {
		p, err := parseProxySpec(v)
		if err != nil {
			return err
		}
		o.proxies = append(o.proxies, p)
		return nil
	})
	fs.Func("socks", "shorthand for --proxy socks5://`HOST:PORT`, repeatable (one more unnamed upstream)", func(v string) error {
		if _, _, err := net.SplitHostPort(v); err != nil {
			return fmt.Errorf("%q: want HOST:PORT", v)
		}
		o.proxies = append(o.proxies, proxySpec{url: "socks5://" + v})
		return nil
	})
	o.logLevel = slog.LevelInfo
	fs.Var(levelFlag{&o.logLevel}, "log-level", "log `level`: debug|info|warn|error")
	fs.StringVar(&o.pcapPath, "pcap", "", "record every packet that crosses the TUN to `file` in pcapng (tcpdump -r, Wireshark); at --pcap-max-size it becomes FILE.1 and a new FILE starts")
	o.pcapMaxSize = pcap.DefaultMaxSize
	fs.Func("pcap-max-size", "rotate the --pcap file at this `size` (K, M, G suffixes; default 100M)", func(v string) error {
		n, err := parseBytes(v)
		if err != nil {
			return err
		}
		if n < 64<<10 {
			return fmt.Errorf("%s is below the 64K a file needs for its headers and a few packets", v)
		}
		o.pcapMaxSize = n
		return nil
	})
	fs.StringVar(&o.logFormat, "log-format", "text", "log `format`: text (key=value lines, as logfmt) | json (one object per line, for log shippers)")
	fs.DurationVar(&o.dialTimeout, "dial-timeout", 10*time.Second, "bound on reaching a flow's upstream; past it the client gets a reset")
	handshake := fs.String("tcp-handshake", handshakeDialFirst, "when a client's TCP connect completes: "+handshakeDialFirst+" (after the upstream, or the proxy, has accepted the flow, so a refusal reaches the client as one) | "+handshakeAcceptFirst+" (at once, while the upstream is dialed: connect returns sooner, and an unreachable upstream resets the open connection)")
	fs.DurationVar(&o.halfCloseIdle, "tcp-half-close-timeout", 2*time.Minute, "how long the open direction of a half-closed TCP flow may stay silent")
	fs.IntVar(&o.maxFlows, "max-flows", 65536, "cap on concurrent TCP flows, published ones included; new ones beyond it are reset")
	fs.IntVar(&o.maxInFlight, "max-inflight", 1024, "cap on TCP handshakes in progress (with dial-first, each holds an upstream connection); SYNs beyond it are dropped, and the client retransmits")
	fs.IntVar(&o.maxInFlightPerSource, "max-inflight-per-source", 0, "cap on TCP handshakes in progress from one source (an IPv4 address, an IPv6 /64); 0 means a quarter of --max-inflight")
	fs.DurationVar(&o.handshakeTimeout, "tcp-handshake-timeout", 2500*time.Millisecond, "how long a client may take to answer netstackd's SYN-ACK; past it the handshake is dropped (the client's next SYN starts afresh) and, with dial-first, its upstream connection reset")
	fs.StringVar(&o.dnsMode, "dns", "", "DNS `mode`: fake-ip (default with a proxy) | remote (default when direct) | off")
	dnsAddr := fs.String("dns-addr", "198.18.0.2", "the resolver `address` netstackd advertises (port 53 is answered on every address)")
	var rangesSet bool
	fs.Var(prefixList{&o.fakeRanges, &rangesSet}, "fake-ip-range", "fake-IP pool `CIDR`, repeatable (default 198.19.0.0/16 and fd00:1919::/96)")
	fs.Func("dns-direct", "names under this `suffix` get real answers in fake-ip mode, repeatable", func(v string) error {
		v = strings.Trim(strings.TrimSpace(v), ".")
		if v == "" {
			return errors.New("empty suffix")
		}
		o.dnsDirect = append(o.dnsDirect, v)
		return nil
	})
	fs.StringVar(&o.dnsUpstream, "dns-upstream", "", "resolver `HOST:PORT` for remote mode and the query types fake-ip does not answer (default: the first nameserver in /etc/resolv.conf), reached over TCP through the proxy")
	fs.Func("rule", "routing `rule` MATCH[,MATCH...]=ACTION, repeatable, first match wins, before the config file's: MATCH is cidr:PREFIX, domain:NAME, suffix:NAME, keyword:WORD, regex:EXPR (last), port:N[-M], net:tcp|udp|icmp, src:PREFIX, uid:N, exe:PATH or list:FILE; ACTION is direct, proxy, proxy:NAME, reject or drop", func(v string) error {
		if _, err := rules.Parse(v); err != nil {
			var re *rules.Error
			if errors.As(err, &re) {
				return re.Err // the flag's error names the rule already
			}
			return err
		}
		o.rules = append(o.rules, v)
		return nil
	})
	fs.DurationVar(&o.sniffTimeout, "sniff-timeout", 300*time.Millisecond, "how long to wait for a client's first bytes (TLS, HTTP, QUIC) when a rule needs the name of a flow to an address; a server-first protocol is routed without one after it")
	fs.BoolVar(&o.dialSniffed, "dial-sniffed-name", true, "ask the proxy for a sniffed name rather than the address the client connected to, so the proxy resolves it")
	fs.DurationVar(&o.udpTimeout, "udp-timeout", 60*time.Second, "a UDP association idle this long is closed")
	fwmark := fs.String("fwmark", fmt.Sprintf("%#x", defaultFwmark), "firewall `mark` (SO_MARK) on netstackd's own upstream sockets; host-wide mode routes marked traffic by the main table, so it does not loop into the TUN (set outside host-wide mode, it marks them for rules of your own, and needs CAP_NET_ADMIN: not with --user there)")
	fs.IntVar(&o.table, "table", defaultTable, "routing `table` that holds host-wide mode's routes through the TUN")
	var excludesSet bool
	fs.Var(prefixList{&o.excludes, &excludesSet}, "exclude", "host-wide mode: keep `CIDR` off the TUN (it goes by the main table), repeatable; the proxy server's addresses are excluded by themselves")
	o.tcp = stack.DefaultTCPOptions()
	fs.Var(bufferRangeFlag{&o.tcp.ReceiveBuffer}, "tcp-rmem", "TCP receive buffer `MIN,DEFAULT,MAX` in bytes (K, M, G suffixes), as Linux's net.ipv4.tcp_rmem; auto-tuning grows a busy flow's buffer up to MAX")
	fs.Var(bufferRangeFlag{&o.tcp.SendBuffer}, "tcp-wmem", "TCP send buffer `MIN,DEFAULT,MAX` in bytes (K, M, G suffixes), as Linux's net.ipv4.tcp_wmem")
	fs.StringVar(&o.tcp.CongestionControl, "tcp-cc", o.tcp.CongestionControl, "TCP congestion control `algorithm`: "+strings.Join(stack.CongestionControls(), "|"))
	tcpSACK := fs.Bool("tcp-sack", true, "TCP selective acknowledgements (RFC 2018)")
	tcpRACK := fs.Bool("tcp-rack", true, "TCP RACK loss detection (RFC 8985); false leaves three-duplicate-ACK fast retransmit")
	tcpModerate := fs.Bool("tcp-moderate-rcvbuf", true, "TCP receive buffer auto-tuning between the --tcp-rmem bounds; false keeps every flow at DEFAULT")
	fs.BoolVar(&o.tcp.Nagle, "tcp-nagle", false, "Nagle's algorithm on the flows' TUN side: coalesces small writes, at the cost of latency")
	fs.BoolVar(&o.allowLoopback, "allow-host-loopback", false, "direct mode: let clients reach the loopback addresses of netstackd's own namespace (127.0.0.0/8, ::1), by a name that resolves there (off: such flows are reset, as slirp4netns does by default)")
	fs.BoolVar(&o.keepProcesses, "keep-processes", false, "run: leave running what the program started in the background when it exits (by default run gives the program a PID namespace of its own and ends everything left in it)")
	userFlag := fs.String("user", "", "once set up, switch to user `NAME|UID[:GID]` and keep only the capabilities still needed: CAP_NET_ADMIN in host-wide mode (to mark sockets and remove its routes on exit), none otherwise")

	showVersion := fs.Bool("version", false, "print netstackd's version and exit")
	printMan := fs.Bool("print-man", false, "print the manual page (roff, netstackd.1) made from these flags and exit")
	configPath := fs.String("config", "", "read flags from the TOML `file` whose keys are the flags' names (route = [\"0.0.0.0/0\"], max-flows = 4096); flags on the command line win")
	printConfig := fs.Bool("print-config", false, "print the configuration in effect as a --config file and exit")
	got := recordSets(fs)

	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(usageOut, fs, runMode)
			return nil, errHelp
		}
		return nil, explainFlagError(fs, err)
	}
	if *printMan {
		writeManPage(usageOut, fs)
		return nil, errVersion
	}
	if *configPath != "" {
		// What the command line set, before the file adds to it.
		if err := applyConfigFile(fs, *configPath, maps.Clone(got)); err != nil {
			return nil, err
		}
		o.configDir = filepath.Dir(*configPath)
	}
	if *showVersion {
		fmt.Fprintln(usageOut, version())
		return nil, errVersion
	}
	o.maxFlowsSet = got.has("max-flows")
	if runMode {
		if fs.NArg() == 0 {
			return nil, errors.New("run: no command (netstackd run [flags] -- CMD ARGS)")
		}
		o.command = fs.Args()
		if o.netns != "" {
			return nil, errors.New("run: --netns does not apply: run makes a namespace of its own")
		}
	} else if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	} else if o.keepProcesses {
		return nil, errors.New("--keep-processes applies to run only")
	}
	if pid, err := strconv.ParseUint(o.netns, 10, 31); err == nil {
		if pid == 0 {
			return nil, errors.New("--netns 0: want a PID, or the path of a namespace file")
		}
		o.netns = fmt.Sprintf("/proc/%d/ns/net", pid)
	}
	if o.logFormat != "text" && o.logFormat != "json" {
		return nil, fmt.Errorf("--log-format %q: want text or json", o.logFormat)
	}
	switch o.dnsMode {
	case "", "off", "fake-ip", "remote":
	default:
		return nil, fmt.Errorf("--dns %q: want fake-ip, remote or off", o.dnsMode)
	}
	a, err := netip.ParseAddr(*dnsAddr)
	if err != nil {
		return nil, fmt.Errorf("--dns-addr %q: not an IP address", *dnsAddr)
	}
	o.dnsAddr = a
	if !rangesSet {
		o.fakeRanges = []netip.Prefix{netip.MustParsePrefix("198.19.0.0/16"), netip.MustParsePrefix("fd00:1919::/96")}
	}
	if o.tunFD >= 0 && (o.netns != "" || runMode) {
		return nil, errors.New("--tun-fd cannot be combined with --netns or run")
	}
	if o.procs < 0 {
		return nil, fmt.Errorf("--procs %d: want 0 (half the CPUs) or more", o.procs)
	}
	if o.queues < 1 || o.queues > tundev.MaxQueues {
		return nil, fmt.Errorf("--queues %d: want 1 to %d", o.queues, tundev.MaxQueues)
	}
	if o.queues > 1 && (o.tunFD >= 0 || runMode) {
		return nil, errors.New("--queues above 1 needs netstackd to open the TUN itself: not with --tun-fd or run, which pass one descriptor")
	}
	if o.udpTimeout <= 0 {
		return nil, fmt.Errorf("--udp-timeout %s: want a positive duration", o.udpTimeout)
	}
	if o.tun == "" || len(o.tun) >= 16 || strings.ContainsAny(o.tun, "/ \t") {
		return nil, fmt.Errorf("--tun %q: want an interface name of 1 to 15 characters without '/' or spaces", o.tun)
	}
	if o.mtu < 1280 || o.mtu > 65535 {
		return nil, fmt.Errorf("--mtu %d: want 1280 to 65535 (IPv6 needs at least 1280)", o.mtu)
	}
	if o.dialTimeout <= 0 {
		return nil, fmt.Errorf("--dial-timeout %s: want a positive duration", o.dialTimeout)
	}
	if o.halfCloseIdle <= 0 {
		return nil, fmt.Errorf("--tcp-half-close-timeout %s: want a positive duration", o.halfCloseIdle)
	}
	if o.maxFlows <= 0 {
		return nil, fmt.Errorf("--max-flows %d: want a positive number", o.maxFlows)
	}
	if o.maxInFlight <= 0 {
		return nil, fmt.Errorf("--max-inflight %d: want a positive number", o.maxInFlight)
	}
	if o.maxInFlightPerSource < 0 || o.maxInFlightPerSource > o.maxInFlight {
		return nil, fmt.Errorf("--max-inflight-per-source %d: want 0 (a quarter of --max-inflight) to --max-inflight %d", o.maxInFlightPerSource, o.maxInFlight)
	}
	if o.handshakeTimeout <= 0 {
		return nil, fmt.Errorf("--tcp-handshake-timeout %s: want a positive duration", o.handshakeTimeout)
	}
	if o.pprof && o.metricsAddr == "" {
		return nil, errors.New("--pprof needs --metrics ADDR: it serves on that listener")
	}
	if o.proxies, err = nameProxies(o.proxies); err != nil {
		return nil, err
	}
	if o.dnsMode == "" {
		o.dnsMode = "fake-ip"
		if o.isDirect() {
			o.dnsMode = "remote"
		}
	}
	if !o.routesSet && (o.netns != "" || runMode) {
		o.routes = []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")}
	}
	o.tcp.NoSACK, o.tcp.NoRACK, o.tcp.NoModerateReceiveBuffer = !*tcpSACK, !*tcpRACK, !*tcpModerate
	switch *handshake {
	case handshakeDialFirst:
	case handshakeAcceptFirst:
		o.acceptFirst = true
	default:
		return nil, fmt.Errorf("--tcp-handshake %q: want %s or %s", *handshake, handshakeDialFirst, handshakeAcceptFirst)
	}
	if !slices.Contains(stack.CongestionControls(), o.tcp.CongestionControl) {
		return nil, fmt.Errorf("--tcp-cc %q: want %s", o.tcp.CongestionControl, strings.Join(stack.CongestionControls(), " or "))
	}
	if err := o.tcp.Validate(); err != nil {
		// bufferRangeFlag checked each range; this catches what stack adds.
		return nil, fmt.Errorf("tcp options: %w", err)
	}
	if err := o.hostWideFlags(got, runMode, *fwmark, *userFlag); err != nil {
		return nil, err
	}
	if err := o.checkCombinations(got); err != nil {
		return nil, err
	}
	if o.dnsMode == "fake-ip" && len(o.routes) > 0 {
		// Fake addresses only work if they reach the TUN.
		for _, r := range o.fakeRanges {
			if !covered(r, o.routes) {
				o.routes = append(o.routes, r)
			}
		}
	}
	entries := configInEffect(fs, o, got)
	if *printConfig {
		writeConfig(usageOut, entries)
		return nil, errVersion
	}
	o.effective = make(map[string]string, len(entries))
	for _, e := range entries {
		o.effective[e.key] = e.value
	}
	return o, nil
}

// parseMetricsAddr makes --metrics ADDR a host:port to listen on: a bare
// port or ":PORT" means loopback, so that metrics and profiles are not
// offered to the network unless the operator names an address.
func parseMetricsAddr(v string) (string, error) {
	host, port := "", v
	if strings.Contains(v, ":") {
		var err error
		host, port, err = net.SplitHostPort(v)
		if err != nil {
			return "", fmt.Errorf("%q: want PORT, :PORT or HOST:PORT", v)
		}
	}
	n, err := strconv.ParseUint(port, 10, 16)
	if err != nil {
		return "", fmt.Errorf("%q: port %q is not a number from 0 to 65535", v, port)
	}
	if host == "" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, strconv.FormatUint(n, 10)), nil
}

// hostWideFlags decides whether host-wide mode is on and checks the flags
// that belong to it: --fwmark, --table, --exclude and --user.
//
// Host-wide mode is on when a --route is a default route (0.0.0.0/0 or ::/0)
// and the TUN is in netstackd's own namespace: neither --netns nor run
// (whose TUN is in another namespace, so netstackd's sockets cannot loop
// into it) nor --tun-fd (whose interface netstackd does not configure).
func (o *options) hostWideFlags(set setFlags, runMode bool, fwmark, user string) error {
	o.hostWide = !runMode && o.netns == "" && o.tunFD < 0 && slices.ContainsFunc(o.routes, func(p netip.Prefix) bool { return p.Bits() == 0 })
	const hostWideOnly = "applies to host-wide mode only (a --route of 0.0.0.0/0 or ::/0 without --netns, run or --tun-fd)"
	m, err := strconv.ParseUint(fwmark, 0, 32)
	if err != nil || m == 0 {
		return fmt.Errorf("--fwmark %q: want a non-zero 32-bit mark, such as 0x6e73", fwmark)
	}
	if o.hostWide || set.has("fwmark") {
		o.fwmark = uint32(m)
	}
	if set.has("table") && !o.hostWide {
		return errors.New("--table " + hostWideOnly)
	}
	if o.table <= 0 || (o.table >= 253 && o.table <= 255) || int64(o.table) > math.MaxUint32 {
		return fmt.Errorf("--table %d: want 1 to 252 or 256 to 4294967295 (253 to 255 are default, main and local)", o.table)
	}
	if len(o.excludes) > 0 && !o.hostWide {
		return errors.New("--exclude " + hostWideOnly)
	}
	for _, x := range o.excludes {
		if x != x.Masked() {
			return fmt.Errorf("--exclude %s: host bits set (did you mean %s?)", x, x.Masked())
		}
		if x.Bits() == 0 {
			return fmt.Errorf("--exclude %s: would keep every destination off the TUN", x)
		}
	}
	if o.hostWide {
		// All of them go into the table, none into main: a route in
		// main would catch netstackd's own marked sockets too.
		for _, r := range o.routes {
			if r != r.Masked() {
				return fmt.Errorf("--route %s: host bits set (did you mean %s?)", r, r.Masked())
			}
		}
	}
	if user != "" {
		if runMode {
			return errors.New("run: --user does not apply: run needs no root, start it as the user instead")
		}
		if o.user, err = parseUser(user); err != nil {
			return fmt.Errorf("--user %q: %w", user, err)
		}
	}
	return nil
}

// checkCombinations refuses flags that parse but cannot work together, so
// that netstackd fails at start with the reason, not at every flow.
func (o *options) checkCombinations(set setFlags) error {
	if o.user != nil && o.fwmark != 0 && !o.hostWide {
		// Issue 19: it started, said ready, and then failed every dial
		// with EPERM.
		return errors.New("--fwmark with --user outside host-wide mode: setting the mark needs CAP_NET_ADMIN, which --user keeps only in host-wide mode")
	}
	if o.allowLoopback && !o.isDirect() {
		return errors.New("--allow-host-loopback applies to direct mode only: through a proxy, the proxy's host decides what its loopback serves")
	}
	if len(o.dnsDirect) > 0 && o.dnsMode != "fake-ip" {
		return fmt.Errorf("--dns-direct applies to fake-ip mode only (--dns is %s, where every answer is real)", o.dnsMode)
	}
	if o.dnsUpstream != "" && o.dnsMode == "off" {
		return errors.New("--dns-upstream with --dns off: nothing would ask it")
	}
	if o.dnsMode == "fake-ip" && slices.ContainsFunc(o.fakeRanges, func(p netip.Prefix) bool { return p.Contains(o.dnsAddr) }) {
		return fmt.Errorf("--dns-addr %s is inside a --fake-ip-range: the pool could hand it out as a name's address", o.dnsAddr)
	}
	isOwn := proxy.RefusePrefixes(o.ownPrefixes()...)
	if o.tunFD < 0 && slices.ContainsFunc(o.addrs, func(p netip.Prefix) bool { return p.Addr() == o.dnsAddr }) && set.has("dns-addr") {
		return fmt.Errorf("--dns-addr %s is the TUN's own address (--addr): queries to it are answered by the client's side, never reach netstackd", o.dnsAddr)
	}
	checks := []struct{ flag, hostport string }{{"--dns-upstream", o.dnsUpstream}}
	for _, p := range o.proxies {
		checks = append(checks, struct{ flag, hostport string }{"--proxy " + p.name, proxyHostPort(p.url)})
	}
	for _, c := range checks {
		host, _, err := net.SplitHostPort(c.hostport)
		if err != nil {
			continue // a name, or checked where it is parsed
		}
		a, err := netip.ParseAddr(host)
		if err != nil {
			continue
		}
		if isOwn(a) {
			return fmt.Errorf("%s %s: an address of netstackd's own (its TUN prefixes, fake-IP ranges or --dns-addr), which it would reach only through itself", c.flag, c.hostport)
		}
	}
	return nil
}

// ownPrefixes are the addresses that exist only inside netstackd: the TUN's
// prefixes, the fake-IP ranges and the DNS address. Nothing netstackd dials
// may be there: its own sockets would loop into its TUN (host-wide mode), or
// leave for an address that means nothing outside.
func (o *options) ownPrefixes() []netip.Prefix {
	var own []netip.Prefix
	for _, p := range o.addrs {
		own = append(own, p.Masked())
	}
	own = append(own, o.fakeRanges...)
	if o.dnsAddr.IsValid() {
		own = append(own, netip.PrefixFrom(o.dnsAddr, o.dnsAddr.BitLen()))
	}
	return own
}

// proxyHostPort is the "host:port" of a --proxy URL, "" when there is none
// or the URL does not parse (FromURL reports that).
func proxyHostPort(raw string) string {
	u, err := url.Parse(raw)
	if err != nil {
		return ""
	}
	return u.Host
}

// covered reports whether some route in routes contains all of p.
func covered(p netip.Prefix, routes []netip.Prefix) bool {
	for _, r := range routes {
		if r.Addr().Is4() == p.Addr().Is4() && r.Bits() <= p.Bits() && r.Contains(p.Addr()) {
			return true
		}
	}
	return false
}
