package stack

import (
	"fmt"
	"slices"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/netstackd/netstackd/stack/internal/gverr"
)

// BufferRange bounds a TCP buffer in bytes, as the three numbers of Linux's
// net.ipv4.tcp_rmem and tcp_wmem do: a flow starts at Default and
// auto-tuning moves it between Min and Max.
type BufferRange struct {
	Min, Default, Max int
}

// The defaults, chosen by measurement (see the README's "TCP settings").
// gVisor only reserves memory for bytes really queued, so the defaults cost
// an idle flow nothing; what they decide is how far a bulk flow may run
// ahead of the side that drains it.
var (
	defaultReceiveBuffer = BufferRange{Min: 4 << 10, Default: 128 << 10, Max: 8 << 20}
	defaultSendBuffer    = BufferRange{Min: 4 << 10, Default: 128 << 10, Max: 8 << 20}
)

// CongestionControls returns the names TCPOptions.CongestionControl
// accepts: the algorithms gVisor implements.
func CongestionControls() []string { return []string{"reno", "cubic"} }

const defaultCongestionControl = "reno"

// TCPOptions tunes gVisor's TCP for every flow of the stack. The zero value
// is netstackd's default, chosen by measuring throughput, short connections
// and memory through a TUN (see the README's "TCP settings").
type TCPOptions struct {
	// ReceiveBuffer is the receive buffer range; the zero value means
	// {4 KiB, 128 KiB, 8 MiB}. A non-zero range needs 0 < Min <= Default <= Max.
	ReceiveBuffer BufferRange
	// SendBuffer is the send buffer range; the zero value means
	// {4 KiB, 128 KiB, 8 MiB}. A non-zero range needs 0 < Min <= Default <= Max.
	SendBuffer BufferRange
	// CongestionControl names the algorithm, one of CongestionControls;
	// "" means reno.
	CongestionControl string
	// NoSACK turns selective acknowledgements (RFC 2018) off; false keeps
	// them on.
	NoSACK bool
	// NoModerateReceiveBuffer turns receive buffer auto-tuning off, so a
	// flow keeps ReceiveBuffer.Default; false lets it grow up to
	// ReceiveBuffer.Max as the flow's bandwidth-delay product needs.
	NoModerateReceiveBuffer bool
	// NoRACK turns RACK loss detection (RFC 8985) off, leaving classic
	// three-duplicate-ACK fast retransmit; false keeps RACK on.
	NoRACK bool
	// Nagle turns Nagle's algorithm on for the stack's side of every flow;
	// false (the default) sends each relayed write at once.
	Nagle bool
}

// DefaultTCPOptions returns the settings the zero TCPOptions stands for,
// spelled out, for help texts and logs.
func DefaultTCPOptions() TCPOptions {
	return TCPOptions{}.withDefaults()
}

// withDefaults returns o with every zero field replaced by its default.
func (o TCPOptions) withDefaults() TCPOptions {
	if o.ReceiveBuffer == (BufferRange{}) {
		o.ReceiveBuffer = defaultReceiveBuffer
	}
	if o.SendBuffer == (BufferRange{}) {
		o.SendBuffer = defaultSendBuffer
	}
	if o.CongestionControl == "" {
		o.CongestionControl = defaultCongestionControl
	}
	return o
}

// Validate reports the first setting gVisor would refuse, naming it, so a
// program can check user input before building a Stack.
func (o TCPOptions) Validate() error {
	o = o.withDefaults()
	if err := o.ReceiveBuffer.Validate(); err != nil {
		return fmt.Errorf("tcp receive buffer: %w", err)
	}
	if err := o.SendBuffer.Validate(); err != nil {
		return fmt.Errorf("tcp send buffer: %w", err)
	}
	if !slices.Contains(CongestionControls(), o.CongestionControl) {
		return fmt.Errorf("tcp congestion control %q: want one of %v", o.CongestionControl, CongestionControls())
	}
	return nil
}

// maxBuffer caps a buffer size: window scaling shifts by at most 14 bits
// (RFC 7323 section 2.3), so no TCP window exceeds 1 GiB and a larger
// buffer could never fill.
const maxBuffer = 1 << 30

// String formats r as the sysctls do: "MIN,DEFAULT,MAX" in bytes.
func (r BufferRange) String() string {
	return fmt.Sprintf("%d,%d,%d", r.Min, r.Default, r.Max)
}

// Validate reports why gVisor would refuse r: it needs
// 0 < Min <= Default <= Max.
func (r BufferRange) Validate() error {
	switch {
	case r.Min <= 0:
		return fmt.Errorf("min %d: want at least 1 byte", r.Min)
	case r.Default < r.Min:
		return fmt.Errorf("default %d below min %d", r.Default, r.Min)
	case r.Max < r.Default:
		return fmt.Errorf("max %d below default %d", r.Max, r.Default)
	case r.Max > maxBuffer:
		return fmt.Errorf("max %d above 1 GiB", r.Max)
	}
	return nil
}

