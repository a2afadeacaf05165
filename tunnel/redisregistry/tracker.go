package redisregistry

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/redis/go-redis/v9"
)

// ConnectionsByAgentIDs returns the live connections of the agents, on
// every node, ordered by agent id, connection time and node. An error
// wraps [ErrUnavailable].
func (r *Registry) ConnectionsByAgentIDs(ctx context.Context, ids []int64) ([]Connection, error) {
	return r.connections(ctx, ids, r.keys.connsByAgent)
}

// ConnectionsByProjectIDs returns the live connections of the agents
// whose configuration project is one of ids, ordered as
// ConnectionsByAgentIDs. An error wraps [ErrUnavailable].
func (r *Registry) ConnectionsByProjectIDs(ctx context.Context, ids []int64) ([]Connection, error) {
	return r.connections(ctx, ids, r.keys.connsByProject)
}

// AllConnections returns every live connection, ordered as
// ConnectionsByAgentIDs: for version counts and an admin view. It walks
// the connected agents with HSCAN, never blocking Redis as KEYS would. An
// error wraps [ErrUnavailable].
func (r *Registry) AllConnections(ctx context.Context) ([]Connection, error) {
	var ids []int64
	seen := make(map[int64]bool)
	var cursor uint64
	now := time.Now()
	for {
		opCtx, cancel := context.WithTimeout(ctx, r.opTimeout)
		kv, next, err := r.client.HScan(opCtx, r.keys.connectedAgents(), cursor, "", 1000).Result()
		cancel()
		if err != nil {
			err = fmt.Errorf("%w: listing the connected agents: %w", ErrUnavailable, err)
			r.readErrs.failed(err)
			return nil, err
		}
		for i := 0; i+1 < len(kv); i += 2 {
			id, err := strconv.ParseInt(kv[i], 10, 64)
			exp, ok := expiryOf(kv[i+1])
			if err == nil && ok && now.Before(exp) && !seen[id] {
				seen[id] = true
				ids = append(ids, id)
			}
		}
		if next == 0 {
			break
		}
		cursor = next
	}
	return r.ConnectionsByAgentIDs(ctx, ids)
}

// connections reads the tracker hashes key names for ids, in pipelines of
// at most batchSize keys.
func (r *Registry) connections(ctx context.Context, ids []int64, key func(int64) string) ([]Connection, error) {
	var out []Connection
	now := time.Now()
	for chunk := range slices.Chunk(slices.Compact(slices.Sorted(slices.Values(ids))), batchSize) {
		opCtx, cancel := context.WithTimeout(ctx, r.opTimeout)
		p := r.client.Pipeline()
		cmds := make([]*redis.MapStringStringCmd, len(chunk))
		for i, id := range chunk {
			cmds[i] = p.HGetAll(opCtx, key(id))
		}
		_, err := p.Exec(opCtx)
		cancel()
		if err != nil {
			err = fmt.Errorf("%w: reading agent connections: %w", ErrUnavailable, err)
			r.readErrs.failed(err)
			return nil, err
		}
		for _, cmd := range cmds {
			for _, v := range cmd.Val() {
				s, ok := parseConnection(v)
				if ok && now.Before(time.UnixMilli(s.ExpiresAt)) {
					out = append(out, s.connection())
				}
			}
		}
	}
	r.readErrs.ok()
	slices.SortFunc(out, func(a, b Connection) int {
		return cmp.Or(
			cmp.Compare(a.AgentID, b.AgentID),
			a.ConnectedAt.Compare(b.ConnectedAt),
			cmp.Compare(a.Node, b.Node),
			cmp.Compare(a.Meta.ConnectionID, b.Meta.ConnectionID),
		)
	})
	return out, nil
}

// limitKeyTTL is how long a connection counter lives: 59 s as in GitLab's
// KAS, so that the key of a minute of the hour is gone before that minute
// comes round again.
const limitKeyTTL = 59 * time.Second

// Count implements agentserver.ConnectionCounter for all nodes: it counts
// one connection of the token key in the current minute unless limit were
// counted already, under the key GitLab's KAS uses (kas-spec §5.1). Unlike
// GitLab's KAS, which reads the counter before it increments it, it
// increments and compares in one transaction: a refused connection
// counts too, which changes nothing since the count is over the limit
// anyway, and two nodes cannot both admit the last connection. If it
// refuses, retryAfter is the time until the next minute. An error wraps
// [ErrUnavailable].
func (r *Registry) Count(ctx context.Context, key string, limit uint64) (ok bool, retryAfter time.Duration, err error) {
	now := time.Now()
	k := r.keys.limit(key, now.Minute())
	opCtx, cancel := context.WithTimeout(ctx, r.opTimeout)
	defer cancel()
	var incr *redis.IntCmd
	_, err = r.client.TxPipelined(opCtx, func(p redis.Pipeliner) error {
		incr = p.Incr(opCtx, k)
		p.Expire(opCtx, k, limitKeyTTL)
		return nil
	})
	if err != nil {
		err = fmt.Errorf("%w: counting the token's connections: %w", ErrUnavailable, err)
		r.readErrs.failed(err)
		return false, 0, err
	}
	if uint64(incr.Val()) > limit {
		minute := now.Truncate(time.Minute)
		return false, minute.Add(time.Minute).Sub(now), nil
	}
	return true, 0, nil
}
