package frag

import (
	"bytes"
	"encoding/binary"
	"math/rand/v2"
	"net/netip"
	"testing"
	"time"
)

var (
	src4 = netip.MustParseAddr("198.18.0.1")
	dst4 = netip.MustParseAddr("192.0.2.2")
	src6 = netip.MustParseAddr("fd00:1898::1")
	dst6 = netip.MustParseAddr("2001:db8:1::2")
)

// udpPacket builds an IPv4 or IPv6 packet of protocol 17 from src to dst
// with payloadLen bytes after the IP header; the bytes are a pattern, not
// a valid UDP datagram: reassembly does not look at them.
func udpPacket(src, dst netip.Addr, payloadLen int, id uint16) []byte {
	var pkt []byte
	if src.Is4() {
		pkt = make([]byte, ipv4HeaderLen+payloadLen)
		pkt[0] = 0x45
		binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		binary.BigEndian.PutUint16(pkt[4:], id)
		pkt[8], pkt[9] = 64, 17
		s, d := src.As4(), dst.As4()
		copy(pkt[12:], s[:])
		copy(pkt[16:], d[:])
		setIPv4Checksum(pkt[:ipv4HeaderLen])
	} else {
		pkt = make([]byte, ipv6HeaderLen+payloadLen)
		pkt[0] = 0x60
		binary.BigEndian.PutUint16(pkt[4:], uint16(payloadLen))
		pkt[6], pkt[7] = 17, 64
		s, d := src.As16(), dst.As16()
		copy(pkt[8:], s[:])
		copy(pkt[24:], d[:])
	}
	hl := len(pkt) - payloadLen
	for i := hl; i < len(pkt); i++ {
		pkt[i] = byte(i*7 + i>>8)
	}
	return pkt
}

// split cuts pkt at mtu and returns the fragments.
func split(t testing.TB, pkt []byte, mtu int, id uint32) [][]byte {
	t.Helper()
	b, lens, ok := AppendFragments(nil, nil, pkt, mtu, id)
	if !ok {
		t.Fatalf("AppendFragments of %d bytes at MTU %d refused", len(pkt), mtu)
	}
	var frags [][]byte
	for _, n := range lens {
		if n > mtu {
			t.Fatalf("fragment of %d bytes exceeds MTU %d", n, mtu)
		}
		frags = append(frags, b[:n:n])
		b = b[n:]
	}
	return frags
}

func TestRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
		size     int
		mtu      int
	}{
		{"ipv4-3000", src4, dst4, 3000, 1500},
		{"ipv4-65515", src4, dst4, 65515, 1500},
		{"ipv4-mtu68", src4, dst4, 4000, 68},
		{"ipv6-3000", src6, dst6, 3000, 1500},
		{"ipv6-65535", src6, dst6, 65535, 1500},
		{"ipv6-mtu1280", src6, dst6, 20000, 1280},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pkt := udpPacket(tc.src, tc.dst, tc.size, 77)
			frags := split(t, pkt, tc.mtu, 12345)
			rand.New(rand.NewPCG(1, uint64(tc.size))).Shuffle(len(frags), func(i, j int) { frags[i], frags[j] = frags[j], frags[i] })
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			for i, f := range frags {
				got, res := r.Process(f, out)
				if i < len(frags)-1 {
					if res != Held {
						t.Fatalf("fragment %d of %d: %v, want Held", i, len(frags), res)
					}
					continue
				}
				if res != Reassembled {
					t.Fatalf("last fragment: %v, want Reassembled", res)
				}
				if !bytes.Equal(got, pkt) {
					t.Fatalf("reassembled %d bytes differ from the %d sent", len(got), len(pkt))
				}
			}
			if s := r.Stats(); s.Packets != 0 || s.Bytes != 0 {
				t.Errorf("after reassembly the reassembler holds %d packets, %d bytes", s.Packets, s.Bytes)
			}
		})
	}
}