// handshakeOrder names Config.AcceptFirst as netstackd's --tcp-handshake does.
func handshakeOrder(acceptFirst bool) string {
	if acceptFirst {
		return "accept-first"
	}
	return "dial-first"
}

// configure sets the TCP options on the gVisor stack: cfg.TCP with its
// defaults, and the settings no user needs to change.
func (st *Stack) configure() error {
	o := st.cfg.TCP.withDefaults()
	if err := o.Validate(); err != nil {
		return err
	}
	st.log.Info("tcp settings",
		"rmem", o.ReceiveBuffer.String(), "wmem", o.SendBuffer.String(), "cc", o.CongestionControl,
		"sack", !o.NoSACK, "moderate_rcvbuf", !o.NoModerateReceiveBuffer, "rack", !o.NoRACK, "nagle", o.Nagle,
		"handshake", handshakeOrder(st.cfg.AcceptFirst))
	// gVisor's default is RACK; without it, loss is found by three
	// duplicate ACKs, as before RFC 8985.
	recovery := tcpip.TCPRACKLossDetection
	if o.NoRACK {
		recovery = 0
	}
	cc := tcpip.CongestionControlOption(o.CongestionControl)
	opts := []tcpip.SettableTransportProtocolOption{
		ptr(tcpip.TCPSACKEnabled(!o.NoSACK)),
		ptr(tcpip.TCPModerateReceiveBufferOption(!o.NoModerateReceiveBuffer)),
		ptr(recovery),
		ptr(tcpip.TCPDelayEnabled(o.Nagle)),
		&cc,
		&tcpip.TCPReceiveBufferSizeRangeOption{Min: o.ReceiveBuffer.Min, Default: o.ReceiveBuffer.Default, Max: o.ReceiveBuffer.Max},
		&tcpip.TCPSendBufferSizeRangeOption{Min: o.SendBuffer.Min, Default: o.SendBuffer.Default, Max: o.SendBuffer.Max},
		// gVisor hands a new SYN for a 4-tuple in TIME_WAIT only to a
		// listening endpoint, and a forwarder has none: the SYN is dropped
		// for as long as TIME_WAIT lasts (60s by default). A client reuses
		// its port as soon as it closed second, so short connections that
		// the server closes first would stall. On a TUN link no segment is
		// delayed for long, so a short TIME_WAIT loses nothing.
		ptr(tcpip.TCPTimeWaitTimeoutOption(timeWait)),
	}
	for _, opt := range opts {
		if err := st.s.SetTransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return fmt.Errorf("set tcp option %T: %w", opt, gverr.Error("setsockopt", err))
		}
	}
	return nil
}

// tcpSettings reads the TCP options back from gVisor, as every new flow will
// see them, so a test shows what is really in effect.
func (st *Stack) tcpSettings() (TCPOptions, error) {
	var (
		sack     tcpip.TCPSACKEnabled
		moderate tcpip.TCPModerateReceiveBufferOption
		recovery tcpip.TCPRecovery
		delay    tcpip.TCPDelayEnabled
		cc       tcpip.CongestionControlOption
		rcv      tcpip.TCPReceiveBufferSizeRangeOption
		snd      tcpip.TCPSendBufferSizeRangeOption
	)
	for _, opt := range []tcpip.GettableTransportProtocolOption{&sack, &moderate, &recovery, &delay, &cc, &rcv, &snd} {
		if err := st.s.TransportProtocolOption(tcp.ProtocolNumber, opt); err != nil {
			return TCPOptions{}, fmt.Errorf("get tcp option %T: %w", opt, gverr.Error("getsockopt", err))
		}
	}
	return TCPOptions{
		ReceiveBuffer:           BufferRange{Min: rcv.Min, Default: rcv.Default, Max: rcv.Max},
		SendBuffer:              BufferRange{Min: snd.Min, Default: snd.Default, Max: snd.Max},
		CongestionControl:       string(cc),
		NoSACK:                  !bool(sack),
		NoModerateReceiveBuffer: !bool(moderate),
		NoRACK:                  recovery&tcpip.TCPRACKLossDetection == 0,
		Nagle:                   bool(delay),
	}, nil
}

func ptr[T any](v T) *T { return &v }

// forwarderReceiveWindow is the receive buffer a forwarded flow starts
// with. tcp.NewForwarder sets every endpoint it creates to its rcvWnd
// argument, overriding ReceiveBuffer.Default, and takes 0 to mean 1 MiB, so
// the forwarder must be given this value for the default to hold.
func (o TCPOptions) forwarderReceiveWindow() int {
	return o.withDefaults().ReceiveBuffer.Default
}
