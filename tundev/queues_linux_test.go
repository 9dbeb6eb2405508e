package tundev_test

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

func TestQueuesConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		name   string
		queues int
	}{
		{"negative", -1},
		{"above max", tundev.MaxQueues + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dev, err := tundev.Create(tundev.Config{Name: tunName, NetnsPath: "/nonexistent", Queues: tc.queues})
			if err == nil {
				dev.Close()
				t.Fatalf("Create with %d queues succeeded", tc.queues)
			}
			// Checked before anything is opened: not the missing netns.
			if !strings.Contains(err.Error(), fmt.Sprintf("queues %d out of range", tc.queues)) {
				t.Errorf("Create with %d queues = %v, want an out-of-range error", tc.queues, err)
			}
		})
	}
}

// queuePacket is a packet read from one queue, without its vnet header.
type queuePacket struct {
	queue int
	pkt   []byte
}

// startQueueReaders reads every queue of dev in a goroutine of its own, as
// the stack's dispatchers do, until Close; the returned function waits for
// them and returns the error each one stopped with.
func startQueueReaders(t *testing.T, dev *tundev.Device) (<-chan queuePacket, func() []error) {
	pkts := make(chan queuePacket, 1024)
	errs := make([]error, dev.NumQueues())
	var wg sync.WaitGroup
	for q := range dev.NumQueues() {
		wg.Go(func() {
			bufs := make([][]byte, dev.BatchSize())
			for i := range bufs {
				bufs[i] = make([]byte, device.ReadOffset+device.MaxPacket)
			}
			sizes := make([]int, len(bufs))
			for {
				n, err := readPackets(dev, q, bufs, sizes)
				if err != nil {
					errs[q] = err
					return
				}
				for i := range n {
					select {
					case pkts <- queuePacket{q, bytes.Clone(packetAt(bufs, sizes, i))}:
					default: // the test is not looking
					}
				}
			}
		})
	}
	var once sync.Once
	stop := func() []error {
		once.Do(func() {
			dev.Close()
			wg.Wait()
		})
		return errs
	}
	t.Cleanup(func() { stop() })
	return pkts, stop
}

// TestCreateQueues opens a four-queue TUN in a namespace: flows from inside
// spread over all queues, a flow whose packet we write on a queue comes
// back on that queue (the steering the stack's writer relies on), and
// Close ends every queue's reader and deletes the interface.
func TestCreateQueues(t *testing.T) {
	netnstest.RequireRoot(t)
	const queues = 4
	ns, nsPath := netnstest.NewBareNetns(t, "mq")
	dev, err := tundev.Create(tundev.Config{
		Name:      tunName,
		NetnsPath: nsPath,
		Addrs:     []netip.Prefix{addr4},
		Routes:    []netip.Prefix{route4},
		Queues:    queues,
		Logger:    testLogger(t),
	})
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { dev.Close() })
	if got := dev.NumQueues(); got != queues {
		t.Fatalf("NumQueues() = %d, want %d", got, queues)
	}
	if !dev.TSO() {
		t.Errorf("no TSO on a multi-queue device: offloads %v", dev.Offloads())
	}
	if out := netnstest.IP(t, "-n", ns, "-d", "link", "show", tunName); !strings.Contains(out, "multi_queue") {
		t.Errorf("ip -d link show: no multi_queue flag in %q", out)
	}
	if _, err := dev.DupFile(); err == nil {
		t.Error("DupFile on a multi-queue device succeeded")
	}
	if _, err := readPackets(dev, queues, [][]byte{make([]byte, 100)}, []int{0}); err == nil {
		t.Error("Read past the last queue succeeded")
	}
	h := netnstest.NetlinkHandle(t, nsPath)
	if err := dev.Up(); err != nil {
		t.Fatalf("Up: %v", err)
	}
	pkts, stop := startQueueReaders(t, dev)

	// Flows from inside: one datagram from each of many sockets. With no
	// flow seen before, the kernel picks a queue by flow hash.
	const flows = 64
	dst := netip.MustParseAddrPort("192.0.2.7:9")
	sent := make(map[netip.AddrPort]bool)
	for range flows {
		c := listenUDP(t, nsPath, netip.AddrPortFrom(addr4.Addr(), 0))
		if _, err := c.WriteToUDPAddrPort([]byte("spread"), dst); err != nil {
			t.Fatalf("send from the namespace: %v", err)
		}
		sent[c.LocalAddr().(*net.UDPAddr).AddrPort()] = true
	}
	perQueue := make([]int, queues)
	deadline := time.After(waitTimeout)
	for seen := 0; seen < flows; {
		select {
		case p := <-pkts:
			src, d, _, ok := netnstest.ParseUDP(p.pkt)
			if ok && d == dst && sent[src] {
				delete(sent, src)
				perQueue[p.queue]++
				seen++
			}
		case <-deadline:
			t.Fatalf("%d of %d datagrams read within %v (per queue %v)", seen, flows, waitTimeout, perQueue)
		}
	}
	t.Logf("datagrams of %d flows per queue: %v", flows, perQueue)
	for q, n := range perQueue {
		if n == 0 {
			t.Errorf("queue %d read none of %d flows: %v", q, flows, perQueue)
		}
	}

	// Steering: a packet of a flow written on a queue makes the kernel
	// hand that flow's packets to that queue (tun_flow_update); Write picks
	// the queue by the flow's hash.
	for k := range queues {
		inside := listenUDP(t, nsPath, netip.AddrPortFrom(addr4.Addr(), 0))
		in := inside.LocalAddr().(*net.UDPAddr).AddrPort()
		outside := netip.AddrPortFrom(netip.MustParseAddr("192.0.2.9"), uint16(7000+k))
		pkt := netnstest.UDPPacket(outside, in, []byte("ping"))
		wq := tundev.FlowQueue(pkt, queues)
		if _, err := writePackets(dev, pkt); err != nil {
			t.Fatalf("Write (flow %d): %v", k, err)
		}
		buf := make([]byte, 100)
		_ = inside.SetReadDeadline(time.Now().Add(waitTimeout))
		n, from, err := inside.ReadFromUDPAddrPort(buf)
		if err != nil || string(buf[:n]) != "ping" || from != outside {
			t.Fatalf("queue %d: datagram written did not arrive inside: %q from %s, %v", k, buf[:n], from, err)
		}
		if _, err := inside.WriteToUDPAddrPort([]byte("pong"), outside); err != nil {
			t.Fatalf("reply from inside: %v", err)
		}
		timeout := time.After(waitTimeout)
	reply:
		for {
			select {
			case p := <-pkts:
				src, d, payload, ok := netnstest.ParseUDP(p.pkt)
				if !ok || src != in || d != outside || string(payload) != "pong" {
					continue
				}
				if p.queue != wq {
					t.Errorf("reply of a flow written on queue %d read on queue %d", wq, p.queue)
				}
				break reply
			case <-timeout:
				t.Fatalf("queue %d: no reply read within %v", k, waitTimeout)
			}
		}
	}

	for q, err := range stop() {
		if !errors.Is(err, os.ErrClosed) {
			t.Errorf("queue %d: reader stopped with %v, want os.ErrClosed", q, err)
		}
	}
	if _, err := h.LinkByName(tunName); err == nil {
		t.Error("interface still there after Close, which should delete what it created")
	}
}

