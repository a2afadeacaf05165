package grpctunnel

import "time"

// SetH2ConnLinger shortens how long an agent connection without calls is
// kept, for tests; it returns a function that restores it.
func SetH2ConnLinger(d time.Duration) (restore func()) {
	old := h2ConnLinger
	h2ConnLinger = d
	return func() { h2ConnLinger = old }
}
