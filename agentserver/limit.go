package agentserver

import (
	"fmt"
	"net/http"
	"strconv"
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