func TestWholePacketsPass(t *testing.T) {
	r := New(Config{})
	defer r.Close()
	out := make([]byte, MaxPacket)
	for _, pkt := range [][]byte{udpPacket(src4, dst4, 100, 1), udpPacket(src6, dst6, 100, 1), {}, {0x45}, {0x10, 1, 2}} {
		if _, res := r.Process(pkt, out); res != NotFragment {
			t.Errorf("%x: %v, want NotFragment", pkt, res)
		}
	}
}

func TestAtomicFragment(t *testing.T) {
	// RFC 6946: an IPv6 packet with a Fragment header at offset 0 and no
	// more fragments is whole.
	pkt := udpPacket(src6, dst6, 100, 0)
	b := append([]byte(nil), pkt[:ipv6HeaderLen]...)
	b = append(b, 17, 0, 0, 0, 0, 0, 0, 9)
	b = append(b, pkt[ipv6HeaderLen:]...)
	b[6] = protoFragment
	binary.BigEndian.PutUint16(b[4:], uint16(len(b)-ipv6HeaderLen))
	got, res := New(Config{}).Process(b, make([]byte, MaxPacket))
	if res != Reassembled || !bytes.Equal(got, pkt) {
		t.Errorf("atomic fragment: %v, %d bytes; want Reassembled, the packet without its Fragment header", res, len(got))
	}
}

// setOffset rewrites a fragment's offset and MF flag.
func setOffset(f []byte, off int, more bool) {
	if f[0]>>4 == 4 {
		v := uint16(off / 8)
		if more {
			v |= 0x2000
		}
		binary.BigEndian.PutUint16(f[6:], v)
		setIPv4Checksum(f[:ipv4HeaderLen])
		return
	}
	v := uint16(off)
	if more {
		v |= 1
	}
	binary.BigEndian.PutUint16(f[ipv6HeaderLen+2:], v)
}

func TestRefused(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		src, dst := src4, dst4
		if v6 {
			src, dst = src6, dst6
		}
		name := map[bool]string{false: "ipv4", true: "ipv6"}[v6]
		t.Run(name+"/overlap", func(t *testing.T) {
			// RFC 5722: an overlap discards the packet, even if the rest
			// arrives.
			frags := split(t, udpPacket(src, dst, 4000, 5), 1500, 5)
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			r.Process(frags[0], out)
			bad := bytes.Clone(frags[1])
			setOffset(bad, fragOffset(frags[1])-8, true)
			if _, res := r.Process(bad, out); res != Dropped {
				t.Fatalf("overlapping fragment: %v, want Dropped", res)
			}
			for _, f := range frags[1:] {
				if _, res := r.Process(f, out); res == Reassembled {
					t.Fatal("a packet with an overlapping fragment was reassembled")
				}
			}
		})
		t.Run(name+"/duplicate", func(t *testing.T) {
			pkt := udpPacket(src, dst, 4000, 5)
			frags := split(t, pkt, 1500, 5)
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			r.Process(frags[0], out)
			r.Process(frags[0], out)
			var got []byte
			for _, f := range frags[1:] {
				got, _ = r.Process(f, out)
			}
			if !bytes.Equal(got, pkt) {
				t.Fatal("a repeated fragment stopped reassembly")
			}
		})
		t.Run(name+"/oversized", func(t *testing.T) {
			frags := split(t, udpPacket(src, dst, 4000, 5), 1500, 5)
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			r.Process(frags[0], out)
			last := bytes.Clone(frags[len(frags)-1])
			setOffset(last, 65528, false)
			if _, res := r.Process(last, out); res != Dropped {
				t.Fatalf("fragment ending past 65,535: %v, want Dropped", res)
			}
			if s := r.Stats(); s.Packets != 0 {
				t.Errorf("the packet of an oversized fragment is still held")
			}
		})
		t.Run(name+"/longer-head", func(t *testing.T) {
			// The first fragment's headers are longer than the last
			// one's, and the packet they make exceeds 65,535 bytes.
			pkt := udpPacket(src, dst, 0xffff, 5) // the most an IPv6 payload length says
			if !v6 {
				pkt = udpPacket(src, dst, 0xffff-ipv4HeaderLen, 5)
			}
			frags := split(t, pkt, 1500, 5)
			first := withOptions(frags[0])
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			var res Result
			for _, f := range append([][]byte{first}, frags[1:]...) {
				_, res = r.Process(f, out)
			}
			if res != Dropped {
				t.Fatalf("a packet longer than 65,535 bytes: %v, want Dropped", res)
			}
		})
		t.Run(name+"/odd-length", func(t *testing.T) {
			frags := split(t, udpPacket(src, dst, 4000, 5), 1500, 5)
			f := frags[0][:len(frags[0])-1] // not a multiple of 8 and more to come
			if f[0]>>4 == 4 {
				binary.BigEndian.PutUint16(f[2:], uint16(len(f)))
				setIPv4Checksum(f[:ipv4HeaderLen])
			} else {
				binary.BigEndian.PutUint16(f[4:], uint16(len(f)-ipv6HeaderLen))
			}
			if _, res := New(Config{}).Process(f, make([]byte, MaxPacket)); res != Dropped {
				t.Fatalf("%v, want Dropped", res)
			}
		})
		t.Run(name+"/two-ends", func(t *testing.T) {
			frags := split(t, udpPacket(src, dst, 4000, 5), 1500, 5)
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			r.Process(frags[len(frags)-1], out)
			early := bytes.Clone(frags[1])
			setOffset(early, fragOffset(frags[1]), false)
			if _, res := r.Process(early, out); res != Dropped {
				t.Fatalf("a second, different last fragment: %v, want Dropped", res)
			}
		})
	}
}

