// Package tundev owns the TUN device that netstackd serves: it opens or
// attaches the device, negotiates its offloads, configures it (MTU,
// addresses, link state, routes), does so inside another network namespace
// when asked, and moves IP packets in and out of it.
//
// It knows nothing of gVisor, proxies or DNS. *Device implements
// device.Device (internal/device), the interface the stack consumes:
// batched Read and Write of packets with their offload metadata, MTU,
// Events and Close. The kernel's framing stops here. With offloads (the
// default), every read and write carries a struct virtio_net_hdr, which
// this package decodes into device.Meta on read (completing partial
// checksums, keeping TCP segments of up to 64 KiB whole, splitting runs of
// UDP datagrams sent with UDP_SEGMENT) and encodes from it on write. One
// read returns every packet already queued, up to BatchSize.
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
// packets to one queue, each read by a goroutine of the caller's; Write
// sends each packet to the queue of its flow, which also tells the kernel
// where to send that flow's packets from then on. More queues help only
// where there are CPUs to run their readers and many flows to spread.
//
// When the interface is deleted under an open device (ip link del), reads
// fail and Events reports EventDown, so the owner can stop instead of
// serving nothing. (The device's own descriptors keep its namespace alive:
// a namespace whose processes have all gone does not take the interface
// with it while the device is open.)
//
// A Device undoes what it did: Close deletes an interface it created, and
// on a persistent interface it only attached to (one made with `ip tuntap
// add`) it removes the routes and addresses it added and restores the MTU
// and link state it found.
package tundev
