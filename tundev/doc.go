// Package tundev owns the TUN device that netstackd serves: it opens or
// attaches the device, configures it (MTU, addresses, link state, routes),
// does so inside another network namespace when asked, and moves whole IP
// packets in and out of it.
//
// It knows nothing of gVisor, proxies or DNS. The packet methods have the
// shape of wireguard-go's tun.Device (Read and Write take batches of
// buffers with per-packet sizes and a head-room offset, and BatchSize says
// how many a call may carry), so that a device opened with IFF_VNET_HDR,
// whose single read returns many GSO segments, can replace this one later
// without changing its callers. Today every read returns one packet.
//
// Configuration goes through rtnetlink on a socket opened inside the target
// namespace, so the calling threads never leave their own namespace; only
// the TUN itself must be opened by a thread inside the namespace, because
// /dev/net/tun registers the interface in the namespace of whoever opened
// it (drivers/net/tun.c, tun_chr_open). That thread is created, locked and
// discarded by this package.
//
// With Config.Queues above one, the interface is a multi-queue TUN
// (IFF_MULTI_QUEUE) opened once per queue. The kernel hands each flow's
// packets to one queue, and ReadQueue lets a caller read every queue with a
// goroutine of its own; WriteQueue writes to a chosen queue, which also
// tells the kernel where to send that flow's packets from then on.
//
// A Device undoes what it did: Close deletes an interface it created, and
// on a persistent interface it only attached to (one made with `ip tuntap
// add`) it removes the routes and addresses it added and restores the MTU
// and link state it found.
package tundev
