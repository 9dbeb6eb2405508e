//go:build race

package main_test

// raceEnabled: this test binary has the race detector, so netstackd is
// built with it too.
const raceEnabled = true
