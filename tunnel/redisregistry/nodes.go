package redisregistry

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// Nodes returns the private URLs of the other nodes that hold a tunnel of
// the agent (expired entries and this node's URLs left out), and a channel
// that is closed when that may have changed: an event for the agent from
// any node, the subscription being re-established, or at the latest after
// a bounded interval (10 s), so that a waiter never depends on pub/sub
// alone. An answer is cached until its channel closes. An error wraps
// [ErrUnavailable]; the channel is valid with it too.
func (r *Registry) Nodes(ctx context.Context, agentID int64) (urls []string, changed <-chan struct{}, err error) {
	r.waitMu.Lock()
	w := r.waitLocked(agentID)
	if w.fetched {
		urls = slices.Clone(w.urls)
		r.waitMu.Unlock()
		return urls, w.changed, nil
	}
	r.waitMu.Unlock()
	if r.ctx.Err() != nil {
		return nil, w.changed, fmt.Errorf("%w: the registry is closed", ErrUnavailable)
	}

	opCtx, cancel := context.WithTimeout(ctx, r.opTimeout)
	fields, err := r.client.HGetAll(opCtx, r.keys.nodesByAgent(agentID)).Result()
	cancel()
	if err != nil {
		return nil, w.changed, r.readFailed("reading the nodes of agent", agentID, err)
	}
	r.readErrs.ok()
	now := time.Now()
	for u, v := range fields {
		if exp, ok := expiryOf(v); ok && now.Before(exp) && !r.own[u] {
			urls = append(urls, u)
		}
	}
	slices.Sort(urls)
	r.waitMu.Lock()
	// Cache the answer only if nothing changed while it was read: then
	// w is still the entry.
	if r.waits[agentID] == w {
		w.urls, w.fetched = urls, true
	}
	r.waitMu.Unlock()
	return slices.Clone(urls), w.changed, nil
}

// readFailed logs a failed read (once per interval) and returns its error,
// wrapping ErrUnavailable.
func (r *Registry) readFailed(what string, agentID int64, err error) error {
	err = fmt.Errorf("%w: %s %d: %w", ErrUnavailable, what, agentID, err)
	r.readErrs.failed(err)
	return err
}

func (r *Registry) waitLocked(agentID int64) *agentWait {
	w := r.waits[agentID]
	if w == nil {
		w = &agentWait{changed: make(chan struct{})}
		if r.ctx.Err() != nil {
			close(w.changed) // closed: nothing will close it any more
			return w
		}
		r.waits[agentID] = w
	}
	return w
}

// wake tells the waiters of the agents that their answer may have changed.
func (r *Registry) wake(agentIDs []int64) {
	r.waitMu.Lock()
	defer r.waitMu.Unlock()
	for _, id := range agentIDs {
		if w := r.waits[id]; w != nil {
			close(w.changed)
			delete(r.waits, id)
		}
	}
}

// wakeAll tells every waiter that its answer may have changed.
func (r *Registry) wakeAll() {
	r.waitMu.Lock()
	defer r.waitMu.Unlock()
	for id, w := range r.waits {
		close(w.changed)
		delete(r.waits, id)
	}
}

// waker wakes every waiter each wakeInterval until Close.
func (r *Registry) waker() {
	defer r.wg.Done()
	t := time.NewTicker(r.wakeInterval)
	defer t.Stop()
	for {
		select {
		case <-r.stop:
			return
		case <-t.C:
			r.wakeAll()
		}
	}
}

// subscriber receives the events channel until Close. go-redis
// re-establishes the subscription after a failure when it is next read;
// each (re)subscription confirms itself with a subscribe message, upon
// which every waiter is woken (events may have been missed) and the writer
// rewrites everything (Redis may have restarted empty).
func (r *Registry) subscriber() {
	defer r.wg.Done()
	backoff := time.NewTimer(0)
	backoff.Stop()
	defer backoff.Stop()
	for {
		msg, err := r.pubsub.ReceiveTimeout(r.ctx, r.pingInterval)
		if r.ctx.Err() != nil {
			return
		}
		var netErr net.Error
		if err != nil && errors.As(err, &netErr) && netErr.Timeout() {
			// Quiet: check that the connection still works. A failed
			// PING makes go-redis reconnect on the next receive.
			opCtx, cancel := context.WithTimeout(r.ctx, r.opTimeout)
			err = r.pubsub.Ping(opCtx)
			cancel()
		}
		if err != nil {
			if r.ctx.Err() != nil {
				return
			}
			r.subErrs.failed(fmt.Errorf("receiving from %s: %w", r.keys.events(), err))
			// Not too often while Redis is away.
			backoff.Reset(r.retryInterval)
			select {
			case <-r.stop:
				return
			case <-backoff.C:
			}
			continue
		}
		switch m := msg.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				r.subErrs.ok()
				r.wakeAll()
				select {
				case r.rewrite <- struct{}{}:
				default:
				}
			}
		case *redis.Message:
			var ev event
			if err := json.Unmarshal([]byte(m.Payload), &ev); err != nil {
				r.log.Warn("ignoring a malformed tunnel registry event", zap.String("channel", m.Channel), zap.Error(err))
				continue
			}
			r.wake(ev.Agents)
		}
	}
}
