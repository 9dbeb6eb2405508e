package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/BurntSushi/toml"
)

// A configuration file (--config FILE) is TOML whose keys are the flags'
// names, as --help lists them, so that there is one set of names to learn
// and nothing to keep in step: `dns = "fake-ip"`, `route = ["0.0.0.0/0",
// "::/0"]`, `max-flows = 4096`, `tcp-sack = false`. A flag given on the
// command line wins over the file. --print-config writes the configuration
// in effect in the same form, every other key commented out with its
// default, so its output is a file --config reads back to the same result.

// metaFlags act rather than configure: they have no key.
var metaFlags = map[string]bool{"config": true, "print-config": true, "print-man": true, "version": true}

// repeatable flags take a list in the file.
var repeatable = map[string]bool{"proxy": true, "socks": true, "addr": true, "route": true, "fake-ip-range": true, "exclude": true, "publish": true, "dns-direct": true, "rule": true}

// appended are repeatable flags whose file entries come after the command
// line's rather than giving way to them: --rule's rules are evaluated
// before the file's.
var appended = map[string]bool{"rule": true}

// sameSetting are flags that set the same thing: the command line's one
// keeps the file's other from being applied.
var sameSetting = map[string]string{"socks": "proxy", "proxy": "socks"}

// setFlags are the flags that were set, on the command line or in the
// file, with the text of each Set: recordSets fills it.
type setFlags map[string][]string

func (s setFlags) has(name string) bool { return len(s[name]) > 0 }

// recorded wraps a flag's Value to remember the text of every Set, so that
// --print-config can write back exactly what was given.
type recorded struct {
	flag.Value
	name string
	got  setFlags
}

func (r recorded) Set(v string) error {
	if err := r.Value.Set(v); err != nil {
		return err
	}
	r.got[r.name] = append(r.got[r.name], v)
	return nil
}

// IsBoolFlag and Get pass on what the flag package and explainFlagError
// ask of the value underneath.
func (r recorded) IsBoolFlag() bool {
	b, ok := r.Value.(interface{ IsBoolFlag() bool })
	return ok && b.IsBoolFlag()
}

func (r recorded) Get() any {
	if g, ok := r.Value.(flag.Getter); ok {
		return g.Get()
	}
	return nil
}

// recordSets wraps every flag of fs; the map it returns fills as they are
// set.
func recordSets(fs *flag.FlagSet) setFlags {
	got := setFlags{}
	fs.VisitAll(func(f *flag.Flag) { f.Value = recorded{Value: f.Value, name: f.Name, got: got} })
	return got
}

// applyConfigFile sets on fs every key of the TOML file at path that the
// command line (cmdline: the flags it set) did not.
func applyConfigFile(fs *flag.FlagSet, path string, cmdline setFlags) error {
	var raw map[string]any
	if _, err := toml.DecodeFile(path, &raw); err != nil {
		return fmt.Errorf("--config %s: %w", path, err)
	}
	keys := make([]string, 0, len(raw))
	for k := range raw {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		if metaFlags[k] || fs.Lookup(k) == nil {
			if s := closestFlag(fs, k); s != "" && !metaFlags[s] {
				return fmt.Errorf("--config %s: unknown key %q (did you mean %q?)", path, k, s)
			}
			return fmt.Errorf("--config %s: unknown key %q: the keys are the flags' names, as netstackd --help lists them", path, k)
		}
		if (cmdline.has(k) || cmdline.has(sameSetting[k])) && !appended[k] {
			continue
		}
		values, err := configStrings(raw[k])
		if err != nil {
			return fmt.Errorf("--config %s: %s: %w", path, k, err)
		}
		if !repeatable[k] && len(values) != 1 {
			return fmt.Errorf("--config %s: %s: want one value, not a list (only %s take lists)", path, k, strings.Join(sortedKeys(repeatable), ", "))
		}
		for _, v := range values {
			if err := fs.Set(k, v); err != nil {
				return fmt.Errorf("--config %s: %s = %q: %w", path, k, v, err)
			}
		}
	}
	return nil
}

