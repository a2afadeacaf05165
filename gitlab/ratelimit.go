package gitlab

import (
	"errors"
	"fmt"
	"math"
	"time"

	"golang.org/x/time/rate"
)

// GitLab's defaults of gitlab.api_rate_limit (kas-spec §8.1): the calls
// the agent server makes to GitLab's API regain 50 tokens a second, up to
// 250.
const (
	DefaultAPIRefillRatePerSecond = 50
	DefaultAPIBucketSize          = 250
)

// ErrRateLimited is wrapped by the error of a call the [Client] did not
// make because its [RateLimiter] had no token left. Such an error is not
// GitLab's answer: caches do not keep it, and callers tell their client
// to come back later (see [RateLimitError.Wait]).
var ErrRateLimited = errors.New("rate limit of calls to GitLab reached")

// RateLimitError is the error of a call that was not made because the
// rate limit was reached. It wraps [ErrRateLimited].
type RateLimitError struct {
	// Path is the API path that was not called.
	Path string
	// Wait is how long until the limiter has a token again.
	Wait time.Duration
}

func (e *RateLimitError) Error() string {
	return fmt.Sprintf("gitlab %s: not called: %v (next call possible in %v)", e.Path, ErrRateLimited, e.Wait)
}

func (e *RateLimitError) Unwrap() error { return ErrRateLimited }

// rateLimited returns how long to wait if err says a call was not made
// because of the rate limit.
func rateLimited(err error) (wait time.Duration, ok bool) {
	var e *RateLimitError
	if errors.As(err, &e) {
		return e.Wait, true
	}
	return 0, false
}

// RateLimiter is a token bucket, as GitLab's agent server puts in front of
// its calls to GitLab (gitlab.api_rate_limit, kas-spec §8.1): it holds up
// to a bucket size of tokens, regains them at a steady rate, and each call
// takes one. It starts full. Unlike GitLab's, which makes a call wait for
// its token, it refuses a call when the bucket is empty: a waiting call
// would hold its client's request (and its connection) open, and under a
// flood of requests with made-up tokens the waiters would only pile up.
// A nil *RateLimiter allows every call. It is safe for concurrent use.
type RateLimiter struct {
	bucket *rate.Limiter
}

// NewRateLimiter returns a full bucket of bucketSize tokens that regains
// refillPerSecond tokens a second. Both must be positive.
func NewRateLimiter(refillPerSecond float64, bucketSize int) (*RateLimiter, error) {
	if !(refillPerSecond > 0) || math.IsInf(refillPerSecond, 0) {
		return nil, fmt.Errorf("rate limit: refill rate %v per second must be a positive number", refillPerSecond)
	}
	if bucketSize <= 0 {
		return nil, fmt.Errorf("rate limit: bucket size %d must be a positive integer", bucketSize)
	}
	return &RateLimiter{bucket: rate.NewLimiter(rate.Limit(refillPerSecond), bucketSize)}, nil
}

// Take takes a token if there is one. If there is none, it takes nothing
// and returns how long until there is one.
func (l *RateLimiter) Take() (ok bool, wait time.Duration) {
	if l == nil {
		return true, 0
	}
	now := time.Now()
	if l.bucket.AllowN(now, 1) {
		return true, 0
	}
	missing := (1 - l.bucket.TokensAt(now)) / float64(l.bucket.Limit()) // seconds
	return false, max(time.Duration(math.Ceil(missing*float64(time.Second))), time.Nanosecond)
}
