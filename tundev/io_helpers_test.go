package tundev_test

import (
	"github.com/netstackd/netstackd/internal/device"
	"github.com/netstackd/netstackd/tundev"
)

// readPackets reads a batch from queue q of dev into bufs, each packet at
// device.ReadOffset, and returns how many it read: the shape the tests want
// from Device.Read.
func readPackets(dev *tundev.Device, q int, bufs [][]byte, sizes []int) (int, error) {
	metas := make([]device.Meta, len(bufs))
	return dev.Read(q, bufs, sizes, metas, device.ReadOffset)
}

// packetAt is packet i of a readPackets batch.
func packetAt(bufs [][]byte, sizes []int, i int) []byte {
	return bufs[i][device.ReadOffset : device.ReadOffset+sizes[i]]
}

// writePackets writes whole packets, each in one piece with no metadata.
func writePackets(dev *tundev.Device, pkts ...[]byte) (int, error) {
	vecs := make([][][]byte, len(pkts))
	for i, p := range pkts {
		vecs[i] = [][]byte{p}
	}
	return dev.Write(vecs, make([]device.Meta, len(pkts)))
}
