package gitlab

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/caddy-kas/caddy-kas/kubeproxy"
)

// How long allowed_agents answers are kept: GitLab's
// allowed_agent_cache_ttl and allowed_agent_cache_error_ttl (kas-spec §2.5).
const (
	DefaultAllowedAgentsCacheTTL      = 60 * time.Second
	DefaultAllowedAgentsCacheErrorTTL = 10 * time.Second
)

// How long authorize_proxy_user answers are kept. GitLab's own value is
// not known (kas-spec, facts not confirmed); these match allowed_agents:
// a revoked token or a closed session keeps working for at most a minute,
// and a refused one is asked about again after ten seconds.
const (
	DefaultProxyUserCacheTTL      = 60 * time.Second
	DefaultProxyUserCacheErrorTTL = 10 * time.Second
)

// Credential sources of GitLab's user access (kas-spec §2.6).
const (
	// SessionCookieName is the cookie Rails sets for the agent server.
	SessionCookieName = "_gitlab_kas"
	// AgentIDHeader and AgentIDQuery name the agent of a cookie request;
	// the query form is for browsers' WebSockets, which cannot set headers.
	AgentIDHeader = "Gitlab-Agent-Id"
	AgentIDQuery  = "gitlab-agent-id"
	// CSRFTokenHeader and CSRFTokenQuery carry the CSRF token that goes
	// with the cookie.
	CSRFTokenHeader = "X-Csrf-Token"
	CSRFTokenQuery  = "gitlab-csrf-token"
)

// Messages shown to clients; the proxy prefixes them with
// "GitLab Agent Server: ".
const (
	msgNoCredentials      = "Unauthorized: no valid credentials provided"
	msgCIUnauthorized     = "Unauthorized: CI job token"
	msgCIForbidden        = "Forbidden: CI job token"
	msgCINotFound         = "Not found: agents for CI job token"
	msgCIFailed           = "Failed to get allowed agents for CI job token"
	msgAgentNotAllowed    = "Forbidden: agentId is not allowed"
	msgUserUnauthorized   = "Unauthorized"
	msgUserFailed         = "Failed to authorize user session"
	msgUnsupportedAccess  = "Unsupported access_as in the agent's configuration"
	msgAuthorizationError = "Internal error authorizing the request"
	msgRateLimited        = "Too many requests: GitLab cannot be asked to authorize the request now; retry later"
)

// ProxyAuthenticator authenticates Kubernetes API proxy requests in GitLab
// mode: CI job tokens, personal access tokens and GitLab session cookies,
// each checked with GitLab (kas-spec §2.5, §2.6). It implements
// [kubeproxy.Authenticator].
type ProxyAuthenticator struct {
	Client *Client
	// AllowedAgentsCache keeps allowed_agents answers by the SHA-256 of
	// the job token; nil means no caching.
	AllowedAgentsCache *Cache[*AllowedAgents]
	// ProxyUserCache keeps authorize_proxy_user answers by the SHA-256 of
	// agent id, access type, access key and CSRF token; nil means no
	// caching.
	ProxyUserCache *Cache[*AuthorizeProxyUserResponse]
	// Usage counts authenticated requests; nil counts nothing.
	Usage *Usage
	// Logger receives failures of GitLab; never a secret. nil means no
	// logging.
	Logger *zap.Logger
}

// NewProxyAuthenticator returns an authenticator that asks c, with caches
// of the default TTLs ([DefaultAllowedAgentsCacheTTL],
// [DefaultProxyUserCacheTTL] and their error TTLs), counting requests in u
// (which may be nil).
func NewProxyAuthenticator(c *Client, u *Usage, logger *zap.Logger) *ProxyAuthenticator {
	return &ProxyAuthenticator{
		Client:             c,
		AllowedAgentsCache: NewCache[*AllowedAgents](DefaultAllowedAgentsCacheTTL, DefaultAllowedAgentsCacheErrorTTL),
		ProxyUserCache:     NewCache[*AuthorizeProxyUserResponse](DefaultProxyUserCacheTTL, DefaultProxyUserCacheErrorTTL),
		Usage:              u,
		Logger:             logger,
	}
}

func (a *ProxyAuthenticator) log() *zap.Logger {
	if a.Logger == nil {
		return zap.NewNop()
	}
	return a.Logger
}

