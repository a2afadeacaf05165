package redisregistry

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/caddy-kas/caddy-kas/tunnel"
)

// keys names the registry's keys (see the package documentation).
type keys struct{ prefix string }

func (k keys) nodesByAgent(agentID int64) string {
	return k.prefix + ":tunnel_tracker:kas_by_agent_id:" + strconv.FormatInt(agentID, 10)
}

func (k keys) connsByAgent(agentID int64) string {
	return k.prefix + ":agent_tracker:conn_by_agent_id:" + strconv.FormatInt(agentID, 10)
}

func (k keys) connsByProject(projectID int64) string {
	return k.prefix + ":agent_tracker:conn_by_project_id:" + strconv.FormatInt(projectID, 10)
}

func (k keys) connectedAgents() string { return k.prefix + ":agent_tracker:connected_agents" }

func (k keys) limit(key string, minute int) string {
	return k.prefix + ":agent_limit:" + key + ":" + strconv.Itoa(minute)
}

func (k keys) events() string { return k.prefix + ":tunnel_events" }

// batch is one round of writes: derived from what this node holds when the
// writer takes it, so that it is right whatever happened while Redis was
// out of reach.
type batch struct {
	writes   []tunnelWrite
	removals []removal
	// dropNode are the agents this node no longer holds a tunnel of: its
	// URLs leave their entries.
	dropNode map[int64]bool
	announce []int64
}

type tunnelWrite struct {
	agent       tunnel.AgentInfo
	connectedAt time.Time
	field       string
}

// batchLocked takes the pending work: every held tunnel if all, else
// those not yet written. r.mu must be held.
func (r *Registry) batchLocked(all bool) *batch {
	b := &batch{removals: r.removals, dropNode: make(map[int64]bool)}
	r.removals = nil
	for seq, h := range r.held {
		if all || r.pendingWrite[seq] {
			b.writes = append(b.writes, tunnelWrite{agent: h.t.Agent(), connectedAt: h.t.ConnectedAt(), field: h.field})
		}
	}
	clear(r.pendingWrite)
	for _, rm := range b.removals {
		if r.perAgent[rm.agentID] == 0 {
			b.dropNode[rm.agentID] = true
		}
	}
	for id := range r.announce {
		b.announce = append(b.announce, id)
	}
	clear(r.announce)
	return b
}

// requeue gives back what a failed batch did not surely do: removals not
// yet expired by themselves, and announcements. Its writes are redone by
// the rewrite of everything that follows a failure.
func (r *Registry) requeue(b *batch) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rm := range b.removals {
		if now.Sub(rm.at) < r.ttl {
			r.removals = append(r.removals, rm)
		}
	}
	for _, id := range b.announce {
		r.announce[id] = true
	}
}

// writer runs until Close: it writes what Publish and unpublish queue,
// rewrites everything every Refresh, after a failure every retryInterval
// until it succeeds, and when the subscription is re-established; and it
// deletes expired fields every gcInterval.
func (r *Registry) writer() {
	defer r.wg.Done()
	refresh := time.NewTimer(r.refresh)
	defer refresh.Stop()
	gc := time.NewTicker(r.gcInterval)
	defer gc.Stop()
	retryTimer := time.NewTimer(r.retryInterval)
	retryTimer.Stop()
	defer retryTimer.Stop()
	failed := false
	for {
		var retry <-chan time.Time
		if failed {
			retryTimer.Reset(r.retryInterval)
			retry = retryTimer.C
		}
		all := failed
		select {
		case <-r.stop:
			return
		case <-r.kick:
		case <-r.rewrite:
			all = true
		case <-refresh.C:
			all = true
		case <-retry:
		case <-gc.C:
			r.collect()
			continue
		}
		if all {
			refresh.Reset(r.refresh)
		}
		r.mu.Lock()
		b := r.batchLocked(all)
		r.mu.Unlock()
		if err := r.apply(r.ctx, b); err != nil {
			// Also when Close interrupted it: Close removes what
			// this batch would have.
			r.requeue(b)
			if r.ctx.Err() != nil {
				return
			}
			r.writeErrs.failed(err)
			failed = true
			continue
		}
		r.writeErrs.ok()
		failed = false
	}
}

// batchSize bounds the tunnels written in one pipeline.
const batchSize = 256

