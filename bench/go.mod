module github.com/netstackd/netstackd/bench

go 1.26.8

require (
	github.com/vishvananda/netlink v1.3.1
	golang.org/x/exp v0.0.0-20261113113407-e3970619a1a4
	golang.org/x/sys v0.50.0
)

require github.com/vishvananda/netns v0.0.5 // indirect