// TestQueuesExisting attaches to interfaces made beforehand: a persistent
// multi-queue TUN is attached to and left in place by Close; a single-queue
// one is refused with an error that says why.
func TestQueuesExisting(t *testing.T) {
	netnstest.RequireRoot(t)
	ns, nsPath := netnstest.NewBareNetns(t, "mq")
	h := netnstest.NetlinkHandle(t, nsPath)

	t.Run("single-queue", func(t *testing.T) {
		name := tunName + "s"
		netnstest.IP(t, "-n", ns, "tuntap", "add", "dev", name, "mode", "tun")
		dev, err := tundev.Create(tundev.Config{Name: name, NetnsPath: nsPath, Queues: 2})
		if err == nil {
			dev.Close()
			t.Fatal("Create with 2 queues attached to a single-queue TUN")
		}
		if !errors.Is(err, unix.EINVAL) || !strings.Contains(err.Error(), "not a multi-queue TUN") {
			t.Errorf("Create with 2 queues on a single-queue TUN = %v, want EINVAL explained", err)
		}
		if _, err := h.LinkByName(name); err != nil {
			t.Errorf("the existing interface is gone after the refused Create: %v", err)
		}
	})
	t.Run("multi-queue", func(t *testing.T) {
		name := tunName + "m"
		netnstest.IP(t, "-n", ns, "tuntap", "add", "dev", name, "mode", "tun", "multi_queue")
		dev, err := tundev.Create(tundev.Config{Name: name, NetnsPath: nsPath, Queues: 3, Addrs: []netip.Prefix{addr4}})
		if err != nil {
			t.Fatalf("Create with 3 queues on a persistent multi-queue TUN: %v", err)
		}
		if dev.NumQueues() != 3 {
			t.Errorf("NumQueues() = %d, want 3", dev.NumQueues())
		}
		// A single-queue open of a multi-queue TUN is refused.
		if dev2, err := tundev.Create(tundev.Config{Name: name, NetnsPath: nsPath}); err == nil {
			dev2.Close()
			t.Error("single-queue Create attached to a multi-queue TUN")
		}
		if err := dev.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
		link, err := h.LinkByName(name)
		if err != nil {
			t.Fatalf("persistent multi-queue TUN gone after Close: %v", err)
		}
		checkAddrs(t, h, link, nil, []netip.Prefix{addr4})
	})
}
