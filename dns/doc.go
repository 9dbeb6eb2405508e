// Package dns owns names. The stack hands it every DNS query it intercepts
// (UDP and TCP to port 53, whatever the destination address), and a Server
// answers each one in one of three modes, so that hostnames rather than
// addresses resolved on this host reach the proxy, and no query leaks past it.
//
//   - ModeOff: Answer returns nil and the caller relays DNS like any other
//     traffic. netstackd makes no promise about names.
//   - ModeFakeIP: A and AAAA queries get an address from a fake-IP pool
//     (198.19.0.0/16 and fd00:1919::/96 by default), one per name, with a
//     short TTL. An address goes to another name only once no flow holds
//     it and no client can still have it cached under the old one (the TTL
//     plus a minute since its last use); a name that finds no such address
//     gets SERVFAIL. A flow to a fake address is dialed as "name:port", so the
//     proxy resolves the name itself. Names under Config.DirectSuffixes and
//     "localhost" get real addresses from Config.DirectResolver. Other query
//     types are forwarded to Config.Upstream over TCP through Config.Dialer,
//     except HTTPS and SVCB, which get an empty answer (see answerFake). No
//     DNS packet leaves the host in this mode except the queries forwarded
//     through the dialer on purpose and the direct-suffix lookups.
//   - ModeRemote: every query is forwarded to Config.Upstream over TCP
//     (RFC 7766) through Config.Dialer, and the answers are cached. Programs
//     get real addresses, but the only DNS traffic is the TCP connections the
//     dialer makes.
//
// The package is shaped around the seams it consumes: it declares the small
// Dialer and Resolver interfaces it needs and knows nothing of the stack,
// gVisor or the proxy. Queries arrive as bytes and replies leave as bytes;
// the miekg/dns types used to parse and build them stay inside the package.
//
// In fake-ip mode the flow dialer must consult the Server: IsFake says a
// destination belongs to the pool, Hold pins its mapping for the life of the
// flow and Resolve turns it back into the name to dial.
package dns
