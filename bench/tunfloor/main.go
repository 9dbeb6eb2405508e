// Command tunfloor answers connrate's short TCP connections at a TUN device
// itself, with no TCP stack and no upstream, to measure the floor that any
// program serving flows through a TUN starts from on a machine: the cost of
// the client's packets crossing the TUN and of our answers crossing back.
//
// It creates a TUN in -netns, routes 0.0.0.0/0 and ::/0 into it, and answers
// without keeping state:
//
//   - a SYN with a SYN-ACK (MSS only, no window scaling);
//   - a segment carrying data (connrate's request) with -size bytes of reply
//     and a FIN, acknowledging the data;
//   - a FIN with its ACK.
//
// With -relay it also carries each connection to its destination, as a TUN
// proxy must, but with the least work one can do: after the SYN-ACK it
// connects a blocking socket from its own namespace to the SYN's destination,
// and on the request it writes it there, reads the reply to EOF and sends it
// on with the FIN. One goroutine does all of it in turn, with no TCP stack,
// no goroutine per flow and no poller, so the figures are a floor for a
// relay, not a design for one.
//
// Everything else is dropped, so a connection that does not follow
// connrate's pattern (one request, the server closes first) stalls. Without
// -relay it never sends a packet anywhere but back into the TUN. It runs
// until SIGTERM or SIGINT.
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/signal"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

func main() {
	netns := flag.String("netns", "", "network namespace `FILE` to create the TUN in (/run/netns/NAME)")
	name := flag.String("tun", "tunfloor0", "interface `NAME`")
	size := flag.Int("size", 128, "reply size in bytes (without -relay)")
	relay := flag.Bool("relay", false, "carry each connection to its destination")
	flag.Parse()
	if *size < 0 || *size > mss {
		fmt.Fprintf(os.Stderr, "tunfloor: -size must be 0..%d\n", mss)
		os.Exit(2)
	}
	f := &floor{relay: *relay, reply: bytes.Repeat([]byte{'x'}, *size), flows: map[flowKey]int{}}
	if err := f.run(*netns, *name); err != nil {
		fmt.Fprintf(os.Stderr, "tunfloor: %v\n", err)
		os.Exit(1)
	}
}

// floor answers the TUN, with reply or, when it relays, with what the
// upstream sent: flows then holds the upstream socket of each connection
// between its SYN and its request.
type floor struct {
	dev   *tun
	relay bool
	reply []byte
	flows map[flowKey]int
	out   []byte
}

type flowKey struct {
	src, dst netip.AddrPort
}

func (f *floor) run(netns, name string) error {
	dev, err := openTUN(netns, name,
		[]netip.Prefix{netip.MustParsePrefix("198.18.0.1/15"), netip.MustParsePrefix("fc00:ba7::1/64")},
		[]netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")})
	if err != nil {
		return err
	}
	f.dev = dev
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	var closer sync.WaitGroup
	closer.Go(func() {
		<-ctx.Done()
		dev.Close() // ends the read below
	})
	defer closer.Wait()
	defer stop() // also when the read fails: the device is closed either way
	defer func() {
		for _, fd := range f.flows {
			unix.Close(fd)
		}
	}()

	bufs := make([][]byte, readBatch)
	for i := range bufs {
		bufs[i] = make([]byte, mtu)
	}
	sizes := make([]int, readBatch)
	for {
		n, err := dev.read(bufs, sizes)
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, os.ErrClosed) {
				return nil
			}
			return err
		}
		for i := range n {
			f.handle(bufs[i][:sizes[i]])
		}
	}
}

func (f *floor) send(s segment, from, to netip.AddrPort) {
	s.srcPort, s.dstPort = from.Port(), to.Port()
	f.out = s.appendTo(f.out[:0], from.Addr(), to.Addr())
	if err := f.dev.write(f.out); err != nil {
		fmt.Fprintf(os.Stderr, "tunfloor: %v\n", err)
	}
}

const (
	flagFin = 0x01
	flagSyn = 0x02
	flagRst = 0x04
	flagPsh = 0x08
	flagAck = 0x10

	isn = 0x10000000 // every connection's: nothing here remembers one
	mss = 1400
)

// inbound is what the floor needs of a TCP segment from the client.
type inbound struct {
	client, server netip.AddrPort
	seq, ack       uint32
	flags          byte
	data           []byte
}

// parse reads pkt as an IPv4 or IPv6 packet carrying TCP (no IPv6 extension
// headers); ok is false for anything else or anything cut short.
func parse(pkt []byte) (in inbound, ok bool) {
	if len(pkt) < 1 {
		return in, false
	}
	var src, dst netip.Addr
	var tcp []byte
	switch pkt[0] >> 4 {
	case 4:
		ihl := int(pkt[0]&0x0f) * 4
		if len(pkt) < 20 || ihl < 20 || len(pkt) < ihl || pkt[9] != syscall.IPPROTO_TCP {
			return in, false
		}
		total := int(binary.BigEndian.Uint16(pkt[2:]))
		if total < ihl || total > len(pkt) {
			return in, false
		}
		src = netip.AddrFrom4([4]byte(pkt[12:16]))
		dst = netip.AddrFrom4([4]byte(pkt[16:20]))
		tcp = pkt[ihl:total]
	case 6:
		if len(pkt) < 40 || pkt[6] != syscall.IPPROTO_TCP {
			return in, false
		}
		plen := int(binary.BigEndian.Uint16(pkt[4:]))
		if 40+plen > len(pkt) {
			return in, false
		}
		src = netip.AddrFrom16([16]byte(pkt[8:24]))
		dst = netip.AddrFrom16([16]byte(pkt[24:40]))
		tcp = pkt[40 : 40+plen]
	default:
		return in, false
	}
	if len(tcp) < 20 {
		return in, false
	}
	off := int(tcp[12]>>4) * 4
	if off < 20 || off > len(tcp) {
		return in, false
	}
	return inbound{
		client: netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:])),
		server: netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:])),
		seq:    binary.BigEndian.Uint32(tcp[4:]),
		ack:    binary.BigEndian.Uint32(tcp[8:]),
		flags:  tcp[13],
		data:   tcp[off:],
	}, true
}

