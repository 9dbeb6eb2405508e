package dns

import "fmt"

// Mode says how a Server answers queries. The zero value is ModeOff.
type Mode int

const (
	// ModeOff answers nothing: Answer returns nil and DNS is relayed as
	// ordinary traffic.
	ModeOff Mode = iota
	// ModeFakeIP answers A and AAAA queries with addresses from the fake-IP
	// pool, so that flows carry hostnames to the proxy.
	ModeFakeIP
	// ModeRemote forwards every query to the upstream resolver through the
	// dialer and caches the answers.
	ModeRemote
)

// String returns the name ParseMode accepts.
func (m Mode) String() string {
	switch m {
	case ModeOff:
		return "off"
	case ModeFakeIP:
		return "fake-ip"
	case ModeRemote:
		return "remote"
	}
	return fmt.Sprintf("Mode(%d)", int(m))
}

// ParseMode parses "off", "fake-ip" or "remote".
func ParseMode(s string) (Mode, error) {
	for _, m := range []Mode{ModeOff, ModeFakeIP, ModeRemote} {
		if s == m.String() {
			return m, nil
		}
	}
	return ModeOff, fmt.Errorf("dns mode %q: want off, fake-ip or remote", s)
}
