package agentk

import (
	"math/rand/v2"
	"time"
)

// GitLab agentk's reconnect backoff for its tunnels to KAS (gitlab-agent
// cmd/agentk/agentkapp: initial 1 s, maximum 20 s, factor 1.6, jitter 0.2,
// reset after 25 s). Keeping the same values means a fleet of caddy-kas
// agents loads a restarting KAS the way GitLab's agents would.
const (
	DefaultBackoffInitial    = 1 * time.Second
	DefaultBackoffMax        = 20 * time.Second
	DefaultBackoffFactor     = 1.6
	DefaultBackoffJitter     = 0.2
	DefaultBackoffResetAfter = 25 * time.Second
)

// Backoff computes the delays between connection attempts: exponential
// growth with random jitter, starting over once a connection stayed up long
// enough. The base delay grows by Factor up to Max, as in k8s.io/apimachinery's
// wait.NewExponentialBackoffManager, which GitLab's agentk uses. Unlike it,
// the jitter never takes a delay above Max: apimachinery adds up to
// Jitter × Max on top of the cap (GitLab's agentk waits up to 24 s), while
// the documented range of this agentk is 1 s to 20 s. A delay is drawn from
// [upper / (1 + Jitter), upper], with upper = min(base × (1 + Jitter), Max)
// and never below Initial: that is [base, base × (1 + Jitter)] below the
// cap, and at the cap it still spreads a fleet of agents over the top sixth
// (with GitLab's jitter of 0.2), so that they do not reconnect in lockstep.
//
// The zero value of a field means its GitLab default. A Backoff is not safe
// for concurrent use; each tunnel has its own.
type Backoff struct {
	// Initial is the first delay, and the delay after a reset.
	Initial time.Duration
	// Max caps every delay, jitter included.
	Max time.Duration
	// Factor multiplies the base delay after each attempt.
	Factor float64
	// Jitter widens a delay by up to Jitter × the base delay, at random,
	// within Max. Negative means no jitter.
	Jitter float64
	// ResetAfter is how long a connection must have stayed up for the
	// next delay to start over at Initial.
	ResetAfter time.Duration
	// Rand returns a number in [0, 1). Nil means math/rand/v2's Float64.
	// If one function is shared by several Backoffs it must be safe for
	// concurrent use.
	Rand func() float64

	// base is the next delay before jitter; zero before the first call.
	base time.Duration
}

// DefaultBackoff returns GitLab agentk's reconnect backoff.
func DefaultBackoff() Backoff {
	return Backoff{
		Initial:    DefaultBackoffInitial,
		Max:        DefaultBackoffMax,
		Factor:     DefaultBackoffFactor,
		Jitter:     DefaultBackoffJitter,
		ResetAfter: DefaultBackoffResetAfter,
	}
}

// withDefaults fills the zero fields with GitLab's values.
func (b Backoff) withDefaults() Backoff {
	d := DefaultBackoff()
	if b.Initial <= 0 {
		b.Initial = d.Initial
	}
	if b.Max <= 0 {
		b.Max = d.Max
	}
	if b.Max < b.Initial {
		b.Max = b.Initial
	}
	if b.Factor < 1 {
		b.Factor = d.Factor
	}
	switch {
	case b.Jitter == 0:
		b.Jitter = d.Jitter
	case b.Jitter < 0:
		b.Jitter = 0
	}
	if b.ResetAfter <= 0 {
		b.ResetAfter = d.ResetAfter
	}
	if b.Rand == nil {
		b.Rand = rand.Float64
	}
	return b
}

// Next returns how long to wait before the next attempt. uptime is how long
// the last connection stayed up, zero if the attempt failed; a connection
// that lasted ResetAfter or longer was healthy, so the delays start over.
func (b *Backoff) Next(uptime time.Duration) time.Duration {
	cfg := b.withDefaults()
	if b.base == 0 || uptime >= cfg.ResetAfter {
		b.base = cfg.Initial
	}
	base := b.base
	next := time.Duration(float64(b.base) * cfg.Factor)
	if next > cfg.Max || next <= 0 { // <= 0: overflow
		next = cfg.Max
	}
	b.base = next
	if cfg.Jitter <= 0 {
		return base
	}
	upper := time.Duration(float64(base) * (1 + cfg.Jitter))
	if upper > cfg.Max || upper <= 0 { // <= 0: overflow
		upper = cfg.Max
	}
	lower := max(min(base, time.Duration(float64(upper)/(1+cfg.Jitter))), cfg.Initial)
	return lower + time.Duration(cfg.Rand()*float64(upper-lower))
}
