package proxy

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The real servers the tests run: each on a free loopback port, in the
// foreground, in a process group of its own so that stopping it reaches the
// workers it forks (dante runs a dozen), and each skipped with a message
// naming its Debian package when the binary is missing.

// daemon is a real server started by startDaemon.
type daemon struct {
	addr     string
	stopOnce sync.Once
	stopFn   func()
}

// stop ends the server and waits for it; later calls do nothing.
func (d *daemon) stop() { d.stopOnce.Do(d.stopFn) }

// lookBinary finds name in PATH or at path, or skips the test.
func lookBinary(t *testing.T, name, path, pkg string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	if _, err := os.Stat(path); err == nil {
		return path
	}
	t.Skipf("%s not installed (apt-get install %s): skipping tests against it", name, pkg)
	return ""
}

// startDaemon runs path with the arguments args returns for a free loopback
// port, and returns once that port accepts connections. args may write
// configuration files. The server is stopped when the test ends, and its
// output logged if the test failed.
func startDaemon(t *testing.T, path string, args func(port int) []string) *daemon {
	t.Helper()
	// The port may be taken between freePort and the server's bind; then
	// the server exits and we try another.
	var lastErr string
	for range 3 {
		port := freePort(t)
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		var output syncBuffer
		cmd := exec.Command(path, args(port)...)
		cmd.Stdout, cmd.Stderr = &output, &output
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		if err := cmd.Start(); err != nil {
			t.Fatalf("start %s: %v", path, err)
		}
		exited := make(chan struct{})
		go func() {
			cmd.Wait()
			close(exited)
		}()
		stop := func() { stopGroup(cmd.Process.Pid, exited) }
		if waitListening(addr, exited, 5*time.Second) {
			d := &daemon{addr: addr, stopFn: stop}
			t.Cleanup(func() {
				d.stop()
				if t.Failed() {
					t.Logf("%s output:\n%s", filepath.Base(path), output.String())
				}
			})
			return d
		}
		stop()
		lastErr = output.String()
	}
	t.Fatalf("%s did not start listening: %s", path, lastErr)
	return nil
}

// stopGroup sends SIGTERM to the process group of pid, which lets dante's
// main process take its workers down, and SIGKILL if the leader has not
// exited after 5s. It returns once the leader has been reaped.
func stopGroup(pid int, exited <-chan struct{}) {
	syscall.Kill(-pid, syscall.SIGTERM)
	select {
	case <-exited:
	case <-time.After(5 * time.Second):
		syscall.Kill(-pid, syscall.SIGKILL)
		<-exited
	}
}

// waitListening polls addr with connects until one succeeds, the process
// exits or timeout passes.
func waitListening(addr string, exited <-chan struct{}, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return true
		}
		select {
		case <-exited:
			return false
		case <-time.After(10 * time.Millisecond):
		}
	}
	return false
}

// syncBuffer is a bytes.Buffer that a process's stdout and stderr copiers
// can write at once.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// startMicrosocks runs the real microsocks (SOCKS5 CONNECT only), with
// username/password authentication when user is set, and returns its
// address.
func startMicrosocks(t *testing.T, user, password string) string {
	t.Helper()
	path := lookBinary(t, "microsocks", "/usr/bin/microsocks", "microsocks")
	return startDaemon(t, path, func(port int) []string {
		args := []string{"-i", "127.0.0.1", "-p", strconv.Itoa(port)}
		if user != "" {
			args = append(args, "-u", user, "-P", password)
		}
		return args
	}).addr
}

// danteConf is a danted.conf (dante 1.4.2) for a server on 127.0.0.1 that
// takes SOCKS4 and SOCKS5 without authentication from loopback clients and
// allows CONNECT, BIND and UDP ASSOCIATE to anywhere, with replies (UDP
// and BIND) back to loopback. Rule syntax: danted.conf(5); "log: error"
// puts each refusal on stderr. The one %d is the port.
const danteConf = `logoutput: stderr
internal: 127.0.0.1 port = %d
external: 127.0.0.1
socksmethod: none
clientmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	log: error
}
socks pass {
	from: 127.0.0.0/8 to: 0.0.0.0/0
	command: bind connect udpassociate
	protocol: tcp udp
	log: error
}
socks pass {
	from: 0.0.0.0/0 to: 127.0.0.0/8
	command: bindreply udpreply
	log: error
}
`

// startDante runs the real dante server (danted) in the foreground with
// danteConf; -N 1 keeps it to one main process.
func startDante(t *testing.T) *daemon {
	t.Helper()
	path := lookBinary(t, "danted", "/usr/sbin/danted", "dante-server")
	dir := t.TempDir()
	return startDaemon(t, path, func(port int) []string {
		conf := filepath.Join(dir, "danted.conf")
		if err := os.WriteFile(conf, fmt.Appendf(nil, danteConf, port), 0o644); err != nil {
			t.Fatal(err)
		}
		return []string{"-f", conf, "-N", "1", "-p", filepath.Join(dir, "danted.pid")}
	})
}