// Authenticate implements [kubeproxy.Authenticator]. It looks for
// credentials in GitLab's order (kas-spec §2.6): any Authorization header
// (a malformed one is refused, with no fallback to the cookie), then the
// _gitlab_kas session cookie with its agent id and CSRF token. Every
// refusal is a [*kubeproxy.Error].
func (a *ProxyAuthenticator) Authenticate(r *http.Request) (*kubeproxy.Access, error) {
	if len(r.Header.Values("Authorization")) > 0 {
		cred, err := kubeproxy.ParseCredential(r.Header)
		if err != nil {
			return nil, err
		}
		switch cred.Kind {
		case kubeproxy.KindCIJob:
			return a.ciAccess(r.Context(), cred.AgentID, cred.Token)
		case kubeproxy.KindPAT:
			return a.userAccess(r.Context(), AccessPAT, AuthorizeProxyUserRequest{
				AgentID: cred.AgentID, AccessType: AccessTypePersonalAccessToken, AccessKey: cred.Token,
			})
		default:
			return nil, unauthorized("unknown credential kind", cred.AgentID)
		}
	}
	cookie, err := r.Cookie(SessionCookieName)
	if err != nil || cookie.Value == "" {
		return nil, unauthorized("no Authorization header and no session cookie", 0)
	}
	// Rack escapes cookie values as a form component ("+" for a space).
	key, err := url.QueryUnescape(cookie.Value)
	if err != nil || key == "" {
		return nil, unauthorized("session cookie is not URL-escaped correctly", 0)
	}
	query := r.URL.Query()
	idText, err := headerOrQuery(r.Header, AgentIDHeader, query, AgentIDQuery)
	if err != nil {
		return nil, unauthorized(err.Error(), 0)
	}
	if idText == "" {
		return nil, &kubeproxy.Error{Code: http.StatusUnauthorized,
			Message: "Unauthorized: " + AgentIDHeader + " header or " + AgentIDQuery + " query parameter is required with the session cookie",
			Reason:  "session cookie without an agent id"}
	}
	agentID, err := strconv.ParseInt(idText, 10, 64)
	if err != nil || agentID <= 0 {
		return nil, &kubeproxy.Error{Code: http.StatusUnauthorized,
			Message: "Unauthorized: agent id is not a positive integer",
			Reason:  "session cookie with a malformed agent id"}
	}
	csrf, err := headerOrQuery(r.Header, CSRFTokenHeader, query, CSRFTokenQuery)
	if err != nil {
		return nil, unauthorized(err.Error(), agentID)
	}
	if csrf == "" {
		return nil, &kubeproxy.Error{Code: http.StatusUnauthorized,
			Message: "Unauthorized: " + CSRFTokenHeader + " header or " + CSRFTokenQuery + " query parameter is required with the session cookie",
			Reason:  "session cookie without a CSRF token", AgentID: agentID}
	}
	return a.userAccess(r.Context(), AccessUser, AuthorizeProxyUserRequest{
		AgentID: agentID, AccessType: AccessTypeSessionCookie, AccessKey: key, CSRFToken: csrf,
	})
}

// headerOrQuery returns the value of header, or else of the query
// parameter; either given more than once is an error (kas-spec §2.6).
// The error names the header or parameter, not its values.
func headerOrQuery(h http.Header, header string, query url.Values, param string) (string, error) {
	switch vs := h.Values(header); len(vs) {
	case 0:
	case 1:
		return vs[0], nil
	default:
		return "", fmt.Errorf("%s header given more than once", header)
	}
	switch vs := query[param]; len(vs) {
	case 0:
		return "", nil
	case 1:
		return vs[0], nil
	default:
		return "", fmt.Errorf("%s query parameter given more than once", param)
	}
}

func unauthorized(reason string, agentID int64) *kubeproxy.Error {
	return &kubeproxy.Error{Code: http.StatusUnauthorized, Message: msgNoCredentials, Reason: reason, AgentID: agentID}
}

// ciAccess authorizes a CI job token for an agent (kas-spec §2.5).
func (a *ProxyAuthenticator) ciAccess(ctx context.Context, agentID int64, jobToken string) (*kubeproxy.Access, error) {
	aa, err := a.AllowedAgentsCache.Get(ctx, CacheKey("allowed_agents", jobToken), func(ctx context.Context) (*AllowedAgents, error) {
		return a.Client.AllowedAgents(ctx, jobToken)
	})
	if err != nil {
		e := &kubeproxy.Error{AgentID: agentID, Reason: "allowed_agents: " + err.Error()}
		if wait, ok := rateLimited(err); ok {
			e.Code, e.Message, e.RetryAfter = http.StatusTooManyRequests, msgRateLimited, wait
			return nil, e
		}
		switch statusCode(err) {
		case http.StatusUnauthorized:
			e.Code, e.Message = http.StatusUnauthorized, msgCIUnauthorized
		case http.StatusForbidden:
			e.Code, e.Message = http.StatusForbidden, msgCIForbidden
		case http.StatusNotFound:
			e.Code, e.Message = http.StatusNotFound, msgCINotFound
		default:
			e.Code, e.Message = http.StatusInternalServerError, msgCIFailed
			a.gitlabFailed(ctx, PathAllowedAgents, agentID, err)
		}
		return nil, e
	}
	var agent *AllowedAgent
	for i := range aa.AllowedAgents {
		if aa.AllowedAgents[i].ID == agentID {
			agent = &aa.AllowedAgents[i]
			break
		}
	}
	if agent == nil {
		return nil, &kubeproxy.Error{Code: http.StatusForbidden, Message: msgAgentNotAllowed, AgentID: agentID,
			Reason: fmt.Sprintf("ci job %d (project %d) may not use agent %d", aa.Job.ID, aa.Project.ID, agentID)}
	}
	id, allowImpersonation, err := CIAccessIdentity(aa, agent)
	if err != nil {
		a.log().Error("cannot honour the agent's ci_access configuration",
			zap.Int64("agent_id", agentID), zap.Int64("ci_job_id", aa.Job.ID), zap.Error(err))
		return nil, &kubeproxy.Error{Code: http.StatusInternalServerError, Message: msgUnsupportedAccess, AgentID: agentID,
			Reason: err.Error()}
	}
	a.Usage.ProxyRequest(AccessCI, aa.User.ID, agentID)
	return &kubeproxy.Access{
		AgentID:                  agentID,
		Identity:                 id,
		AllowClientImpersonation: allowImpersonation,
		Principal:                fmt.Sprintf("ci job %d (user %d)", aa.Job.ID, aa.User.ID),
	}, nil
}

