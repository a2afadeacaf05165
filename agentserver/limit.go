package agentserver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/internal/httpheader"
)

// RateLimitedError is the error of an [Authenticator] that did not check
// a token because a rate limit of its backend was reached, such as GitLab
// mode's limit on calls to GitLab. The agent is told to come back later:
// our agentk gets 429 with Retry-After, GitLab's agentk a gRPC status it
// backs off on (see [grpcAdmission.Authenticate]).
type RateLimitedError struct {
	// RetryAfter is how long until the agent may try again.
	RetryAfter time.Duration
	// Err says which limit was reached.
	Err error
}

func (e *RateLimitedError) Error() string {
	return fmt.Sprintf("%v (retry in %v)", e.Err, e.RetryAfter)
}

func (e *RateLimitedError) Unwrap() error { return e.Err }

// refuseRetryLater answers the handshake with 429 and a Retry-After of
// e's wait, in whole seconds rounded up, and logs and counts the refusal
// under reason. agentk backs off before its next attempt.
func (hs *handshake) refuseRetryLater(reason string, e *RateLimitedError) {
	hs.w.Header().Set("Retry-After", strconv.Itoa(httpheader.RetryAfterSeconds(e.RetryAfter)))
	hs.refuse(http.StatusTooManyRequests, reason, "too many requests; retry later",
		zap.Duration("retry_after", e.RetryAfter), zap.Error(e.Err))
}

// DefaultConnectionsPerTokenPerMinute is GitLab's default of
// connections_per_token_per_minute (kas-spec §1.1, §8.1).
const DefaultConnectionsPerTokenPerMinute = 40000

// ConnectionCounter counts the connections of each agent token per minute
// of the clock, for the limit GitLab's KAS calls
// connections_per_token_per_minute (kas-spec §1.1).
//
// [MemoryConnectionCounter] counts in this process. Where several nodes
// serve the same agents, the count must be shared for the limit to hold
// across them: a Redis counter goes here, as GitLab's KAS keeps it (the
// key <prefix>:agent_limit:<ConnectionKey>:<minute of the hour>; GET, then
// INCR and EXPIRE 59 s in one transaction; kas-spec §5.1).
type ConnectionCounter interface {
	// Count counts one connection of the token whose [ConnectionKey] is
	// key, if fewer than limit were counted in the current minute, and
	// reports whether it did. If it did not, retryAfter is the time until
	// the next minute, when counts start over. An error means nothing
	// could be counted (a shared store is out of reach).
	Count(ctx context.Context, key string, limit uint64) (ok bool, retryAfter time.Duration, err error)
}

// ConnectionKey is the key a token is counted under: the hex SHA-256 of
// the token's first half, as GitLab's KAS keys its Redis counter. Half a
// token of 50 random characters is still unguessable, and the key cannot
// confirm a guess of the whole token.
func ConnectionKey(token string) string {
	sum := sha256.Sum256([]byte(token[:len(token)/2]))
	return hex.EncodeToString(sum[:])
}

// MemoryConnectionCounter is a [ConnectionCounter] in this process's
// memory. It holds the counts of the current minute only. It is safe for
// concurrent use.
type MemoryConnectionCounter struct {
	mu     sync.Mutex // guards minute and counts
	minute time.Time  // the start of the minute counted
	counts map[string]uint64
}

// Count implements [ConnectionCounter]; it never fails.
func (c *MemoryConnectionCounter) Count(_ context.Context, key string, limit uint64) (bool, time.Duration, error) {
	now := time.Now()
	minute := now.Truncate(time.Minute)
	c.mu.Lock()
	defer c.mu.Unlock()
	if !minute.Equal(c.minute) || c.counts == nil {
		// A new map rather than clear: the old one's room goes back to
		// the garbage collector.
		c.minute, c.counts = minute, make(map[string]uint64)
	}
	if c.counts[key] >= limit {
		return false, minute.Add(time.Minute).Sub(now), nil
	}
	c.counts[key]++
	return true, 0, nil
}

// errConnectionLimit is why an agent over its connections per minute is
// refused.
var errConnectionLimit = errors.New("the agent token's connections per minute are used up")

// countConnection counts a connection of an agent whose token
// authenticated. Over the limit it returns a [*RateLimitedError]; an
// error of the counter means the connection cannot be allowed now.
//
// Tokens are counted once they authenticated, not before as in GitLab's
// KAS: counting made-up tokens would let a flood of them fill the
// in-memory counter, and what they cost GitLab is bounded by the
// Authenticator (its cache of refusals, and GitLab mode's api_rate_limit).
func (e *Endpoint) countConnection(ctx context.Context, token string) error {
	if e.Connections == nil {
		return nil
	}
	limit := e.ConnectionsPerMinute
	if limit == 0 {
		limit = DefaultConnectionsPerTokenPerMinute
	}
	ok, wait, err := e.Connections.Count(ctx, ConnectionKey(token), limit)
	switch {
	case err != nil:
		return fmt.Errorf("counting the agent's connections: %w", err)
	case !ok:
		return &RateLimitedError{RetryAfter: wait, Err: errConnectionLimit}
	}
	return nil
}

// countConnection counts the handshake as a connection of its token. If
// it may not go on, the handshake is answered (429 over the limit, 503 if
// it cannot be counted now) and ok is false.
func (hs *handshake) countConnection(token string) (ok bool) {
	err := hs.e.countConnection(hs.r.Context(), token)
	var limited *RateLimitedError
	switch {
	case errors.As(err, &limited):
		hs.refuseRetryLater("connection rate limit", limited)
		return false
	case err != nil:
		hs.e.logFailure(hs.log, "cannot count the agent's connections now", err)
		if hs.e.Observer != nil {
			hs.e.Observer.AgentRefused("connection count unavailable")
		}
		http.Error(hs.w, "cannot admit the agent now; retry later", http.StatusServiceUnavailable)
		return false
	}
	return true
}