// apply writes b to Redis: removals first, then writes, in pipelines of at
// most batchSize tunnels, each bounded by opTimeout; then, once they are
// done (on a Cluster the pipelines of several masters run in parallel),
// the events.
func (r *Registry) apply(ctx context.Context, b *batch) error {
	now := time.Now()
	expiry := strconv.FormatInt(now.Add(r.ttl).UnixMilli(), 10)
	for chunk := range slices.Chunk(b.removals, batchSize) {
		err := r.pipeline(ctx, func(p redis.Pipeliner) {
			for _, rm := range chunk {
				p.HDel(ctx, r.keys.connsByAgent(rm.agentID), rm.field)
				if rm.projectID != 0 {
					p.HDel(ctx, r.keys.connsByProject(rm.projectID), rm.field)
				}
				if b.dropNode[rm.agentID] {
					p.HDel(ctx, r.keys.nodesByAgent(rm.agentID), r.ownURLs...)
				}
			}
		})
		if err != nil {
			return fmt.Errorf("removing connections: %w", err)
		}
	}
	for chunk := range slices.Chunk(b.writes, batchSize) {
		err := r.pipeline(ctx, func(p redis.Pipeliner) {
			agents := make(map[int64]bool)
			for _, w := range chunk {
				value, err := json.Marshal(storedConnectionOf(w, r.node, now.Add(r.ttl)))
				if err != nil {
					panic(err) // only plain fields: cannot fail
				}
				r.hsetExpire(ctx, p, r.keys.connsByAgent(w.agent.ID), w.field, value)
				if w.agent.ProjectID != 0 {
					r.hsetExpire(ctx, p, r.keys.connsByProject(w.agent.ProjectID), w.field, value)
				}
				agents[w.agent.ID] = true
			}
			nodeFields := make([]any, 0, 2*len(r.ownURLs))
			for _, u := range r.ownURLs {
				nodeFields = append(nodeFields, u, expiry)
			}
			agentFields := make([]any, 0, 2*len(agents))
			for id := range agents {
				p.HSet(ctx, r.keys.nodesByAgent(id), nodeFields...)
				p.PExpire(ctx, r.keys.nodesByAgent(id), r.ttl)
				agentFields = append(agentFields, strconv.FormatInt(id, 10), expiry)
			}
			p.HSet(ctx, r.keys.connectedAgents(), agentFields...)
			p.PExpire(ctx, r.keys.connectedAgents(), r.ttl)
		})
		if err != nil {
			return fmt.Errorf("writing connections: %w", err)
		}
	}
	for chunk := range slices.Chunk(b.announce, 1000) {
		msg, err := json.Marshal(event{Node: r.node, Agents: chunk})
		if err != nil {
			panic(err) // only plain fields: cannot fail
		}
		opCtx, cancel := context.WithTimeout(ctx, r.opTimeout)
		err = r.client.Publish(opCtx, r.keys.events(), msg).Err()
		cancel()
		if err != nil {
			return fmt.Errorf("announcing tunnel changes: %w", err)
		}
	}
	return nil
}

func (r *Registry) hsetExpire(ctx context.Context, p redis.Pipeliner, key, field string, value []byte) {
	p.HSet(ctx, key, field, value)
	p.PExpire(ctx, key, r.ttl)
}

// pipeline runs the commands fill queues in one pipeline bounded by
// opTimeout.
func (r *Registry) pipeline(ctx context.Context, fill func(redis.Pipeliner)) error {
	ctx, cancel := context.WithTimeout(ctx, r.opTimeout)
	defer cancel()
	p := r.client.Pipeline()
	fill(p)
	_, err := p.Exec(ctx)
	return err
}

// collect deletes the expired fields of the keys this node writes: those
// of nodes that died without removing theirs (GitLab's KAS does the same
// every redis_conn_info_gc, kas-spec §5.1). Keys nobody refreshes expire
// by themselves.
func (r *Registry) collect() {
	r.mu.Lock()
	keySet := map[string]bool{r.keys.connectedAgents(): true}
	for _, h := range r.held {
		a := h.t.Agent()
		keySet[r.keys.nodesByAgent(a.ID)] = true
		keySet[r.keys.connsByAgent(a.ID)] = true
		if a.ProjectID != 0 {
			keySet[r.keys.connsByProject(a.ProjectID)] = true
		}
	}
	r.mu.Unlock()
	now := time.Now()
	for key := range keySet {
		if err := r.collectKey(key, now); err != nil {
			if r.ctx.Err() == nil {
				r.writeErrs.failed(fmt.Errorf("collecting expired fields of %s: %w", key, err))
			}
			return
		}
	}
}

func (r *Registry) collectKey(key string, now time.Time) error {
	var cursor uint64
	for {
		ctx, cancel := context.WithTimeout(r.ctx, r.opTimeout)
		kv, next, err := r.client.HScan(ctx, key, cursor, "", 256).Result()
		if err == nil {
			var expired []string
			for i := 0; i+1 < len(kv); i += 2 {
				if exp, ok := expiryOf(kv[i+1]); !ok || !now.Before(exp) {
					expired = append(expired, kv[i])
				}
			}
			if len(expired) > 0 {
				err = r.client.HDel(ctx, key, expired...).Err()
			}
		}
		cancel()
		if err != nil {
			return err
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}
