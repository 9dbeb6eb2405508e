package pcap

import "github.com/netstackd/netstackd/internal/device"

// tap is a device whose reads and writes are recorded on their way
// through. The rest of the device's methods are its own.
type tap struct {
	device.Device
	// w is the concrete type, not an interface, so that the compiler sees
	// that Record keeps no packet: a call through an interface would
	// move each packet's slice header to the heap, an allocation per
	// packet even while recording is off.
	w *Switch
}

// Tap returns d with every packet read from it and written to it recorded
// by w while it is on. Closing the returned device closes d, not w.
func Tap(d device.Device, w *Switch) device.Device {
	return &tap{Device: d, w: w}
}

func (t *tap) Read(q int, bufs [][]byte, sizes []int, metas []device.Meta, offset int) (int, error) {
	n, err := t.Device.Read(q, bufs, sizes, metas, offset)
	for i := range n {
		t.w.Record(In, bufs[i][offset:offset+sizes[i]])
	}
	return n, err
}

func (t *tap) Write(pkts [][][]byte, metas []device.Meta) (int, error) {
	n, err := t.Device.Write(pkts, metas)
	for i := range n {
		t.w.Record(Out, pkts[i]...)
	}
	return n, err
}
