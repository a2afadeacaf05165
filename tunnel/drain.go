package tunnel

import (
	"context"
	"math/rand/v2"
	"time"
)

// Movable is a [Tunnel] whose agent can be asked to move: to open a new
// tunnel, to whichever node its address leads to now, while this one
// still carries the requests it has. It is how a node that stops, or a
// tunnel that reached its maximum age, hands its agents over without
// failing a request.
type Movable interface {
	Tunnel
	// Move marks the tunnel as moving and asks its agent to open another.
	// From then on [Router] picks it only while its agent has no other
	// tunnel here, and requests in flight go on. Move returns once the
	// agent was told, or ctx is done; an error means it could not be told
	// (the tunnel is marked all the same).
	Move(ctx context.Context) error
	// Moving reports whether Move was called.
	Moving() bool
}

// Defaults of [DrainOptions] and of the settings that use them.
const (
	// DefaultShutdownGrace is how long a stopping node lets requests in
	// flight, watches included, go on after it told their agents to move:
	// GitLab's KAS shutdown_grace_period, 1 h (kas-spec §1.2).
	DefaultShutdownGrace = time.Hour
	// DefaultMaxConnectionAge is how long a tunnel may live before its
	// agent is asked to reconnect, so that agents rebalance across nodes
	// after a scale-out and authenticate again: GitLab's KAS
	// max_connection_age, 2 h (kas-spec §1.1).
	DefaultMaxConnectionAge = 2 * time.Hour
	// maxAgeGraceFraction is the part of the maximum age a tunnel keeps
	// for the requests it carries once its agent was asked to move, as
	// GitLab's KAS splits max_connection_age into gRPC's MaxConnectionAge
	// and a grace of 65 % (kas-spec §1.1). Of 2 h that leaves 78 min,
	// more than the 60 min a kube-apiserver lets a watch run at most
	// (--min-request-timeout 1800 s, doubled at random), so watches
	// usually end on their own before the tunnel closes.
	maxAgeGraceFraction = 0.65
	// maxAgeJitterFraction is the most by which a tunnel's move comes
	// early, at random, so that agents that connected together (after a
	// node restart) do not all move at once.
	maxAgeJitterFraction = 0.05
	// settleTime is how long a moving tunnel stays open at least: a
	// request that the router picked just before the tunnel was marked
	// has registered on it by then, so an idle tunnel really is idle.
	settleTime = time.Second
	// pollInterval is how often a draining tunnel looks whether it is
	// idle yet.
	pollInterval = 100 * time.Millisecond
)

// MaxAgeSchedule splits a maximum connection age into when a tunnel's
// agent is asked to move (after move) and how long the tunnel then lets
// its requests go on (grace); move + grace never exceeds maxAge. A
// non-positive maxAge gives zero for both: no maximum age.
func MaxAgeSchedule(maxAge time.Duration) (move, grace time.Duration) {
	if maxAge <= 0 {
		return 0, 0
	}
	grace = time.Duration(float64(maxAge) * maxAgeGraceFraction)
	move = maxAge - grace
	move -= time.Duration(rand.Float64() * maxAgeJitterFraction * float64(maxAge))
	return max(move, time.Nanosecond), grace
}

// DrainOptions tune [Drain].
type DrainOptions struct {
	// Grace is how long the tunnel carries the requests it has after its
	// agent was asked to move; then it is closed, and requests still on it
	// fail (their clients see an error, never a cut response that looks
	// complete).
	Grace time.Duration
	// Replaced, if set, reports whether the agent has opened its new
	// tunnel: an idle tunnel is closed only once it has, so that requests
	// for the agent never find it without a tunnel here. Nil means not to
	// wait for one (the node is stopping, and the new tunnel goes to
	// another node).
	Replaced func() bool
}

// Drain asks the agent of t to move and closes t once it carries no
// request (and, with opts.Replaced, the agent's new tunnel is up), or once
// opts.Grace has passed, whichever comes first, or at once when ctx is
// done. A tunnel that cannot move is closed once idle or at the end of the
// grace as well. Drain returns when t is done.
func Drain(ctx context.Context, t Tunnel, opts DrainOptions) {
	defer t.Close()
	grace := time.NewTimer(opts.Grace)
	defer grace.Stop()
	if m, ok := t.(Movable); ok {
		mctx, cancel := context.WithTimeout(ctx, opts.Grace)
		_ = m.Move(mctx) // told or not, the tunnel closes once idle
		cancel()
	}
	settle := time.NewTimer(settleTime)
	defer settle.Stop()
	poll := time.NewTicker(pollInterval)
	defer poll.Stop()
	settled := false
	for {
		if settled && t.Load() == 0 && (opts.Replaced == nil || opts.Replaced()) {
			return
		}
		select {
		case <-settle.C:
			settled = true
		case <-poll.C:
		case <-grace.C:
			return
		case <-t.Done():
			return
		case <-ctx.Done():
			return
		}
	}
}

// isMoving reports whether t was asked to move.
func isMoving(t Tunnel) bool {
	m, ok := t.(Movable)
	return ok && m.Moving()
}