// handle answers pkt if it is a TCP segment that calls for an answer.
func (f *floor) handle(pkt []byte) {
	in, ok := parse(pkt)
	if !ok {
		return
	}
	k := flowKey{in.client, in.server}
	switch {
	case in.flags&flagRst != 0:
	case in.flags&flagSyn != 0 && in.flags&flagAck == 0:
		f.send(segment{seq: isn, ack: in.seq + 1, flags: flagSyn | flagAck, mss: true}, in.server, in.client)
		if f.relay {
			f.connect(k)
		}
	case len(in.data) > 0:
		reply := f.reply
		if f.relay {
			reply = f.exchange(k, in.data)
		}
		f.send(segment{seq: isn + 1, ack: in.seq + uint32(len(in.data)), flags: flagAck | flagPsh | flagFin, payload: reply}, in.server, in.client)
	case in.flags&flagFin != 0:
		f.send(segment{seq: in.ack, ack: in.seq + 1, flags: flagAck}, in.server, in.client)
	}
}

// connect opens the flow's upstream socket; a failure leaves no flow, and
// the request then gets an empty reply.
func (f *floor) connect(k flowKey) {
	if fd, ok := f.flows[k]; ok { // a SYN sent again
		unix.Close(fd)
		delete(f.flows, k)
	}
	family, sa := unix.AF_INET6, unix.Sockaddr(&unix.SockaddrInet6{Addr: k.dst.Addr().As16(), Port: int(k.dst.Port())})
	if k.dst.Addr().Is4() {
		family, sa = unix.AF_INET, &unix.SockaddrInet4{Addr: k.dst.Addr().As4(), Port: int(k.dst.Port())}
	}
	fd, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintf(os.Stderr, "tunfloor: socket: %v\n", err)
		return
	}
	// A peer that stalls must not stall the floor for longer than this.
	tv := unix.Timeval{Sec: 1}
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv)
	_ = unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_SNDTIMEO, &tv)
	if err := unix.Connect(fd, sa); err != nil {
		fmt.Fprintf(os.Stderr, "tunfloor: connect %s: %v\n", k.dst, err)
		unix.Close(fd)
		return
	}
	f.flows[k] = fd
}

// exchange writes the request upstream and returns the reply, read to EOF,
// as much of it as one segment holds.
func (f *floor) exchange(k flowKey, request []byte) []byte {
	fd, ok := f.flows[k]
	if !ok {
		return nil
	}
	delete(f.flows, k)
	defer unix.Close(fd)
	if _, err := unix.Write(fd, request); err != nil {
		fmt.Fprintf(os.Stderr, "tunfloor: write %s: %v\n", k.dst, err)
		return nil
	}
	var buf [mss]byte
	n := 0
	for n < len(buf) {
		r, err := unix.Read(fd, buf[n:])
		if err != nil {
			fmt.Fprintf(os.Stderr, "tunfloor: read %s: %v\n", k.dst, err)
			break
		}
		if r == 0 {
			break
		}
		n += r
	}
	return buf[:n]
}

// segment is one TCP segment to send, ports already from our side.
type segment struct {
	srcPort, dstPort uint16
	seq, ack         uint32
	flags            byte
	mss              bool
	payload          []byte
}

func (s segment) appendTo(out []byte, src, dst netip.Addr) []byte {
	hlen := 20
	if s.mss {
		hlen += 4
	}
	tcpLen := hlen + len(s.payload)
	if src.Is4() {
		out = append(out, 0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, syscall.IPPROTO_TCP, 0, 0)
		binary.BigEndian.PutUint16(out[2:], uint16(20+tcpLen))
		out = append(out, src.AsSlice()...)
		out = append(out, dst.AsSlice()...)
		binary.BigEndian.PutUint16(out[10:], ^fold(sum(out[:20], 0)))
	} else {
		out = append(out, 0x60, 0, 0, 0, 0, 0, syscall.IPPROTO_TCP, 64)
		binary.BigEndian.PutUint16(out[4:], uint16(tcpLen))
		out = append(out, src.AsSlice()...)
		out = append(out, dst.AsSlice()...)
	}
	ip := len(out)
	out = binary.BigEndian.AppendUint16(out, s.srcPort)
	out = binary.BigEndian.AppendUint16(out, s.dstPort)
	out = binary.BigEndian.AppendUint32(out, s.seq)
	out = binary.BigEndian.AppendUint32(out, s.ack)
	out = append(out, byte(hlen/4)<<4, s.flags, 0xff, 0xff, 0, 0, 0, 0)
	if s.mss {
		out = append(out, 2, 4, mss>>8, mss&0xff)
	}
	out = append(out, s.payload...)

	// The checksum covers a pseudo-header of both addresses, the protocol
	// and the TCP length, then the segment itself.
	acc := sum(src.AsSlice(), 0)
	acc = sum(dst.AsSlice(), acc)
	acc += uint32(syscall.IPPROTO_TCP) + uint32(tcpLen)
	acc = sum(out[ip:], acc)
	binary.BigEndian.PutUint16(out[ip+16:], ^fold(acc))
	return out
}

// sum adds b to acc as big-endian 16-bit words, the Internet checksum's
// way; an odd last byte is padded with zero.
func sum(b []byte, acc uint32) uint32 {
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}