// fragOffset reads a fragment's offset in bytes.
func fragOffset(f []byte) int {
	if f[0]>>4 == 4 {
		return int(binary.BigEndian.Uint16(f[6:])&0x1fff) * 8
	}
	return int(binary.BigEndian.Uint16(f[ipv6HeaderLen+2:]) &^ 7)
}

func TestTimeout(t *testing.T) {
	now := time.Unix(1000, 0)
	r := New(Config{Timeout: 30 * time.Second, Now: func() time.Time { return now }})
	defer r.Close()
	out := make([]byte, MaxPacket)
	frags := split(t, udpPacket(src4, dst4, 4000, 5), 1500, 0)
	r.Process(frags[0], out)
	now = now.Add(31 * time.Second)
	for _, f := range frags[1:] {
		if _, res := r.Process(f, out); res == Reassembled {
			t.Fatal("a packet was completed after its first fragment timed out")
		}
	}
	if s := r.Stats(); s.TimedOut != 1 {
		t.Errorf("TimedOut = %d, want 1", s.TimedOut)
	}
}

func TestBounds(t *testing.T) {
	const total, perSource = 256 << 10, 64 << 10
	r := New(Config{MaxBytes: total, MaxBytesPerSource: perSource})
	defer r.Close()
	out := make([]byte, MaxPacket)
	// A flood of first fragments from one source stays within its share,
	// and the source's newest packet completes.
	var frags [][]byte
	for id := range 1000 {
		frags = split(t, udpPacket(src4, dst4, 3000, uint16(id)), 1500, 0)
		r.Process(frags[0], out)
		if s := r.Stats(); s.Bytes > perSource {
			t.Fatalf("one source holds %d bytes, above its bound of %d", s.Bytes, perSource)
		}
	}
	for _, f := range frags[1:] {
		if got, res := r.Process(f, out); res == Reassembled && len(got) != ipv4HeaderLen+3000 {
			t.Fatalf("reassembled %d bytes", len(got))
		}
	}
	if s := r.Stats(); s.Reassembled != 1 {
		t.Errorf("the newest packet of a flooding source was not reassembled: %+v", s)
	}
	// Many sources stay within the total.
	for i := range 4000 {
		src := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
		f := split(t, udpPacket(src, dst4, 3000, 1), 1500, 0)[0]
		r.Process(f, out)
		if s := r.Stats(); s.Bytes > total {
			t.Fatalf("the reassembler holds %d bytes, above its bound of %d", s.Bytes, total)
		}
	}
	if s := r.Stats(); s.Evicted == 0 {
		t.Errorf("nothing evicted: %+v", s)
	}
}

