package frag

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
	"time"
)

// pattern is the byte at position k of every fuzzed packet's payload, so a
// reassembled packet shows whether each fragment landed in its place.
func pattern(k int) byte { return byte(k*7 + k>>8 + 1) }

// fuzzFragment builds a fragment from 7 bytes of fuzz input: family, MF
// flag and longer headers, offset, length, identification, source.
func fuzzFragment(c []byte) []byte {
	v6, more := c[0]&1 != 0, c[0]&2 != 0
	off := int(binary.BigEndian.Uint16(c[1:])&0x1fff) * 8
	n := int(binary.BigEndian.Uint16(c[3:])) % 3000
	id, srcByte := c[5]%4, c[6]%4
	var pkt []byte
	if v6 {
		src := netip.AddrFrom16([16]byte{0xfd, 15: srcByte})
		p := udpPacket(src, dst6, n, 0)
		pkt = append(append(p[:ipv6HeaderLen:ipv6HeaderLen], 17, 0, 0, 0, 0, 0, 0, id), p[ipv6HeaderLen:]...)
		pkt[6] = protoFragment
		binary.BigEndian.PutUint16(pkt[4:], uint16(len(pkt)-ipv6HeaderLen))
		setOffset(pkt, off, more)
	} else {
		src := netip.AddrFrom4([4]byte{10, 0, 0, srcByte})
		pkt = udpPacket(src, dst4, n, uint16(id))
		setOffset(pkt, off, more)
	}
	hl := len(pkt) - n
	for k := range n {
		pkt[hl+k] = pattern(off + k)
	}
	if c[0]&8 != 0 {
		pkt = withOptions(pkt)
	}
	return pkt
}

// FuzzReassemble feeds sequences of fragments of a few packets from a few
// sources, overlapping, repeated, out of order and too long as the input
// makes them, and checks what must always hold: the memory charged stays
// within the bounds and matches what is held, the fragments held never
// overlap, and a reassembled packet has every byte in its place and is as
// long as its fragments together.
func FuzzReassemble(f *testing.F) {
	f.Add([]byte{2, 0, 0, 0x05, 0xc8, 0, 0, 0, 0, 0xb9, 0, 0x10, 0, 0})
	f.Add([]byte{10, 0, 0, 0x05, 0xc8, 0, 0, 0, 0, 0xb9, 0, 0x10, 0, 0})
	f.Add([]byte{11, 0, 0, 0x05, 0xa8, 1, 1, 1, 0, 0xb5, 0, 0x10, 1, 1})
	f.Add([]byte{3, 0, 0, 0x05, 0xa8, 1, 1, 1, 0, 0xb5, 0, 0x10, 1, 1})
	f.Add([]byte{2, 0, 0, 0x05, 0xc8, 0, 0, 2, 0, 0xb8, 0x05, 0xc8, 0, 0, 0, 0, 0xb9, 0, 0x10, 0, 0})
	f.Fuzz(func(t *testing.T, in []byte) {
		const total, perSource = 64 << 10, 32 << 10
		now := time.Unix(0, 0)
		r := New(Config{MaxBytes: total, MaxBytesPerSource: perSource, Timeout: time.Second, Now: func() time.Time { return now }})
		defer r.Close()
		out := make([]byte, MaxPacket)
		// checkInvariants walks everything held after each fragment: a
		// few hundred fragments keep an input fast, and are enough to
		// reach the bounds.
		in = in[:min(len(in), 7*300)]
		for len(in) >= 7 {
			pkt := fuzzFragment(in[:7])
			if in[0]&4 != 0 {
				now = now.Add(300 * time.Millisecond)
			}
			in = in[7:]
			got, res := r.Process(pkt, out)
			if res == Reassembled {
				hl := int(got[0]&0xf) * 4
				if got[0]>>4 == 6 {
					hl = ipv6HeaderLen
					if got[6] == protoDestOptions {
						hl += 8
					}
					if int(binary.BigEndian.Uint16(got[4:]))+ipv6HeaderLen != len(got) {
						t.Fatalf("reassembled %d bytes, the payload length says %d", len(got), binary.BigEndian.Uint16(got[4:]))
					}
				} else if int(binary.BigEndian.Uint16(got[2:])) != len(got) {
					t.Fatalf("reassembled %d bytes, the total length says %d", len(got), binary.BigEndian.Uint16(got[2:]))
				}
				if len(got) > MaxPacket || len(got) < hl {
					t.Fatalf("reassembled %d bytes", len(got))
				}
				for k, c := range got[hl:] {
					if c != pattern(k) {
						t.Fatalf("byte %d of the reassembled payload is %d, want %d", k, c, pattern(k))
					}
				}
			}
			checkInvariants(t, r, total, perSource)
		}
	})
}

