package tunnel

import (
	"context"
	"fmt"
	"time"
)

// Router finds a tunnel for a request to an agent: the least loaded live
// tunnel, waiting for one to appear if the agent has none. Selection and
// waiting live here and nowhere else, whatever the tunnels are.
//
// Tunnels connected to this node, in Local, come first. When the agent has
// none here and Remote is set, the router also looks for one on the other
// nodes (a forwarder to the node that holds one), while it keeps waiting
// for a local one: whichever comes first is used, as tailscale's derp puts
// local and remote peers behind one forwarder.
type Router struct {
	// Local holds the tunnels connected to this node.
	Local *Store
	// Remote, if set, finds a tunnel of the agent on another node,
	// waiting until there is one or ctx is done. The tunnel it returns
	// carries one request.
	Remote func(ctx context.Context, agentID int64) (Tunnel, error)
}

// NewRouter returns a router over the tunnels of local.
func NewRouter(local *Store) *Router { return &Router{Local: local} }

// maxTunnelsOnStack is how many tunnels of one agent Find looks at without
// allocating; agents with more still work.
const maxTunnelsOnStack = 8

// Find returns a live tunnel of the agent, the least loaded one if there
// are several. If there is none, Find waits for one until ctx is done and
// then returns an error wrapping [ErrNoConnection] and ctx's cause. After
// the store was closed it returns an error wrapping [ErrStoreClosed].
func (r *Router) Find(ctx context.Context, agentID int64) (Tunnel, error) {
	return r.FindExpected(ctx, agentID, 0)
}

// Connected returns the least loaded live tunnel of the agent on this
// node, or nil if it has none here; it never waits. A request uses it
// before [Router.FindExpected], so that the common case, an agent
// connected here, needs no deadline (a context and a timer per request).
func (r *Router) Connected(agentID int64) Tunnel {
	var buf [maxTunnelsOnStack]Tunnel
	return leastLoaded(r.Local.Tunnels(agentID, buf[:0]))
}

// FindExpected is [Router.Find] for a request that waits only for an agent
// that is expected back: one whose last tunnel here was removed less than
// window ago, or, for an agent not connected since the store was made,
// whose store was made less than window ago (after a restart, agents
// reconnect within their backoff). For any other agent it returns at once,
// and a wait ends when the window does; the error then wraps
// [ErrNoConnection] and an [*AbsentError]. A window of zero or less waits
// for every agent, as Find does; so does a router with Remote, since this
// node's memory says nothing of the agent's tunnels on other nodes.
func (r *Router) FindExpected(ctx context.Context, agentID int64, window time.Duration) (Tunnel, error) {
	if t := r.Connected(agentID); t != nil {
		return t, nil
	}
	if window > 0 && r.Remote == nil {
		since, seen := r.Local.LastConnected(agentID)
		absent := &AbsentError{AgentID: agentID, Since: since, Seen: seen}
		expectedUntil := since.Add(window)
		if !time.Now().Before(expectedUntil) {
			return nil, fmt.Errorf("agent %d: %w: %w", agentID, ErrNoConnection, absent)
		}
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadlineCause(ctx, expectedUntil, absent)
		defer cancel()
	}
	if r.Remote == nil {
		t, _, _, err := r.waitLocal(ctx, agentID, nil)
		return t, err
	}
	// Look on the other nodes while waiting for a local tunnel.
	ctx, cancel := context.WithCancel(ctx)
	remote := make(chan Tunnel, 1)
	go func() { // ends with ctx at the latest; Find waits for it
		t, _ := r.Remote(ctx, agentID)
		remote <- t // nil: none found before ctx ended
	}()
	t, fromRemote, remoteDone, err := r.waitLocal(ctx, agentID, remote)
	cancel()
	if !remoteDone {
		if rt := <-remote; rt != nil && !fromRemote {
			rt.Close() // found just as the local one was
		}
	}
	return t, err
}

// waitLocal waits for a local tunnel of the agent, or for one from remote
// (if not nil), until ctx is done. fromRemote reports that t came from
// remote, remoteDone that remote was read.
func (r *Router) waitLocal(ctx context.Context, agentID int64, remote <-chan Tunnel) (t Tunnel, fromRemote, remoteDone bool, err error) {
	var buf [maxTunnelsOnStack]Tunnel
	for {
		if err := r.Local.Err(); err != nil {
			return nil, false, remoteDone, fmt.Errorf("agent %d: %w", agentID, err)
		}
		added, stop := r.Local.Watch(agentID)
		// Look again now that a new tunnel cannot go unnoticed.
		if t := leastLoaded(r.Local.Tunnels(agentID, buf[:0])); t != nil {
			stop()
			return t, false, remoteDone, nil
		}
		select {
		case <-added:
			stop()
		case rt := <-remote:
			stop()
			remoteDone, remote = true, nil
			if rt != nil {
				return rt, true, true, nil
			}
			// None found elsewhere: keep waiting for a local one.
		case <-ctx.Done():
			stop()
			return nil, false, remoteDone, fmt.Errorf("agent %d: %w: %w", agentID, ErrNoConnection, context.Cause(ctx))
		}
	}
}

// leastLoaded returns the live tunnel with the fewest requests, or nil. A
// tunnel whose agent was asked to move ([Movable]) is taken only when the
// agent has no other: until its new tunnel is up, the old one still
// answers, so no request waits or fails because of the move.
func leastLoaded(tunnels []Tunnel) Tunnel {
	var best Tunnel
	var bestLoad int64
	bestMoving := false
	for _, t := range tunnels {
		if t.Err() != nil {
			continue // done since it was listed; its owner removes it shortly
		}
		moving := isMoving(t)
		load := t.Load()
		switch {
		case best == nil, bestMoving && !moving, bestMoving == moving && load < bestLoad:
			best, bestLoad, bestMoving = t, load, moving
		}
	}
	return best
}
