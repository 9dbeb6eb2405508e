package main

// Why netstackd runs Go code on half the CPUs by default: most of its CPU
// time is spent inside system calls, doing the kernel's network work (a CPU
// profile of one TCP stream: 60 %; of UDP at 1 Gb/s: 83 %), and that time
// needs no Go processor (P). What needs one is gVisor, the relay and their
// hand-offs from goroutine to goroutine, and on a machine it shares with the
// programs it serves every extra P makes those hand-offs wake threads on
// other CPUs, away from the client and server that need them. Measured side
// by side on 2 cores (bench.sh with a GOMAXPROCS=1 column): see the README's
// "CPUs for Go code".

// chooseProcs returns how many CPUs may run Go code at once: flag when it is
// set (above 0); otherwise what the GOMAXPROCS environment variable chose,
// when it is set; otherwise half of avail (runtime.GOMAXPROCS(0), which
// follows the CPUs and the cgroup CPU limit netstackd is given), at least 1.
func chooseProcs(flag, avail int, envSet bool) int {
	switch {
	case flag > 0:
		return flag
	case envSet:
		return avail
	}
	return max(1, avail/2)
}
