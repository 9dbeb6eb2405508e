package tundev_test

import (
	"errors"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/internal/netnstest"
	"github.com/netstackd/netstackd/tundev"
)

// nextEvent waits for the device's next event.
func nextEvent(t *testing.T, dev *tundev.Device) (device.Event, bool) {
	t.Helper()
	select {
	case ev, ok := <-dev.Events():
		return ev, ok
	case <-time.After(waitTimeout):
		t.Fatalf("no event within %v", waitTimeout)
		return device.Event{}, false
	}
}

// TestEventsLinkDeleted: an MTU change is reported, and deleting the
// interface under the device ends it with EventDown, in the namespace it
// was created in and in our own, while a reader waits.
func TestEventsLinkDeleted(t *testing.T) {
	netnstest.RequireRoot(t)
	for _, inNetns := range []bool{true, false} {
		name := "inns"
		if !inNetns {
			name = "here"
		}
		t.Run(name, func(t *testing.T) {
			ns, nsPath := netnstest.NewBareNetns(t, "tdev")
			cfg := tundev.Config{Name: "tdevt0", Logger: testLogger(t)}
			ip := []string{"-n", ns}
			if inNetns {
				cfg.NetnsPath = nsPath
			} else {
				// Our own namespace: a name no other test binary uses.
				cfg.Name = fmt.Sprintf("tdh%d", os.Getpid())
				ip = nil
			}
			dev, err := tundev.Create(cfg)
			if err != nil {
				t.Fatalf("Create: %v", err)
			}
			defer dev.Close()
			readErr := make(chan error, 1)
			go func() {
				_, err := dev.Read(0, [][]byte{make([]byte, device.ReadOffset+device.MaxPacket)}, []int{0}, []device.Meta{{}}, device.ReadOffset)
				readErr <- err
			}()

			netnstest.IP(t, append(ip, "link", "set", dev.Name(), "mtu", "1400")...)
			if ev, ok := nextEvent(t, dev); !ok || ev.Kind != device.EventMTU || ev.MTU != 1400 {
				t.Fatalf("after an MTU change: event %+v (open %v), want EventMTU 1400", ev, ok)
			}

			deleted := time.Now()
			netnstest.IP(t, append(ip, "link", "del", dev.Name())...)
			ev, ok := nextEvent(t, dev)
			if !ok || ev.Kind != device.EventDown || ev.Err == nil {
				t.Fatalf("after deleting the interface: event %+v (open %v), want EventDown with a reason", ev, ok)
			}
			t.Logf("EventDown %v after the deletion: %v", time.Since(deleted), ev.Err)
			if _, ok := <-dev.Events(); ok {
				t.Error("events still open after EventDown")
			}
			select {
			case err := <-readErr:
				if err == nil || errors.Is(err, os.ErrClosed) {
					t.Errorf("blocked Read after the deletion = %v, want the device's failure", err)
				}
			case <-time.After(waitTimeout):
				t.Fatal("Read still blocked after the interface was deleted")
			}
		})
	}
}

// TestEventsClose: Close ends the events without an EventDown.
func TestEventsClose(t *testing.T) {
	dev, _ := socketpair(t)
	dev.Close()
	if ev, ok := <-dev.Events(); ok {
		t.Errorf("event %+v after Close, want the channel closed", ev)
	}
}
