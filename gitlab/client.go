package gitlab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
	"unicode/utf8"

	"golang.org/x/net/http/httpguts"
)

// Paths of GitLab's REST API that the agent server calls (kas-spec §2.1,
// §2.5, §2.6, §7).
const (
	PathAgentInfo          = "/api/v4/internal/kubernetes/agent_info"
	PathAllowedAgents      = "/api/v4/job/allowed_agents"
	PathAuthorizeProxyUser = "/api/v4/internal/kubernetes/authorize_proxy_user"
	PathUsageMetrics       = "/api/v4/internal/kubernetes/usage_metrics"
	PathAgentConfiguration = "/api/v4/internal/kubernetes/agent_configuration"
)

// maxResponseBody bounds how much of a GitLab answer is read. Every answer
// the agent server expects is a few kilobytes.
const maxResponseBody = 1 << 20

// maxErrorMessage bounds the part of GitLab's error message kept in an
// [Error].
const maxErrorMessage = 256

// defaultHTTPClient is used when Client.HTTPClient is nil. It has timeouts,
// unlike http.DefaultClient, and does not follow redirects: GitLab's
// internal API does not redirect, and following one would send the
// request's credentials to wherever it points.
var defaultHTTPClient = &http.Client{
	Transport: func() http.RoundTripper {
		t := http.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = 15 * time.Second
		return t
	}(),
	Timeout:       20 * time.Second,
	CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
}

// Client calls GitLab's REST API on behalf of the agent server. Its zero
// value is not usable: BaseURL and Secret must be set. It is safe for
// concurrent use once set up.
type Client struct {
	// BaseURL is GitLab's internal URL, such as
	// http://gitlab-workhorse:8181; it may end in the path of a relative
	// URL root.
	BaseURL *url.URL
	// HTTPClient makes the requests; nil means a client with timeouts that
	// does not follow redirects.
	HTTPClient *http.Client
	// Secret is GitLab's KAS shared secret (see [LoadSecretFile]); it
	// signs the [JWTRequestHeader] token.
	Secret []byte
	// UserAgent identifies the agent server, as
	// "gitlab-kas/<version>/<commit>" (kas-spec §2.2).
	UserAgent string
	// Now tells the time for the JWT; nil means time.Now.
	Now func() time.Time
	// Observer, if set, is told about every call, for metrics.
	Observer Observer
	// Limiter, if set, bounds the rate of calls: a call it has no token
	// for is not made, and fails with a [*RateLimitError]. Only the calls
	// themselves count; answers a [Cache] gives cost nothing. nil means no
	// limit.
	Limiter *RateLimiter
}

// Observer is told about the calls a [Client] makes.
type Observer interface {
	// GitLabCall reports one call to path (a Path* constant): GitLab's
	// HTTP status, or 0 if no answer came, and how long it took.
	GitLabCall(path string, code int, took time.Duration)
	// GitLabRateLimited reports a call to path that was not made because
	// the [Client.Limiter] had no token for it.
	GitLabRateLimited(path string)
}

// Error is a non-2xx answer of GitLab.
type Error struct {
	// Path is the API path called, without query.
	Path string
	// StatusCode is GitLab's HTTP status.
	StatusCode int
	// Message is GitLab's explanation (the "message" or "error" field of
	// its JSON answer), truncated; empty if it gave none.
	Message string
}

func (e *Error) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("gitlab %s: status %d", e.Path, e.StatusCode)
	}
	return fmt.Sprintf("gitlab %s: status %d: %s", e.Path, e.StatusCode, e.Message)
}

// railsJWTInvalid is the message of Rails' 401 for a [JWTRequestHeader]
// token it cannot verify (Gitlab::Kas.verify_api_request, kas-spec §2.2).
// It is GitLab's documented answer, and the only way to tell a wrong
// shared secret from a wrong agent token or personal access token, which
// also get 401.
const railsJWTInvalid = "KAS JWT authentication invalid"

// JWTRejected reports whether GitLab refused the agent server's own JWT,
// which means the shared secret is not GitLab's, rather than the
// credential the request was about.
func (e *Error) JWTRejected() bool {
	return e.StatusCode == http.StatusUnauthorized && e.Message == railsJWTInvalid
}

// jwtRejected reports whether err holds an [*Error] for which
// [Error.JWTRejected] is true.
func jwtRejected(err error) bool {
	var e *Error
	return errors.As(err, &e) && e.JWTRejected()
}

// statusCode returns the HTTP status of a GitLab [*Error] in err's chain,
// or 0 if there is none.
func statusCode(err error) int {
	var e *Error
	if errors.As(err, &e) {
		return e.StatusCode
	}
	return 0
}

// AgentInfo asks GitLab which agent agentToken belongs to (kas-spec §2.1).
// Each successful call also marks the token as used, which GitLab's UI
// shows as the agent being connected (kas-spec §7). GitLab answers 401
// for a token that is unknown or revoked.
func (c *Client) AgentInfo(ctx context.Context, agentToken string) (*AgentInfo, error) {
	if err := checkCredential("agent token", agentToken); err != nil {
		return nil, err
	}
	h := http.Header{"Authorization": {"Bearer " + agentToken}}
	var info AgentInfo
	if err := c.do(ctx, http.MethodGet, PathAgentInfo, h, nil, true, &info); err != nil {
		return nil, err
	}
	return &info, nil
}

// AllowedAgents asks GitLab which agents the CI job with jobToken may use
// (kas-spec §2.5). The job token is the only credential: this call carries
// no [JWTRequestHeader], as in GitLab's own agent server.
func (c *Client) AllowedAgents(ctx context.Context, jobToken string) (*AllowedAgents, error) {
	if err := checkCredential("job token", jobToken); err != nil {
		return nil, err
	}
	h := http.Header{"Job-Token": {jobToken}}
	var aa AllowedAgents
	if err := c.do(ctx, http.MethodGet, PathAllowedAgents, h, nil, false, &aa); err != nil {
		return nil, err
	}
	return &aa, nil
}

