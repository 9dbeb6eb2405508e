package stack

import (
	"errors"
	"io"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
)

// TestDeviceDownEndsStack: when the device reports EventDown (here its read
// fails: the far end of the socketpair is shut), Done is closed and Err says
// why; after a normal Close, Done is closed and Err is nil.
func TestDeviceDownEndsStack(t *testing.T) {
	t.Run("device-down", func(t *testing.T) {
		dev := newSeqpacketDevice(t, 1, 1, 1500)
		st := newTestStack(t, Config{}, dev, &redirectDialer{})
		t.Cleanup(func() {
			st.Close()
			unix.Close(dev.far[0])
		})
		if err := st.Err(); err != nil {
			t.Fatalf("Err while serving: %v, want nil", err)
		}
		select {
		case <-st.Done():
			t.Fatal("Done closed while the device is up")
		default:
		}
		// The stack's reads now see the end of the stream.
		if err := unix.Shutdown(dev.far[0], unix.SHUT_WR); err != nil {
			t.Fatalf("shutdown: %v", err)
		}
		select {
		case <-st.Done():
		case <-time.After(5 * time.Second):
			t.Fatal("Done not closed 5s after the device went down")
		}
		if err := st.Err(); !errors.Is(err, io.EOF) {
			t.Errorf("Err after the device went down: %v, want the read's error (EOF)", err)
		}
		if err := st.Close(); err != nil {
			t.Errorf("Close after the device went down: %v", err)
		}
		if err := st.Err(); !errors.Is(err, io.EOF) {
			t.Errorf("Err after a later Close: %v, want it kept (EOF)", err)
		}
	})
	t.Run("close", func(t *testing.T) {
		p := newPeer(t, Config{})
		if err := p.st.Close(); err != nil {
			t.Fatalf("close: %v", err)
		}
		select {
		case <-p.st.Done():
		default:
			t.Fatal("Done not closed after Close")
		}
		if err := p.st.Err(); err != nil {
			t.Errorf("Err after Close: %v, want nil", err)
		}
	})
}

// TestServeInboundTakesFlowSlot: a published TCP connection takes one of the
// MaxFlows slots like an outbound flow. With MaxFlows 1 and one flow open,
// a published connection is reset and never reaches the server inside;
// once the flow ends, one gets through.
func TestServeInboundTakesFlowSlot(t *testing.T) {
	p := newPeer(t, Config{Gateway4: netip.MustParseAddr("198.18.0.2"), MaxFlows: 1})
	ln, err := gonet.ListenTCP(p.client, tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFrom4([4]byte{198, 18, 0, 1}), Port: 8000}, ipv4.ProtocolNumber)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan struct{}, 10)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted <- struct{}{}
			go func() {
				defer c.Close()
				io.Copy(c, c)
			}()
		}
	}()

	port := listen(t, echo)
	c, err := p.dial(t, netip.AddrPortFrom(netip.MustParseAddr("192.0.2.2"), port))
	if err != nil {
		t.Fatalf("dial: %v", err)
	}
	defer c.Close()

	outside, host := tcpPair(t)
	defer outside.Close()
	p.st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8000"))
	outside.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(outside); !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("published connection beyond MaxFlows: %v, want ECONNRESET", err)
	}
	select {
	case <-accepted:
		t.Fatal("the server inside accepted a connection beyond MaxFlows")
	default:
	}

	// The outbound flow ends and frees its slot.
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if publishedEcho(t, p.st) == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no published connection got through after the flow ended")
		}
		time.Sleep(20 * time.Millisecond) // polling a slot with no signal to wait on
	}
}

// publishedEcho serves one published connection to the echo server at
// 198.18.0.1:8000 and checks one round trip.
func publishedEcho(t *testing.T, st *Stack) error {
	outside, host := tcpPair(t)
	defer outside.Close()
	st.ServeInbound(host, netip.MustParseAddrPort("198.18.0.1:8000"))
	outside.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := outside.Write([]byte("ping")); err != nil {
		return err
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(outside, buf); err != nil {
		return err
	}
	if string(buf) != "ping" {
		return errors.New("echo differs")
	}
	return nil
}
