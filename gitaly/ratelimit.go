package gitaly

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"
)

// RateLimit is a token bucket: calls may be made at PerSecond on average,
// and up to Burst at once after a quiet while.
type RateLimit struct {
	PerSecond float64
	Burst     int
}

// GitLab's KAS defaults (kas-spec §8.1, gitaly.global_api_rate_limit and
// gitaly.per_server_api_rate_limit).
var (
	DefaultGlobalRateLimit    = RateLimit{PerSecond: 30, Burst: 70}
	DefaultPerServerRateLimit = RateLimit{PerSecond: 15, Burst: 40}
)

// limiter is a token bucket that callers wait on. A nil *limiter does not
// limit.
type limiter struct {
	rate  float64 // tokens per second
	burst float64
	now   func() time.Time

	mu     sync.Mutex
	tokens float64 // may go negative: tokens reserved by waiting calls
	last   time.Time
}

// newLimiter returns a limiter for l, or nil if l does not limit
// (PerSecond is infinite).
func newLimiter(l RateLimit, now func() time.Time) *limiter {
	if math.IsInf(l.PerSecond, 1) {
		return nil
	}
	return &limiter{rate: l.PerSecond, burst: float64(l.Burst), tokens: float64(l.Burst), now: now, last: now()}
}

func (l RateLimit) validate() error {
	if math.IsInf(l.PerSecond, 1) {
		return nil
	}
	if !(l.PerSecond > 0) || l.Burst < 1 {
		return fmt.Errorf("rate limit of %v per second with a burst of %d: both must be positive", l.PerSecond, l.Burst)
	}
	return nil
}

// wait takes one token, waiting for it as long as ctx allows. It fails at
// once, taking nothing, if ctx's deadline comes before the token would.
func (l *limiter) wait(ctx context.Context) error {
	if l == nil {
		return ctx.Err()
	}
	l.mu.Lock()
	now := l.now()
	if elapsed := now.Sub(l.last); elapsed > 0 {
		l.tokens = math.Min(l.burst, l.tokens+elapsed.Seconds()*l.rate)
		l.last = now
	}
	l.tokens--
	if l.tokens >= 0 {
		l.mu.Unlock()
		return nil
	}
	delay := time.Duration(-l.tokens / l.rate * float64(time.Second))
	if deadline, ok := ctx.Deadline(); ok && deadline.Sub(now) < delay {
		l.tokens++
		l.mu.Unlock()
		return fmt.Errorf("gitaly rate limit: waiting %v would pass the deadline: %w", delay, context.DeadlineExceeded)
	}
	l.mu.Unlock()

	t := time.NewTimer(delay)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		l.mu.Lock()
		l.tokens++
		l.mu.Unlock()
		return ctx.Err()
	}
}
