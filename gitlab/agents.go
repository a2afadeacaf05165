package gitlab

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/caddy-kas/caddy-kas/agentserver"
)

// How long agent_info answers are kept: GitLab's agent_info_cache_ttl and
// agent_info_cache_error_ttl (kas-spec §2.1).
const (
	DefaultAgentInfoCacheTTL      = 5 * time.Minute
	DefaultAgentInfoCacheErrorTTL = time.Minute
)

// AgentAuthenticator authenticates agentk's token with GitLab's agent_info
// (kas-spec §2.1). It implements [agentserver.Authenticator].
type AgentAuthenticator struct {
	Client *Client
	// Cache keeps agent_info answers by the SHA-256 of the token; nil
	// means no caching.
	Cache *Cache[*AgentInfo]
}

// NewAgentAuthenticator returns an authenticator that asks c and caches
// answers for ttl, and refusals and failures for errorTTL. Zero TTLs mean
// GitLab's defaults, [DefaultAgentInfoCacheTTL] and
// [DefaultAgentInfoCacheErrorTTL].
func NewAgentAuthenticator(c *Client, ttl, errorTTL time.Duration) *AgentAuthenticator {
	if ttl == 0 {
		ttl = DefaultAgentInfoCacheTTL
	}
	if errorTTL == 0 {
		errorTTL = DefaultAgentInfoCacheErrorTTL
	}
	return &AgentAuthenticator{Client: c, Cache: NewCache[*AgentInfo](ttl, errorTTL)}
}

// AuthenticateAgent implements [agentserver.Authenticator]. A token GitLab
// answers 401 for (unknown or revoked) gives an error wrapping
// [agentserver.ErrUnknownToken]; a check the rate limit of calls to GitLab
// had no room for gives an [*agentserver.RateLimitedError]; any other
// failure means the answer is not known now. That includes GitLab refusing the agent server's own JWT (a
// 401 too): a wrong shared secret must not look like revoked tokens, which
// would close every agent's tunnel.
func (a *AgentAuthenticator) AuthenticateAgent(ctx context.Context, token string) (agentserver.Agent, error) {
	if token == "" {
		return agentserver.Agent{}, fmt.Errorf("%w: empty token", agentserver.ErrUnknownToken)
	}
	info, err := a.Info(ctx, token)
	if wait, ok := rateLimited(err); ok {
		// GitLab was not asked: the agent comes back later.
		return agentserver.Agent{}, &agentserver.RateLimitedError{RetryAfter: wait, Err: fmt.Errorf("checking the agent token with GitLab: %w", err)}
	}
	switch {
	case jwtRejected(err):
		// Every agent would be refused: the shared secret is wrong, not
		// the token.
		return agentserver.Agent{}, fmt.Errorf("checking the agent token with GitLab: GitLab refused the agent server's JWT (is the shared secret GitLab's?): %w", err)
	case statusCode(err) == http.StatusUnauthorized:
		return agentserver.Agent{}, fmt.Errorf("%w: %w", agentserver.ErrUnknownToken, err)
	case err != nil:
		return agentserver.Agent{}, fmt.Errorf("checking the agent token with GitLab: %w", err)
	case info.AgentID <= 0:
		return agentserver.Agent{}, errors.New("checking the agent token with GitLab: agent_info has no agent id")
	}
	return agentserver.Agent{ID: info.AgentID, Name: info.AgentName, ProjectID: info.ProjectID}, nil
}

// Info returns GitLab's agent_info answer for token, from the cache that
// AuthenticateAgent fills: where the agent's configuration project lives,
// for reading its configuration file. It holds the Gitaly token: never log
// it.
func (a *AgentAuthenticator) Info(ctx context.Context, token string) (*AgentInfo, error) {
	return a.Cache.Get(ctx, CacheKey("agent_info", token), func(ctx context.Context) (*AgentInfo, error) {
		return a.Client.AgentInfo(ctx, token)
	})
}

var _ agentserver.Authenticator = (*AgentAuthenticator)(nil)