// AuthorizeProxyUser asks GitLab whether the user with a session cookie or
// personal access token may use an agent through the Kubernetes API proxy,
// and as whom (kas-spec §2.6).
func (c *Client) AuthorizeProxyUser(ctx context.Context, req AuthorizeProxyUserRequest) (*AuthorizeProxyUserResponse, error) {
	var resp AuthorizeProxyUserResponse
	if err := c.do(ctx, http.MethodPost, PathAuthorizeProxyUser, nil, req, true, &resp); err != nil {
		return nil, err
	}
	return &resp, nil
}

// SendUsageMetrics posts usage counters to GitLab (kas-spec §7). GitLab
// answers 204; any 2xx is success.
func (c *Client) SendUsageMetrics(ctx context.Context, u *UsageMetrics) error {
	return c.do(ctx, http.MethodPost, PathUsageMetrics, nil, u, true, nil)
}

// PostAgentConfiguration tells GitLab of an agent's new configuration, so
// that Rails refreshes the agent's ci_access and user_access
// authorizations from it (kas-spec §3.1). body is the JSON of
// agentconfig.RailsBody. GitLab answers 204; its 404, for an agent deleted
// since, is not an error, as GitLab's own agent server ignores it.
func (c *Client) PostAgentConfiguration(ctx context.Context, body json.RawMessage) error {
	err := c.do(ctx, http.MethodPost, PathAgentConfiguration, nil, body, true, nil)
	if statusCode(err) == http.StatusNotFound {
		return nil
	}
	return err
}

// checkCredential refuses a credential that cannot be sent in a header, so
// that the HTTP library never gets to describe it.
func checkCredential(what, v string) error {
	if v == "" {
		return fmt.Errorf("empty %s", what)
	}
	if !httpguts.ValidHeaderFieldValue(v) {
		return fmt.Errorf("%s has characters not allowed in an HTTP header", what)
	}
	return nil
}

// do sends one request to GitLab and decodes its JSON answer into out
// (unless out is nil). body, if not nil, is sent as JSON. withJWT adds the
// [JWTRequestHeader] token.
func (c *Client) do(ctx context.Context, method, path string, h http.Header, body any, withJWT bool, out any) error {
	if c.BaseURL == nil {
		return errors.New("gitlab client has no base URL")
	}
	if ok, wait := c.Limiter.Take(); !ok {
		if c.Observer != nil {
			c.Observer.GitLabRateLimited(path)
		}
		return &RateLimitError{Path: path, Wait: wait}
	}
	u := c.BaseURL.JoinPath(path)
	u.RawQuery, u.Fragment, u.RawFragment = "", "", ""

	var reqBody io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return fmt.Errorf("encoding gitlab %s request: %w", path, err)
		}
		reqBody = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), reqBody)
	if err != nil {
		return fmt.Errorf("gitlab %s: %w", path, err)
	}
	for k, vs := range h {
		req.Header[k] = vs
	}
	req.Header.Set("Accept", "application/json")
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.UserAgent != "" {
		req.Header.Set("User-Agent", c.UserAgent)
	}
	if withJWT {
		now := time.Now
		if c.Now != nil {
			now = c.Now
		}
		token, err := KASRequestToken(c.Secret, now())
		if err != nil {
			return fmt.Errorf("gitlab %s: %w", path, err)
		}
		req.Header.Set(JWTRequestHeader, token)
	}

	hc := c.HTTPClient
	if hc == nil {
		hc = defaultHTTPClient
	}
	start := time.Now()
	resp, err := hc.Do(req)
	if c.Observer != nil {
		code := 0
		if err == nil {
			code = resp.StatusCode
		}
		c.Observer.GitLabCall(path, code, time.Since(start))
	}
	if err != nil {
		// *url.Error names the URL, which holds no credential (net/http
		// removes a password from it).
		return fmt.Errorf("gitlab %s: %w", path, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponseBody+1))
	if err != nil {
		return fmt.Errorf("reading gitlab %s answer: %w", path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return &Error{Path: path, StatusCode: resp.StatusCode, Message: errorMessage(data)}
	}
	if len(data) > maxResponseBody {
		return fmt.Errorf("gitlab %s: answer larger than %d bytes", path, maxResponseBody)
	}
	if out == nil {
		return nil
	}
	// Unknown fields are ignored: Rails adds fields over time.
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("decoding gitlab %s answer: %w", path, err)
	}
	return nil
}

// errorMessage extracts GitLab's explanation from an error answer: Grape
// puts it in "message" (a string, or an object for validation errors) or
// in "error".
func errorMessage(body []byte) string {
	var fields struct {
		Message json.RawMessage `json:"message"`
		Error   json.RawMessage `json:"error"`
	}
	if json.Unmarshal(body, &fields) != nil {
		return ""
	}
	raw := fields.Message
	if len(raw) == 0 || string(raw) == "null" {
		raw = fields.Error
	}
	if len(raw) == 0 || string(raw) == "null" {
		return ""
	}
	var s string
	if json.Unmarshal(raw, &s) != nil {
		var compact bytes.Buffer
		if json.Compact(&compact, raw) != nil {
			return ""
		}
		s = compact.String()
	}
	return truncate(s, maxErrorMessage)
}

// truncate cuts s to at most n bytes without splitting a UTF-8 sequence.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	cut := n
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return strings.ToValidUTF8(s[:cut], "") + "…"
}
