package stack

// flush sends what the datagrams of one device read queued. Datagrams are
// sent as they arrive for now.
func (t *udpTable) flush() {}
