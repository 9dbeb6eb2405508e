package main

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/netip"
	"strconv"
	"strings"

	"github.com/netstackd/netstackd/stack"
)

// The flag.Value types of netstackd's own flags, and the byte sizes they
// read and write.

// prefixList is a repeatable CIDR flag. The first use replaces the default.
type prefixList struct {
	list *[]netip.Prefix
	set  *bool
}

func (p prefixList) String() string {
	if p.list == nil {
		return ""
	}
	s := make([]string, len(*p.list))
	for i, v := range *p.list {
		s[i] = v.String()
	}
	return strings.Join(s, ",")
}

func (p prefixList) Set(v string) error {
	pfx, err := netip.ParsePrefix(v)
	if err != nil {
		// A bare address means a host route or host address.
		a, aerr := netip.ParseAddr(v)
		if aerr != nil {
			return fmt.Errorf("%q is not a CIDR", v)
		}
		pfx = netip.PrefixFrom(a, a.BitLen())
	}
	if !*p.set {
		*p.list = nil
		*p.set = true
	}
	*p.list = append(*p.list, pfx)
	return nil
}

type levelFlag struct{ l *slog.Level }

func (f levelFlag) String() string {
	if f.l == nil {
		return "info"
	}
	return strings.ToLower(f.l.String())
}

func (f levelFlag) Set(v string) error {
	switch strings.ToLower(v) {
	case "debug":
		*f.l = slog.LevelDebug
	case "info":
		*f.l = slog.LevelInfo
	case "warn", "warning":
		*f.l = slog.LevelWarn
	case "error":
		*f.l = slog.LevelError
	default:
		return fmt.Errorf("unknown level %q (want debug, info, warn or error)", v)
	}
	return nil
}

// bufferRangeFlag is a "MIN,DEFAULT,MAX" byte range, as in the Linux
// sysctls tcp_rmem and tcp_wmem, with optional K, M and G (binary) suffixes.
type bufferRangeFlag struct{ r *stack.BufferRange }

func (f bufferRangeFlag) String() string {
	if f.r == nil {
		return ""
	}
	return formatBytes(f.r.Min) + "," + formatBytes(f.r.Default) + "," + formatBytes(f.r.Max)
}

func (f bufferRangeFlag) Set(v string) error {
	parts := strings.Split(v, ",")
	if len(parts) != 3 {
		return errors.New("want MIN,DEFAULT,MAX, such as 4K,128K,8M")
	}
	var n [3]int
	for i, p := range parts {
		b, err := parseBytes(p)
		if err != nil {
			return err
		}
		n[i] = b
	}
	r := stack.BufferRange{Min: n[0], Default: n[1], Max: n[2]}
	if err := r.Validate(); err != nil {
		return err
	}
	*f.r = r
	return nil
}

// parseBytes reads a byte count such as 4096, 64K, 8M or 1G (binary units,
// either case).
func parseBytes(s string) (int, error) {
	orig := s
	s = strings.TrimSpace(s)
	shift := 0
	if s != "" {
		switch s[len(s)-1] {
		case 'k', 'K':
			shift = 10
		case 'm', 'M':
			shift = 20
		case 'g', 'G':
			shift = 30
		}
	}
	if shift > 0 {
		s = s[:len(s)-1]
	}
	n, err := strconv.ParseUint(s, 10, 31)
	if err != nil || n<<shift > math.MaxInt32 {
		return 0, fmt.Errorf("size %q: want a whole number of bytes below 2G, with an optional K, M or G", orig)
	}
	return int(n << shift), nil
}

// formatBytes writes n with the largest binary suffix that divides it.
func formatBytes(n int) string {
	for _, u := range []struct {
		shift  uint
		suffix string
	}{{30, "G"}, {20, "M"}, {10, "K"}} {
		if n > 0 && n%(1<<u.shift) == 0 {
			return strconv.Itoa(n>>u.shift) + u.suffix
		}
	}
	return strconv.Itoa(n)
}