// tinyproxyConf is a tinyproxy.conf (tinyproxy 1.11.1) for a proxy on
// 127.0.0.1 that serves loopback clients. Without ConnectPort lines CONNECT
// may reach any port. The %d is the port; the %s is empty or a BasicAuth
// line.
const tinyproxyConf = `Port %d
Listen 127.0.0.1
Timeout 600
MaxClients 100
Allow 127.0.0.1
LogLevel Info
%s
`

// startTinyproxy runs the real tinyproxy in the foreground (-d), asking for
// Basic authentication when user is set.
func startTinyproxy(t *testing.T, user, password string) string {
	t.Helper()
	path := lookBinary(t, "tinyproxy", "/usr/bin/tinyproxy", "tinyproxy")
	dir := t.TempDir()
	auth := ""
	if user != "" {
		auth = "BasicAuth " + user + " " + password
	}
	return startDaemon(t, path, func(port int) []string {
		conf := filepath.Join(dir, "tinyproxy.conf")
		if err := os.WriteFile(conf, fmt.Appendf(nil, tinyproxyConf, port, auth), 0o644); err != nil {
			t.Fatal(err)
		}
		return []string{"-d", "-c", conf}
	}).addr
}

// sshdConf runs OpenSSH's sshd on 127.0.0.1 for one key, with TCP
// forwarding: the server side of "ssh -D". The %d is the port, the %s the
// directory holding the keys.
const sshdConf = `ListenAddress 127.0.0.1:%d
HostKey %[2]s/host_key
AuthorizedKeysFile %[2]s/authorized_keys
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
`

// startSSHSOCKS runs OpenSSH's dynamic forwarding (ssh -D), a SOCKS4,
// SOCKS4A and SOCKS5 server: a real sshd on loopback and an ssh client
// logged into it. It is the SOCKS4A server here, dante having no 4A.
func startSSHSOCKS(t *testing.T) string {
	t.Helper()
	sshd := lookBinary(t, "sshd", "/usr/sbin/sshd", "openssh-server")
	ssh := lookBinary(t, "ssh", "/usr/bin/ssh", "openssh-client")
	keygen := lookBinary(t, "ssh-keygen", "/usr/bin/ssh-keygen", "openssh-client")
	if os.Geteuid() != 0 {
		t.Skip("needs root: sshd logs the client in as root")
	}
	// sshd refuses to start without its privilege separation directory,
	// which the service unit would create.
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Skipf("sshd needs /run/sshd: %v", err)
	}
	dir := t.TempDir()
	for _, key := range []string{"host_key", "client_key"} {
		out, err := exec.CommandContext(t.Context(), keygen, "-q", "-t", "ed25519", "-N", "", "-f", filepath.Join(dir, key)).CombinedOutput()
		if err != nil {
			t.Fatalf("ssh-keygen: %v\n%s", err, out)
		}
	}
	pub, err := os.ReadFile(filepath.Join(dir, "client_key.pub"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "authorized_keys"), pub, 0o600); err != nil {
		t.Fatal(err)
	}
	server := startDaemon(t, sshd, func(port int) []string {
		conf := filepath.Join(dir, "sshd_config")
		if err := os.WriteFile(conf, fmt.Appendf(nil, sshdConf, port, dir), 0o600); err != nil {
			t.Fatal(err)
		}
		return []string{"-D", "-e", "-f", conf}
	})
	host, port, _ := net.SplitHostPort(server.addr)
	return startDaemon(t, ssh, func(socksPort int) []string {
		return []string{
			"-F", "/dev/null", "-N", "-D", net.JoinHostPort("127.0.0.1", strconv.Itoa(socksPort)),
			"-i", filepath.Join(dir, "client_key"), "-p", port,
			"-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
			"-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
			"root@" + host,
		}
	}).addr
}

// startUDPEcho runs a UDP echo server on host (an IP literal) and port (0
// for any) until the test ends, and returns its address.
func startUDPEcho(t *testing.T, host string, port int) *net.UDPAddr {
	t.Helper()
	c, err := net.ListenPacket("udp", net.JoinHostPort(host, strconv.Itoa(port)))
	if err != nil {
		t.Fatalf("listen udp: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, from, err := c.ReadFrom(buf)
			if err != nil {
				return
			}
			c.WriteTo(buf[:n], from)
		}
	}()
	t.Cleanup(func() {
		c.Close()
		<-done
	})
	return c.LocalAddr().(*net.UDPAddr)
}