func TestFragmentRefuses(t *testing.T) {
	df := udpPacket(src4, dst4, 3000, 1)
	binary.BigEndian.PutUint16(df[6:], 0x4000)
	for name, tc := range map[string]struct {
		pkt []byte
		mtu int
	}{
		"ipv4-df":       {df, 1500},
		"ipv4-tiny-mtu": {udpPacket(src4, dst4, 3000, 1), 27},
		"ipv6-tiny-mtu": {udpPacket(src6, dst6, 3000, 1), 1000},
		"not-ip":        {make([]byte, 3000), 1500},
	} {
		if _, _, ok := AppendFragments(nil, nil, tc.pkt, tc.mtu, 0); ok {
			t.Errorf("%s: cut, want refused", name)
		}
	}
}

func BenchmarkReassemble(b *testing.B) {
	for _, tc := range []struct {
		name     string
		src, dst netip.Addr
	}{{"ipv4", src4, dst4}, {"ipv6", src6, dst6}} {
		b.Run(tc.name, func(b *testing.B) {
			pkt := udpPacket(tc.src, tc.dst, 65000, 1)
			frags := split(b, pkt, 1500, 1)
			r := New(Config{})
			defer r.Close()
			out := make([]byte, MaxPacket)
			b.ReportAllocs()
			b.SetBytes(int64(len(pkt)))
			for b.Loop() {
				for _, f := range frags {
					r.Process(f, out)
				}
			}
		})
	}
}

// TestTimerExpires checks that what a flood leaves is given back when no
// fragment follows to expire it.
func TestTimerExpires(t *testing.T) {
	r := New(Config{Timeout: 50 * time.Millisecond})
	defer r.Close()
	out := make([]byte, MaxPacket)
	for id := range 10 {
		r.Process(split(t, udpPacket(src4, dst4, 3000, uint16(id)), 1500, 0)[0], out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for r.Stats().Packets != 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d packets held long after their timeout", r.Stats().Packets)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if s := r.Stats(); s.TimedOut != 10 || s.Bytes != 0 {
		t.Errorf("after the timeout: %+v, want 10 timed out and nothing held", s)
	}
}

// withOptions returns a copy of the fragment f with 8 more bytes of headers
// in its unfragmentable part: IPv4 options (NOPs, then End), or an IPv6
// Destination Options header (a PadN) before the Fragment header.
func withOptions(f []byte) []byte {
	if f[0]>>4 == 6 {
		b := append([]byte(nil), f[:ipv6HeaderLen]...)
		b = append(b, f[6], 0, 1, 4, 0, 0, 0, 0)
		b = append(b, f[ipv6HeaderLen:]...)
		b[6] = protoDestOptions
		binary.BigEndian.PutUint16(b[4:], uint16(len(b)-ipv6HeaderLen))
		return b
	}
	hl := int(f[0]&0xf) * 4
	b := append([]byte(nil), f[:hl]...)
	b = append(b, 1, 1, 1, 1, 1, 1, 1, 0)
	b = append(b, f[hl:]...)
	b[0] = 0x40 | byte((hl+8)/4)
	binary.BigEndian.PutUint16(b[2:], uint16(len(b)))
	setIPv4Checksum(b[:hl+8])
	return b
}
