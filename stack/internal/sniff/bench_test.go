package sniff

import (
	"crypto/tls"
	"testing"
)

func BenchmarkTLS(b *testing.B) {
	pq := goTLSHello(b, &tls.Config{ServerName: "bench.x.test"}, 4096, TLS).all()
	classic := goTLSHello(b, &tls.Config{ServerName: "bench.x.test", CurvePreferences: []tls.CurveID{tls.X25519}}, 4096, TLS).all()
	for _, bc := range []struct {
		name string
		in   []byte
	}{
		{"x25519", classic},
		{"x25519mlkem768", pq},
		{"x25519mlkem768-4-records", splitRecords(pq, (len(pq)+3)/4)},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			b.SetBytes(int64(len(bc.in)))
			for b.Loop() {
				if name, err := TLS(bc.in); err != nil || name != "bench.x.test" {
					b.Fatalf("TLS = %q, %v", name, err)
				}
			}
		})
	}
}

func BenchmarkHTTP(b *testing.B) {
	req := []byte("GET /index.html HTTP/1.1\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\nHost: bench.x.test:8080\r\n\r\n")
	b.ReportAllocs()
	b.SetBytes(int64(len(req)))
	for b.Loop() {
		if name, err := HTTP(req); err != nil || name != "bench.x.test" {
			b.Fatalf("HTTP = %q, %v", name, err)
		}
	}
}

// BenchmarkQUIC measures a flow's whole cost: a new QUIC, its keys derived
// from the Destination Connection ID, every datagram opened.
func BenchmarkQUIC(b *testing.B) {
	flight, _, err := quicFirstFlight(b, "bench.x.test")
	if err != nil {
		b.Fatal(err)
	}
	for _, bc := range []struct {
		name  string
		grams [][]byte
		want  string
	}{
		{"rfc9001-one-datagram", [][]byte{rfcPacket(b, "rfc9001-a2-client-initial.hex")}, "example.com"},
		{"rfc9369-one-datagram", [][]byte{rfcPacket(b, "rfc9369-a2-client-initial.hex")}, "example.com"},
		{"x-net-quic-two-datagrams", flight, "bench.x.test"},
	} {
		b.Run(bc.name, func(b *testing.B) {
			b.ReportAllocs()
			n := 0
			for _, g := range bc.grams {
				n += len(g)
			}
			b.SetBytes(int64(n))
			for b.Loop() {
				var q QUIC
				var name string
				var err error
				for _, g := range bc.grams {
					name, err = q.Feed(g)
				}
				if err != nil || name != bc.want {
					b.Fatalf("Feed = %q, %v", name, err)
				}
			}
		})
	}
}

// TestTLSAllocs checks that a hello in one record is read in place: the
// name's string is the only allocation.
func TestTLSAllocs(t *testing.T) {
	hello := goTLSHello(t, &tls.Config{ServerName: "allocs.x.test"}, 4096, TLS).all()
	if n := testing.AllocsPerRun(100, func() { _, _ = TLS(hello) }); n > 1 {
		t.Fatalf("TLS made %v allocations; want 1, the name", n)
	}
	req := []byte("GET / HTTP/1.1\r\nHost: allocs.x.test\r\n\r\n")
	if n := testing.AllocsPerRun(100, func() { _, _ = HTTP(req) }); n > 1 {
		t.Fatalf("HTTP made %v allocations; want 1, the name", n)
	}
}