// configStrings turns a TOML value into the texts a flag's Set takes.
func configStrings(v any) ([]string, error) {
	switch v := v.(type) {
	case string:
		return []string{v}, nil
	case bool:
		return []string{strconv.FormatBool(v)}, nil
	case int64:
		return []string{strconv.FormatInt(v, 10)}, nil
	case float64:
		if v != math.Trunc(v) || math.IsInf(v, 0) {
			return nil, fmt.Errorf("%v: want a whole number, or a string", v)
		}
		return []string{strconv.FormatInt(int64(v), 10)}, nil
	case map[string]any:
		return nil, errors.New("a table: every key is a flag's name, at the top of the file")
	case []any:
		var out []string
		for _, e := range v {
			if _, nested := e.([]any); nested {
				return nil, errors.New("a list inside a list")
			}
			s, err := configStrings(e)
			if err != nil {
				return nil, err
			}
			out = append(out, s...)
		}
		return out, nil
	}
	return nil, fmt.Errorf("a %T: want a string, a number, true or false, or a list of them", v)
}

func sortedKeys(m map[string]bool) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// configEntry is one key of the configuration in effect.
type configEntry struct {
	key, value string // value as TOML
	set        bool   // given on the command line or in the file
}

// configInEffect lists every key with its value in effect: what was set,
// or else what netstackd chose (the DNS mode, the routes of a namespace),
// or else the default.
func configInEffect(fs *flag.FlagSet, o *options, got setFlags) []configEntry {
	chosen := map[string][]string{
		"dns":           {o.dnsMode},
		"proxy":         proxyStrings(o.proxies),
		"addr":          cidrStrings(o.addrs),
		"route":         cidrStrings(o.routes),
		"fake-ip-range": cidrStrings(o.fakeRanges),
		"pcap-max-size": {formatBytes(o.pcapMaxSize)},
	}
	var entries []configEntry
	fs.VisitAll(func(f *flag.Flag) {
		if metaFlags[f.Name] {
			return
		}
		values, set := got[f.Name]
		switch f.Name {
		case "proxy":
			// --socks and --proxy in the order given, each named: the
			// file keeps that order (keys are read sorted), and names.
			set = got.has("proxy") || got.has("socks")
			values = proxyStrings(o.proxies)
		case "socks":
			set, values = false, nil
		}
		if !set {
			if v, ok := chosen[f.Name]; ok {
				values = v
			} else if !repeatable[f.Name] {
				values = []string{f.DefValue}
			}
		}
		entries = append(entries, configEntry{key: f.Name, value: tomlValue(f, values), set: set})
	})
	return entries
}

// writeConfig writes the configuration in effect as a --config file: the
// keys that were set, every other one commented out with its value.
func writeConfig(w io.Writer, entries []configEntry) {
	fmt.Fprintln(w, "# netstackd configuration (--config FILE): every key is a flag, as netstackd --help")
	fmt.Fprintln(w, "# lists them; a flag given on the command line wins over the file. Commented keys")
	fmt.Fprintln(w, "# show the value in effect without setting it.")
	for _, e := range entries {
		prefix := ""
		if !e.set {
			prefix = "# "
		}
		fmt.Fprintf(w, "%s%s = %s\n", prefix, e.key, e.value)
	}
}

// tomlValue writes values as the TOML the flag's key takes: a list for a
// repeatable flag, true or false for a boolean, a number for an integer,
// a string otherwise.
func tomlValue(f *flag.Flag, values []string) string {
	if repeatable[f.Name] {
		quoted := make([]string, len(values))
		for i, v := range values {
			quoted[i] = strconv.Quote(v)
		}
		return "[" + strings.Join(quoted, ", ") + "]"
	}
	v := ""
	if len(values) > 0 {
		v = values[len(values)-1] // the flag package keeps the last
	}
	if b, ok := f.Value.(interface{ IsBoolFlag() bool }); ok && b.IsBoolFlag() {
		if _, err := strconv.ParseBool(v); err == nil {
			return v
		}
	}
	if g, ok := f.Value.(flag.Getter); ok {
		switch g.Get().(type) {
		case int, int64, uint, uint64:
			if _, err := strconv.ParseInt(v, 0, 64); err == nil {
				return v
			}
		}
	}
	return strconv.Quote(v)
}

func cidrStrings(ps []netip.Prefix) []string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return s
}
