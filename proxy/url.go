package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/netstackd/netstackd/proxy/socks5"
)

// urlForms is what FromURL accepts, for error messages.
const urlForms = "want direct:// or socks5://[user:pass@]host:port"

// FromURL returns the Dialer that raw names:
//
//	direct:// (or direct)               Direct{}
//	socks5://[user[:pass]@]host:port    SOCKS5, with Forward set to forward
//
// socks5h:// is an alias of socks5://: a domain name always reaches the
// server unresolved. User and password are percent-decoded and may each be
// up to 255 bytes (RFC 1929 §2); an IPv6 host goes in brackets. forward
// reaches the proxy server; nil means Direct{}. A bad URL gets a one-line
// error that quotes it with the password hidden.
func FromURL(raw string, forward Dialer) (Dialer, error) {
	shown, password := redact(raw)
	var d Dialer
	var err error
	if strings.ContainsAny(password, "/?#") {
		// url.Parse would end the host inside the password, and the
		// errors that quote a path or port would show pieces of it.
		err = errors.New(`percent-encode "/", "?" and "#" in the user and password`)
	} else {
		d, err = fromURL(raw, forward)
	}
	if err != nil {
		return nil, fmt.Errorf("proxy URL %q: %w", shown, err)
	}
	return d, nil
}

func fromURL(raw string, forward Dialer) (Dialer, error) {
	if strings.EqualFold(raw, "direct") {
		return Direct{}, nil
	}
	// Without "://" url.Parse reads "host:port" as a scheme and an opaque
	// part, or fails on a path; neither error would help.
	if !strings.Contains(raw, "://") {
		return nil, errors.New("missing scheme: " + urlForms)
	}
	u, err := url.Parse(raw)
	if err != nil {
		// *url.Error repeats the URL, which FromURL quotes already; an
		// EscapeError quotes the bad escape, which may be in the password.
		if ue, ok := errors.AsType[*url.Error](err); ok {
			err = ue.Err
		}
		if _, ok := errors.AsType[url.EscapeError](err); ok {
			err = errors.New(`invalid percent-encoding (write "%" as "%25")`)
		}
		return nil, err
	}
	switch u.Scheme {
	case "direct":
		if u.Host != "" || u.User != nil || (u.Path != "" && u.Path != "/") || hasQueryOrFragment(u) {
			return nil, errors.New("direct:// takes nothing after the scheme")
		}
		return Direct{}, nil
	case "socks5", "socks5h":
		return socks5FromURL(u, forward)
	case "socks4", "socks4a", "http", "https":
		// Planned: SOCKS4 and HTTP CONNECT.
		return nil, fmt.Errorf("scheme %q not supported yet", u.Scheme)
	case "":
		return nil, errors.New("missing scheme: " + urlForms)
	}
	return nil, fmt.Errorf("unknown scheme %q: %s", u.Scheme, urlForms)
}

func socks5FromURL(u *url.URL, forward Dialer) (Dialer, error) {
	switch {
	case u.Opaque != "":
		return nil, errors.New(urlForms)
	case u.Path != "" && u.Path != "/":
		return nil, fmt.Errorf("unexpected path %q", u.Path)
	case hasQueryOrFragment(u):
		return nil, errors.New("unexpected query or fragment")
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return nil, errors.New("missing host")
	}
	if strings.Contains(host, ":") && !strings.HasPrefix(u.Host, "[") {
		// url.Parse reads "::1:1080" as host "::1", port 1080, but it is
		// as much the address ::1:1080 with no port.
		return nil, errors.New("IPv6 address must be in brackets: socks5://[addr]:port")
	}
	if !validHost(host) {
		return nil, fmt.Errorf("invalid host %q", host)
	}
	if port == "" {
		return nil, errors.New("missing port")
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return nil, fmt.Errorf("port %s out of range 1 to 65535", port)
	}
	s := SOCKS5{
		Server:  net.JoinHostPort(host, strconv.FormatUint(p, 10)),
		Forward: forward,
	}
	if u.User != nil {
		s.Username = u.User.Username()
		s.Password, _ = u.User.Password()
		// The sub-negotiation carries each in at most 255 bytes
		// (RFC 1929 §2).
		switch {
		case s.Username == "":
			return nil, errors.New("empty username")
		case len(s.Username) > 255:
			return nil, fmt.Errorf("username of %d bytes, want at most 255", len(s.Username))
		case len(s.Password) > 255:
			return nil, fmt.Errorf("password of %d bytes, want at most 255", len(s.Password))
		}
	}
	return s, nil
}

// validHost accepts an IP literal (with a zone that is an interface name
// or index) or a name made of what DNS names and /etc/hosts entries are made
// of. url.Parse lets through hosts such as "]" or "a!b" that no resolver
// would take; better to say so at startup than at the first dial.
func validHost(host string) bool {
	if ip, err := netip.ParseAddr(host); err == nil {
		return ip.Zone() == "" || validName(ip.Zone())
	}
	return len(host) <= socks5.MaxDomainLen && validName(host)
}

func validName(s string) bool {
	for _, r := range s {
		switch {
		case 'a' <= r && r <= 'z', 'A' <= r && r <= 'Z', '0' <= r && r <= '9', r == '-', r == '.', r == '_':
		default:
			return false
		}
	}
	return true
}

func hasQueryOrFragment(u *url.URL) bool {
	return u.RawQuery != "" || u.ForceQuery || u.Fragment != "" || u.RawFragment != ""
}

// redact returns raw with the password replaced by "xxxxx", so that errors
// can quote it, and the password as written. It works on the text rather
// than a parsed URL because it must also cover URLs that do not parse; it
// errs toward hiding, taking the userinfo to end at the last '@', since a
// password may hold an unescaped '/' or '@'.
func redact(raw string) (shown, password string) {
	i := strings.Index(raw, "://")
	if i < 0 {
		return raw, ""
	}
	authority := raw[i+len("://"):]
	at := strings.LastIndex(authority, "@")
	if at < 0 {
		return raw, ""
	}
	user, password, hasPass := strings.Cut(authority[:at], ":")
	if !hasPass {
		return raw, ""
	}
	return raw[:i+len("://")] + user + ":xxxxx" + authority[at:], password
}
