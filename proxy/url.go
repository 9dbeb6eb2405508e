package proxy

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"strconv"
	"strings"

	"github.com/netstackd/netstackd/proxy/httpconnect"
	"github.com/netstackd/netstackd/proxy/socks4"
	"github.com/netstackd/netstackd/proxy/socks5"
)

// urlForms is what FromURL accepts, for error messages.
const urlForms = "want direct://, socks5://[user:pass@]host:port, socks4://[user@]host:port or http://[user:pass@]host:port"

// FromURL returns the Dialer that raw names:
//
//	direct:// (or direct)               forward if it is a Direct, else Direct{}
//	socks5://[user[:pass]@]host:port    SOCKS5, with Forward set to forward
//	socks4://[userid@]host:port         SOCKS4, with Forward set to forward
//	http://[user[:pass]@]host:port      HTTPConnect, with Forward set to forward
//
// socks5h:// is an alias of socks5://, and socks4a:// of socks4://: a
// domain name always reaches the server unresolved (for SOCKS4, with the
// SOCKS4A extension). https:// is refused: there is no TLS to the proxy
// yet. User and password are percent-decoded; for SOCKS5 each may be up to
// 255 bytes (RFC 1929 §2), for SOCKS4 the user ID too and a password is an
// error, for HTTP the user may not hold a colon (RFC 7617 §2). An IPv6 host
// goes in brackets. forward reaches the proxy server; nil means Direct{}. A
// bad URL gets a one-line error that quotes it with the password hidden.
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
	// Direct connections are made by forward itself when it is a Direct,
	// so that its Control (SO_MARK) and Resolver apply to them too.
	direct, _ := forward.(Direct)
	if strings.EqualFold(raw, "direct") {
		return direct, nil
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
		return direct, nil
	case "socks5", "socks5h":
		return socks5FromURL(u, forward)
	case "socks4", "socks4a":
		return socks4FromURL(u, forward)
	case "http":
		return httpFromURL(u, forward)
	case "https":
		return nil, errors.New(`scheme "https" not supported: no TLS to the proxy yet`)
	case "":
		return nil, errors.New("missing scheme: " + urlForms)
	}
	return nil, fmt.Errorf("unknown scheme %q: %s", u.Scheme, urlForms)
}

func socks5FromURL(u *url.URL, forward Dialer) (Dialer, error) {
	server, err := serverFromURL(u)
	if err != nil {
		return nil, err
	}
	s := SOCKS5{Server: server, Forward: forward}
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

func socks4FromURL(u *url.URL, forward Dialer) (Dialer, error) {
	server, err := serverFromURL(u)
	if err != nil {
		return nil, err
	}
	s := SOCKS4{Server: server, Forward: forward}
	if u.User != nil {
		if _, ok := u.User.Password(); ok {
			return nil, errors.New("SOCKS4 has no password: give only the user ID before \"@\"")
		}
		s.UserID = u.User.Username()
		switch {
		case s.UserID == "":
			return nil, errors.New("empty user ID")
		case len(s.UserID) > socks4.MaxUserIDLen:
			return nil, fmt.Errorf("user ID of %d bytes, want at most %d", len(s.UserID), socks4.MaxUserIDLen)
		case strings.ContainsRune(s.UserID, 0):
			return nil, errors.New("user ID holds a NUL byte")
		}
	}
	return s, nil
}

func httpFromURL(u *url.URL, forward Dialer) (Dialer, error) {
	server, err := serverFromURL(u)
	if err != nil {
		return nil, err
	}
	h := HTTPConnect{Server: server, Forward: forward}
	if u.User != nil {
		h.Username = u.User.Username()
		h.Password, _ = u.User.Password()
		if h.Username == "" {
			return nil, errors.New("empty username")
		}
		if err := httpconnect.CheckCredentials(h.Username, h.Password); err != nil {
			return nil, err
		}
	}
	return h, nil
}

// serverFromURL returns the "host:port" of a proxy URL, which must have
// nothing after the port but an optional "/".
func serverFromURL(u *url.URL) (string, error) {
	switch {
	case u.Opaque != "":
		return "", errors.New(urlForms)
	case u.Path != "" && u.Path != "/":
		return "", fmt.Errorf("unexpected path %q", u.Path)
	case hasQueryOrFragment(u):
		return "", errors.New("unexpected query or fragment")
	}
	host, port := u.Hostname(), u.Port()
	if host == "" {
		return "", errors.New("missing host")
	}
	if strings.Contains(host, ":") && !strings.HasPrefix(u.Host, "[") {
		// url.Parse reads "::1:1080" as host "::1", port 1080, but it is
		// as much the address ::1:1080 with no port.
		return "", fmt.Errorf("IPv6 address must be in brackets: %s://[addr]:port", u.Scheme)
	}
	if !validHost(host) {
		return "", fmt.Errorf("invalid host %q", host)
	}
	if port == "" {
		return "", errors.New("missing port")
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return "", fmt.Errorf("port %s out of range 1 to 65535", port)
	}
	return net.JoinHostPort(host, strconv.FormatUint(p, 10)), nil
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
