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
// Today every tunnel is one of this node's, in Local. Tunnels of other
// nodes (a forwarder over the private API to the node that holds the
// agent) will come from a second source next to Local, which the router
// consults and waits on in the same loop, as tailscale's derp puts local
// and remote peers behind one forwarder.
type Router struct {
	// Local holds the tunnels connected to this node.
	Local *Store
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

// FindExpected is [Router.Find] for a request that waits only for an agent
// that is expected back: one whose last tunnel here was removed less than
// window ago, or, for an agent not connected since the store was made,
// whose store was made less than window ago (after a restart, agents
// reconnect within their backoff). For any other agent it returns at once,
// and a wait ends when the window does; the error then wraps
// [ErrNoConnection] and an [*AbsentError]. A window of zero or less waits
// for every agent, as Find does.
func (r *Router) FindExpected(ctx context.Context, agentID int64, window time.Duration) (Tunnel, error) {
	var buf [maxTunnelsOnStack]Tunnel
	if t := leastLoaded(r.Local.Tunnels(agentID, buf[:0])); t != nil {
		return t, nil
	}
	if window > 0 {
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
	for {
		if err := r.Local.Err(); err != nil {
			return nil, fmt.Errorf("agent %d: %w", agentID, err)
		}
		added, stop := r.Local.Watch(agentID)
		// Look again now that a new tunnel cannot go unnoticed.
		if t := leastLoaded(r.Local.Tunnels(agentID, buf[:0])); t != nil {
			stop()
			return t, nil
		}
		select {
		case <-added:
			stop()
		case <-ctx.Done():
			stop()
			return nil, fmt.Errorf("agent %d: %w: %w", agentID, ErrNoConnection, context.Cause(ctx))
		}
	}
}

// leastLoaded returns the live tunnel with the fewest requests, or nil.
func leastLoaded(tunnels []Tunnel) Tunnel {
	var best Tunnel
	var bestLoad int64
	for _, t := range tunnels {
		if t.Err() != nil {
			continue // done since it was listed; its owner removes it shortly
		}
		if load := t.Load(); best == nil || load < bestLoad {
			best, bestLoad = t, load
		}
	}
	return best
}
