package udpnat

// assocList is a doubly linked list threaded through the associations.
type assocList struct {
	front, tail *udpAssoc
}

func (l *assocList) pushFront(a *udpAssoc) {
	a.listed = a.last.Load()
	a.prev, a.next = nil, l.front
	if l.front != nil {
		l.front.prev = a
	} else {
		l.tail = a
	}
	l.front = a
}

func (l *assocList) remove(a *udpAssoc) {
	if a.prev != nil {
		a.prev.next = a.next
	} else if l.front == a {
		l.front = a.next
	}
	if a.next != nil {
		a.next.prev = a.prev
	} else if l.tail == a {
		l.tail = a.prev
	}
	a.prev, a.next = nil, nil
}

func (l *assocList) moveToFront(a *udpAssoc) {
	if l.front == a {
		a.listed = a.last.Load()
		return
	}
	l.remove(a)
	l.pushFront(a)
}

func (l *assocList) back() *udpAssoc { return l.tail }
