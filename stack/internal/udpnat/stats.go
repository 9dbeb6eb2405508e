package udpnat

// Stats are the table's counters since it was made.
type Stats struct {
	Associations      uint64 // associations created
	Sent, SendCalls   uint64 // datagrams sent upstream in batches, and the sendmmsg calls
	DroppedSend       uint64 // datagrams a full or failing socket did not take
	Received          uint64 // datagrams received in batches
	RecvCalls         uint64 // recvmmsg calls that returned datagrams or an error
	DroppedBig        uint64 // replies too large for the client's IP family
	DroppedOpening    uint64 // datagrams dropped while an association opened
	RefusedFull       uint64 // datagrams from new sources dropped: table full
	RxBatchesBorrowed int64  // receive batches held right now
}

// Stats reads the counters.
func (t *Table) Stats() Stats {
	return Stats{
		Associations: t.opened.Load(),
		Sent:         t.sent.Load(), SendCalls: t.sendCalls.Load(), DroppedSend: t.droppedSend.Load(),
		Received: t.received.Load(), RecvCalls: t.recvCalls.Load(),
		DroppedBig: t.droppedBig.Load(), DroppedOpening: t.droppedQueue.Load(), RefusedFull: t.refusedFull.Load(),
		RxBatchesBorrowed: t.rxHeld.Load(),
	}
}
