package nodetunnel

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// NodeLister names the other nodes that hold tunnels of an agent: the
// shared registry.
type NodeLister interface {
	// Nodes returns the private URLs of the other nodes that hold a
	// tunnel of the agent, and a channel that is closed when that may
	// have changed. It logs its own failures; the finder only retries.
	Nodes(ctx context.Context, agentID int64) (urls []string, changed <-chan struct{}, err error)
}

// DefaultStagger is how long [Finder] waits for one node before it asks
// the next as well: enough for a node on the same network to answer, so
// that a healthy node is usually asked alone, and short enough that a dead
// one costs a moment.
const DefaultStagger = 50 * time.Millisecond

// Retry delays while the registry names no node with a tunnel: after a
// node said it has none, or the registry cannot be read, the finder asks
// again after a delay that doubles from minRetry to maxRetry, or at once
// when the registry reports a change.
const (
	minRetry = 100 * time.Millisecond
	maxRetry = time.Second
)

// Finder finds a tunnel of an agent on another node: it asks the nodes the
// registry names, in parallel with a stagger, and the first that is ready
// wins; the others are cancelled. Its Find is what [tunnel.Router.Remote]
// calls.
type Finder struct {
	// Nodes is the registry.
	Nodes NodeLister
	// Client opens the streams.
	Client *Client
	// Stagger is the delay between asking one node and the next; zero
	// means DefaultStagger.
	Stagger time.Duration
	// Logger receives nodes that cannot be reached, at debug level.
	Logger *zap.Logger
}

// Find returns a [Remote] of the agent on another node, waiting until a
// node has one or ctx is done; then the error wraps
// [tunnel.ErrNoConnection].
func (f *Finder) Find(ctx context.Context, agentID int64) (tunnel.Tunnel, error) {
	retry := minRetry
	for {
		// An error means the registry is out of reach; it logs that
		// itself, once per interval. This node's own tunnels go on
		// working, and forwarding resumes when the registry is back.
		urls, changed, _ := f.Nodes.Nodes(ctx, agentID)
		if len(urls) > 0 {
			if r := f.race(ctx, agentID, urls); r != nil {
				return r, nil
			}
		}
		if ctx.Err() != nil {
			return nil, fmt.Errorf("agent %d: %w: %w", agentID, tunnel.ErrNoConnection, context.Cause(ctx))
		}
		t := time.NewTimer(retry)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("agent %d: %w: %w", agentID, tunnel.ErrNoConnection, context.Cause(ctx))
		case <-changed:
			t.Stop()
			retry = minRetry
		case <-t.C:
			retry = min(2*retry, maxRetry)
		}
	}
}

func (f *Finder) log() *zap.Logger {
	if f.Logger == nil {
		return zap.NewNop()
	}
	return f.Logger
}

// race asks the nodes, each after a stagger or as soon as the one before
// failed, and returns the first ready Remote, or nil.
func (f *Finder) race(ctx context.Context, agentID int64, urls []string) *Remote {
	if len(urls) == 1 {
		// One node to ask (the usual case: one replica elsewhere):
		// nothing to race, and no goroutine to start.
		r, err := f.Client.Open(ctx, urls[0], agentID)
		if err != nil && !errors.Is(err, ErrNoTunnel) && ctx.Err() == nil {
			f.log().Debug("node unreachable", zap.Int64("agent_id", agentID), zap.Error(err))
		}
		return r
	}
	stagger := f.Stagger
	if stagger <= 0 {
		stagger = DefaultStagger
	}
	// Spread the load of agents with replicas on several nodes.
	urls = append([]string(nil), urls...)
	rand.Shuffle(len(urls), func(i, j int) { urls[i], urls[j] = urls[j], urls[i] })

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type result struct {
		r   *Remote
		err error
	}
	results := make(chan result, len(urls))
	next := make(chan struct{}, len(urls)) // a failed attempt lets the next start at once
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the launcher; an attempt it started keeps wg above zero
		defer wg.Done()
		for i, u := range urls {
			if i > 0 {
				t := time.NewTimer(stagger)
				select {
				case <-t.C:
				case <-next:
					t.Stop()
				case <-ctx.Done():
					t.Stop()
				}
			}
			if ctx.Err() != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				r, err := f.Client.Open(ctx, u, agentID)
				if err != nil {
					next <- struct{}{}
				}
				results <- result{r, err}
			}()
		}
	}()
	go func() { wg.Wait(); close(results) }()

	var winner *Remote
	for res := range results {
		switch {
		case res.r == nil:
			if res.err != nil && !errors.Is(res.err, ErrNoTunnel) && ctx.Err() == nil {
				f.log().Debug("node unreachable", zap.Int64("agent_id", agentID), zap.Error(res.err))
			}
		case winner == nil:
			winner = res.r
			cancel() // the others give up
		default:
			res.r.Close()
		}
	}
	return winner
}