// userAccess authorizes a personal access token or a session cookie for
// an agent (kas-spec §2.6).
func (a *ProxyAuthenticator) userAccess(ctx context.Context, kind AccessKind, req AuthorizeProxyUserRequest) (*kubeproxy.Access, error) {
	key := CacheKey("authorize_proxy_user", strconv.FormatInt(req.AgentID, 10), req.AccessType, req.AccessKey, req.CSRFToken)
	resp, err := a.ProxyUserCache.Get(ctx, key, func(ctx context.Context) (*AuthorizeProxyUserResponse, error) {
		return a.Client.AuthorizeProxyUser(ctx, req)
	})
	if err != nil {
		if wait, ok := rateLimited(err); ok {
			// Not the user's answer: GitLab was not asked (api_rate_limit).
			return nil, &kubeproxy.Error{Code: http.StatusTooManyRequests, Message: msgRateLimited, AgentID: req.AgentID,
				Reason: "authorize_proxy_user (" + req.AccessType + "): " + err.Error(), RetryAfter: wait}
		}
		switch code := statusCode(err); {
		case jwtRejected(err):
			// The agent server's fault, not the user's (kas-spec §2.2).
			a.gitlabFailed(ctx, PathAuthorizeProxyUser, req.AgentID, err)
			return nil, &kubeproxy.Error{Code: http.StatusInternalServerError, Message: msgUserFailed, AgentID: req.AgentID,
				Reason: "authorize_proxy_user: GitLab refused the agent server's JWT (wrong shared secret?): " + err.Error()}
		case code == http.StatusUnauthorized, code == http.StatusForbidden, code == http.StatusNotFound:
			// All three are 401 for the client, so that it cannot tell an
			// agent it may not use from one that does not exist.
			return nil, &kubeproxy.Error{Code: http.StatusUnauthorized, Message: msgUserUnauthorized, AgentID: req.AgentID,
				Reason: "authorize_proxy_user (" + req.AccessType + "): " + err.Error()}
		default:
			a.gitlabFailed(ctx, PathAuthorizeProxyUser, req.AgentID, err)
			return nil, &kubeproxy.Error{Code: http.StatusInternalServerError, Message: msgUserFailed, AgentID: req.AgentID,
				Reason: "authorize_proxy_user (" + req.AccessType + "): " + err.Error()}
		}
	}
	if resp.Agent.ID != req.AgentID {
		a.log().Error("GitLab authorized a user for another agent than asked",
			zap.String("gitlab_path", PathAuthorizeProxyUser), zap.Int64("agent_id", req.AgentID),
			zap.Int64("authorized_agent_id", resp.Agent.ID))
		return nil, &kubeproxy.Error{Code: http.StatusInternalServerError, Message: msgAuthorizationError, AgentID: req.AgentID,
			Reason: fmt.Sprintf("authorize_proxy_user answered for agent %d", resp.Agent.ID)}
	}
	id, allowImpersonation, err := UserAccessIdentity(resp, req.AccessType)
	if err != nil {
		a.log().Error("cannot honour the agent's user_access configuration",
			zap.Int64("agent_id", req.AgentID), zap.Int64("user_id", resp.User.ID), zap.Error(err))
		return nil, &kubeproxy.Error{Code: http.StatusInternalServerError, Message: msgUnsupportedAccess, AgentID: req.AgentID,
			Reason: err.Error()}
	}
	a.Usage.ProxyRequest(kind, resp.User.ID, req.AgentID)
	via := "pat"
	if kind == AccessUser {
		via = "session cookie"
	}
	return &kubeproxy.Access{
		AgentID:                  req.AgentID,
		Identity:                 id,
		AllowClientImpersonation: allowImpersonation,
		Principal:                fmt.Sprintf("user %d (%s)", resp.User.ID, via),
	}, nil
}

// gitlabFailed logs a failure to get an answer from GitLab, unless it is
// only that the client went away.
func (a *ProxyAuthenticator) gitlabFailed(ctx context.Context, path string, agentID int64, err error) {
	if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
		return
	}
	fields := []zap.Field{zap.String("gitlab_path", path), zap.Int64("agent_id", agentID), zap.Error(err)}
	if code := statusCode(err); code != 0 {
		fields = append(fields, zap.Int("status", code))
	}
	a.log().Warn("GitLab did not answer the authorization request", fields...)
}

var _ kubeproxy.Authenticator = (*ProxyAuthenticator)(nil)
