package gitaly

import (
	"context"
	"fmt"
	"math"

	"golang.org/x/time/rate"
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

// newLimiter returns a token bucket for l that starts full, or nil if l
// does not limit (PerSecond is infinite).
func newLimiter(l RateLimit) *rate.Limiter {
	if math.IsInf(l.PerSecond, 1) {
		return nil
	}
	return rate.NewLimiter(rate.Limit(l.PerSecond), l.Burst)
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

// waitLimit takes one token of l, waiting for it as long as ctx allows. It
// fails at once, taking nothing, if ctx's deadline comes before the token
// would; a wait cut short gives its token back. A nil l does not limit.
func waitLimit(ctx context.Context, l *rate.Limiter) error {
	if l == nil {
		return ctx.Err()
	}
	if err := l.Wait(ctx); err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return ctxErr
		}
		// The deadline is nearer than the token.
		return fmt.Errorf("gitaly rate limit: %w: %w", err, context.DeadlineExceeded)
	}
	return nil
}