func checkInvariants(t *testing.T, r *Reassembler, total, perSource int) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.bytes > total {
		t.Fatalf("holds %d bytes, above the bound of %d", r.bytes, total)
	}
	sum, n := 0, 0
	for p := r.oldest; p != nil; p = p.next {
		n++
		sum += p.bytes
		have := 0
		for i, g := range p.frags {
			have += len(g.data)
			if i > 0 && p.frags[i-1].off+len(p.frags[i-1].data) > g.off {
				t.Fatalf("fragments at %d and %d overlap", p.frags[i-1].off, g.off)
			}
		}
		if have != p.have {
			t.Fatalf("a packet counts %d bytes and holds %d", p.have, have)
		}
	}
	if sum != r.bytes || n != len(r.packets) {
		t.Fatalf("charged %d bytes for %d packets, the list has %d bytes and %d packets", r.bytes, len(r.packets), sum, n)
	}
	for a, s := range r.sources {
		if s.bytes > perSource {
			t.Fatalf("source %s holds %d bytes, above its bound of %d", a, s.bytes, perSource)
		}
	}
}

// FuzzProcess feeds arbitrary bytes as one packet: nothing panics, and
// what comes out fits MaxPacket.
func FuzzProcess(f *testing.F) {
	f.Add(udpPacket(src4, dst4, 100, 1))
	for _, p := range split(f, udpPacket(src6, dst6, 3000, 1), 1500, 1) {
		f.Add(p)
	}
	for _, p := range split(f, udpPacket(src4, dst4, 3000, 1), 1500, 1) {
		f.Add(p)
	}
	f.Fuzz(func(t *testing.T, pkt []byte) {
		r := New(Config{})
		defer r.Close()
		out := make([]byte, MaxPacket)
		got, res := r.Process(pkt, out)
		if res == Reassembled && len(got) > MaxPacket {
			t.Fatalf("returned %d bytes", len(got))
		}
		if res != Reassembled && got != nil {
			t.Fatalf("%v with a packet", res)
		}
	})
}

// FuzzFragment cuts packets of any size at any MTU and reassembles them:
// every fragment fits the MTU and the packet comes back as it was.
func FuzzFragment(f *testing.F) {
	f.Add(false, uint16(3000), uint16(1500))
	f.Add(true, uint16(65535), uint16(1280))
	f.Add(false, uint16(65515), uint16(68))
	f.Fuzz(func(t *testing.T, v6 bool, size, mtu uint16) {
		src, dst, hl := src4, dst4, ipv4HeaderLen
		if v6 {
			src, dst, hl = src6, dst6, ipv6HeaderLen
		}
		n := int(size)
		if hl == ipv4HeaderLen {
			n = min(n, 0xffff-hl)
		}
		pkt := udpPacket(src, dst, n, 9)
		b, lens, ok := AppendFragments(nil, nil, pkt, int(mtu), 42)
		if !ok {
			if (v6 && mtu >= minMTU6) || (!v6 && mtu >= minMTU4) || len(pkt) <= int(mtu) {
				t.Fatalf("%d bytes at MTU %d refused", len(pkt), mtu)
			}
			return
		}
		if len(lens) == 1 {
			if !bytes.Equal(b, pkt) {
				t.Fatalf("%d bytes at MTU %d: the one fragment differs from the packet", len(pkt), mtu)
			}
			return
		}
		r := New(Config{})
		defer r.Close()
		out := make([]byte, MaxPacket)
		var got []byte
		for i, l := range lens {
			if l > int(mtu) {
				t.Fatalf("fragment of %d bytes at MTU %d", l, mtu)
			}
			var res Result
			got, res = r.Process(b[:l], out)
			if (res == Reassembled) != (i == len(lens)-1) {
				t.Fatalf("fragment %d of %d: %v", i, len(lens), res)
			}
			b = b[l:]
		}
		if !bytes.Equal(got, pkt) {
			t.Fatalf("%d bytes at MTU %d came back as %d different bytes", len(pkt), mtu, len(got))
		}
	})
}
