//go:build !race

package main_test

// raceEnabled: this test binary has no race detector, nor will netstackd.
const raceEnabled = false
