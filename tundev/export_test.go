package tundev

// Accessors for the external tests: what the device negotiated, in the
// terms the tests check it in.

func (d *Device) VnetHdrLen() int { return d.hdrLen() }
func (d *Device) TSO() bool       { return d.Capabilities().TSO }
func (d *Device) USO() bool       { return d.Capabilities().USO }
func (d *Device) NumQueues() int  { return d.Queues() }

// FlowQueue is the queue Write picks for pkt on a device of n queues.
func FlowQueue(pkt []byte, n int) int { return flowQueueOf(pkt, n) }
