package gitlab

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/caddy-kas/caddy-kas/identity"
	"github.com/caddy-kas/caddy-kas/kubeproxy"
)

const allowedAgentsJSON = `{ "allowed_agents": [
    { "id": 5, "config_project": {"id": 3}, "configuration": {"default_namespace": "ns", "access_as": {"ci_job": {}}} },
    { "id": 6, "config_project": {"id": 3}, "configuration": {"access_as": {"agent": {}}} },
    { "id": 8, "config_project": {"id": 3}, "configuration": {"access_as": {"ci_user": {}}} } ],
  "job": {"id": 31}, "pipeline": {"id": 61},
  "project": {"id": 150, "groups": [{"id": 23}]},
  "user": {"id": 7, "username": "root", "roles_in_project": ["developer"]} }`

// proxyUserAnswer builds an authorize_proxy_user answer for the agent of
// the request.
func proxyUserAnswer(t *testing.T, accessAs string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		var req AuthorizeProxyUserRequest
		if err := json.Unmarshal(readBody(t, r), &req); err != nil {
			t.Error(err)
		}
		body := `{"agent": {"id": ` + itoa(req.AgentID) + `, "config_project": {"id": 1234}}, "user": {"id": 7, "username": "the-user"}`
		if accessAs != "" {
			body += `, "access_as": ` + accessAs
		}
		jsonAnswer(http.StatusOK, body+`}`)(w, r)
	}
}

// recordingProxyUser answers authorize_proxy_user like proxyUserAnswer and
// records the requests.
type recordingProxyUser struct {
	mu   sync.Mutex // guards reqs
	reqs []AuthorizeProxyUserRequest
}

func (rp *recordingProxyUser) handler(t *testing.T) http.HandlerFunc {
	next := proxyUserAnswer(t, `{"agent": {}}`)
	return func(w http.ResponseWriter, r *http.Request) {
		var req AuthorizeProxyUserRequest
		if err := json.Unmarshal(readBody(t, r), &req); err != nil {
			t.Error(err)
		}
		rp.mu.Lock()
		rp.reqs = append(rp.reqs, req)
		rp.mu.Unlock()
		next(w, r)
	}
}

func (rp *recordingProxyUser) last() (AuthorizeProxyUserRequest, int) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	if len(rp.reqs) == 0 {
		return AuthorizeProxyUserRequest{}, 0
	}
	return rp.reqs[len(rp.reqs)-1], len(rp.reqs)
}

func newRequest(target string, header http.Header) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "http://kas.example.com"+target, nil)
	for k, vs := range header {
		r.Header[k] = vs
	}
	return r
}

func TestProxyAuthenticatorCI(t *testing.T) {
	tests := []struct {
		name        string
		status      int
		body        string
		auth        string
		want        *kubeproxy.Access
		wantCode    int
		wantMessage string
	}{
		{
			name: "ci_job", status: 200, body: allowedAgentsJSON, auth: "Bearer ci:5:job-token-secret",
			want: &kubeproxy.Access{AgentID: 5, Principal: "ci job 31 (user 7)", Identity: &identity.Identity{
				Username: "gitlab:ci_job:31",
				Groups:   []string{"gitlab:ci_job", "gitlab:group:23", "gitlab:project:150"},
				Extra: map[string][]string{
					"agent.gitlab.com/id": {"5"}, "agent.gitlab.com/config_project_id": {"3"},
					"agent.gitlab.com/project_id": {"150"}, "agent.gitlab.com/ci_pipeline_id": {"61"},
					"agent.gitlab.com/ci_job_id": {"31"}, "agent.gitlab.com/username": {"root"},
				},
			}},
		},
		{
			name: "agent", status: 200, body: allowedAgentsJSON, auth: "Bearer ci:6:job-token-secret",
			want: &kubeproxy.Access{AgentID: 6, AllowClientImpersonation: true, Principal: "ci job 31 (user 7)"},
		},
		{name: "agent not allowed", status: 200, body: allowedAgentsJSON, auth: "Bearer ci:9:job-token-secret",
			wantCode: 403, wantMessage: "Forbidden: agentId is not allowed"},
		{name: "unsupported access_as", status: 200, body: allowedAgentsJSON, auth: "Bearer ci:8:job-token-secret",
			wantCode: 500},
		{name: "gitlab 401", status: 401, body: `{"message":"401 Unauthorized"}`, auth: "Bearer ci:5:job-token-secret",
			wantCode: 401, wantMessage: "Unauthorized: CI job token"},
		{name: "gitlab 403", status: 403, auth: "Bearer ci:5:job-token-secret", wantCode: 403},
		{name: "gitlab 404", status: 404, auth: "Bearer ci:5:job-token-secret",
			wantCode: 404, wantMessage: "Not found: agents for CI job token"},
		{name: "gitlab 500", status: 500, auth: "Bearer ci:5:job-token-secret", wantCode: 500},
		{name: "gitlab 400", status: 400, auth: "Bearer ci:5:job-token-secret", wantCode: 500},
		{name: "malformed authorization", auth: "Bearer ci:x:job-token-secret", wantCode: 401},
		{name: "unknown kind", auth: "Bearer oidc:5:job-token-secret", wantCode: 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			f.handle(PathAllowedAgents, jsonAnswer(tt.status, tt.body))
			usage := NewUsage()
			a := NewProxyAuthenticator(f.client(), usage, zap.NewNop())
			// A cookie as well: an Authorization header wins, malformed or not.
			r := newRequest("/api", http.Header{"Authorization": {tt.auth}, "Gitlab-Agent-Id": {"5"}, "X-Csrf-Token": {"c"},
				"Cookie": {"_gitlab_kas=session"}})
			access, err := a.Authenticate(r)
			checkAccess(t, access, err, tt.want, tt.wantCode, tt.wantMessage, "job-token-secret")
			if tt.want != nil {
				m := usage.Take()
				if m.Counters["k8s_api_proxy_requests_via_ci_access"] != 1 ||
					!reflect.DeepEqual(m.UniqueCounters["agent_users_using_ci_tunnel"], []int64{7}) ||
					!reflect.DeepEqual(m.UniqueCounters["k8s_api_proxy_requests_unique_agents_via_ci_access"], []int64{tt.want.AgentID}) {
					t.Errorf("usage %+v", m)
				}
			} else if m := usage.Take(); m != nil {
				t.Errorf("refused request counted: %+v", m)
			}
		})
	}
}

// checkAccess compares an Authenticate result with what is wanted.
func checkAccess(t *testing.T, access *kubeproxy.Access, err error, want *kubeproxy.Access, wantCode int, wantMessage, secret string) {
	t.Helper()
	if want != nil {
		if err != nil {
			t.Fatalf("error %v", err)
		}
		if !reflect.DeepEqual(access, want) {
			t.Errorf("access\n%+v\nwant\n%+v", access, want)
			if access != nil {
				t.Errorf("identity %+v", access.Identity)
			}
		}
		return
	}
	var kerr *kubeproxy.Error
	if !errors.As(err, &kerr) {
		t.Fatalf("error %v (%T), want a *kubeproxy.Error; access %+v", err, err, access)
	}
	if access != nil {
		t.Errorf("access %+v with an error", access)
	}
	if kerr.Code != wantCode {
		t.Errorf("code %d, want %d (%v)", kerr.Code, wantCode, kerr)
	}
	if wantMessage != "" && kerr.Message != wantMessage {
		t.Errorf("message %q, want %q", kerr.Message, wantMessage)
	}
	if secret != "" && (strings.Contains(kerr.Message, secret) || strings.Contains(kerr.Reason, secret)) {
		t.Errorf("error %+v contains the secret", kerr)
	}
}

func TestProxyAuthenticatorPAT(t *testing.T) {
	tests := []struct {
		name     string
		handler  func(t *testing.T) http.HandlerFunc
		auth     string
		want     *kubeproxy.Access
		wantCode int
	}{
		{
			name:    "access_as agent",
			handler: func(t *testing.T) http.HandlerFunc { return proxyUserAnswer(t, `{"agent": {}}`) },
			auth:    "Bearer pat:9999:glpat-secret",
			want:    &kubeproxy.Access{AgentID: 9999, AllowClientImpersonation: true, Principal: "user 7 (pat)"},
		},
		{
			name:    "access_as absent",
			handler: func(t *testing.T) http.HandlerFunc { return proxyUserAnswer(t, "") },
			auth:    "Bearer pat:9999:glpat-secret",
			want:    &kubeproxy.Access{AgentID: 9999, AllowClientImpersonation: true, Principal: "user 7 (pat)"},
		},
		{
			name: "access_as user",
			handler: func(t *testing.T) http.HandlerFunc {
				return proxyUserAnswer(t, `{"user": {"projects": [{"id": 1, "roles": ["developer"]}], "groups": []}}`)
			},
			auth: "Bearer pat:9999:glpat-secret",
			want: &kubeproxy.Access{AgentID: 9999, Principal: "user 7 (pat)", Identity: &identity.Identity{
				Username: "gitlab:user:the-user",
				Groups:   []string{"gitlab:user", "gitlab:project_role:1:developer"},
				Extra: map[string][]string{
					"agent.gitlab.com/id": {"9999"}, "agent.gitlab.com/username": {"the-user"},
					"agent.gitlab.com/access_type": {"personal_access_token"}, "agent.gitlab.com/config_project_id": {"1234"},
				},
			}},
		},
		{name: "gitlab 401", handler: answer(401), auth: "Bearer pat:9999:glpat-secret", wantCode: 401},
		{name: "gitlab 403", handler: answer(403), auth: "Bearer pat:9999:glpat-secret", wantCode: 401},
		{name: "gitlab 404", handler: answer(404), auth: "Bearer pat:9999:glpat-secret", wantCode: 401},
		{name: "gitlab 400", handler: answer(400), auth: "Bearer pat:9999:glpat-secret", wantCode: 500},
		{
			name: "gitlab refuses our JWT",
			handler: func(*testing.T) http.HandlerFunc {
				return jsonAnswer(401, `{"message":"KAS JWT authentication invalid"}`)
			},
			auth: "Bearer pat:9999:glpat-secret", wantCode: 500,
		},
		{name: "gitlab 502", handler: answer(502), auth: "Bearer pat:9999:glpat-secret", wantCode: 500},
		{
			name: "answer for another agent",
			handler: func(t *testing.T) http.HandlerFunc {
				return jsonAnswer(200, `{"agent": {"id": 1, "config_project": {"id": 2}}, "user": {"id": 7, "username": "u"}, "access_as": {"agent": {}}}`)
			},
			auth: "Bearer pat:9999:glpat-secret", wantCode: 500,
		},
		{name: "empty token", auth: "Bearer pat:9999:", wantCode: 401},
		{name: "two headers", auth: "", wantCode: 401},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			if tt.handler != nil {
				f.handle(PathAuthorizeProxyUser, tt.handler(t))
			}
			a := NewProxyAuthenticator(f.client(), NewUsage(), nil)
			h := http.Header{"Authorization": {tt.auth}}
			if tt.auth == "" {
				h["Authorization"] = []string{"Bearer pat:9999:a", "Bearer pat:9999:b"}
			}
			access, err := a.Authenticate(newRequest("/api/v1/pods", h))
			checkAccess(t, access, err, tt.want, tt.wantCode, "", "glpat-secret")
			if tt.wantCode == 401 && tt.handler != nil {
				var kerr *kubeproxy.Error
				errors.As(err, &kerr)
				if kerr.Message != msgUserUnauthorized {
					t.Errorf("message %q: 401, 403 and 404 must all look the same", kerr.Message)
				}
			}
			if tt.handler == nil && f.callCount(PathAuthorizeProxyUser) != 0 {
				t.Error("GitLab asked about a malformed credential")
			}
		})
	}
}

func answer(status int) func(t *testing.T) http.HandlerFunc {
	return func(*testing.T) http.HandlerFunc { return jsonAnswer(status, `{"message":"no"}`) }
}

func TestProxyAuthenticatorCookie(t *testing.T) {
	tests := []struct {
		name     string
		target   string
		header   http.Header
		wantReq  *AuthorizeProxyUserRequest
		wantCode int
		wantMsg  string
	}{
		{
			name:    "headers",
			target:  "/api",
			header:  http.Header{"Cookie": {"_gitlab_kas=abc%2Fdef%3D%3D"}, "Gitlab-Agent-Id": {"42"}, "X-Csrf-Token": {"csrf-1"}},
			wantReq: &AuthorizeProxyUserRequest{AgentID: 42, AccessType: "session_cookie", AccessKey: "abc/def==", CSRFToken: "csrf-1"},
		},
		{
			name:    "query (browser WebSocket)",
			target:  "/api/v1/namespaces/x/pods/y/exec?command=sh&gitlab-agent-id=42&gitlab-csrf-token=csrf%2B2",
			header:  http.Header{"Cookie": {"other=1; _gitlab_kas=a+b"}},
			wantReq: &AuthorizeProxyUserRequest{AgentID: 42, AccessType: "session_cookie", AccessKey: "a b", CSRFToken: "csrf+2"},
		},
		{
			name:    "headers win over query",
			target:  "/api?gitlab-agent-id=1&gitlab-csrf-token=q",
			header:  http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"42"}, "X-Csrf-Token": {"h"}},
			wantReq: &AuthorizeProxyUserRequest{AgentID: 42, AccessType: "session_cookie", AccessKey: "s", CSRFToken: "h"},
		},
		{
			name:    "header for one, query for the other",
			target:  "/api?gitlab-csrf-token=q",
			header:  http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"42"}},
			wantReq: &AuthorizeProxyUserRequest{AgentID: 42, AccessType: "session_cookie", AccessKey: "s", CSRFToken: "q"},
		},
		{name: "repeated agent id header", target: "/api",
			header:   http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"42", "43"}, "X-Csrf-Token": {"h"}},
			wantCode: 401},
		{name: "repeated csrf header", target: "/api",
			header:   http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"42"}, "X-Csrf-Token": {"h", "i"}},
			wantCode: 401},
		{name: "repeated agent id query", target: "/api?gitlab-agent-id=1&gitlab-agent-id=2&gitlab-csrf-token=q",
			header: http.Header{"Cookie": {"_gitlab_kas=s"}}, wantCode: 401},
		{name: "no agent id", target: "/api", header: http.Header{"Cookie": {"_gitlab_kas=s"}, "X-Csrf-Token": {"h"}}, wantCode: 401},
		{name: "bad agent id", target: "/api", header: http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"4x"}, "X-Csrf-Token": {"h"}}, wantCode: 401},
		{name: "no csrf token", target: "/api", header: http.Header{"Cookie": {"_gitlab_kas=s"}, "Gitlab-Agent-Id": {"42"}}, wantCode: 401},
		{name: "badly escaped cookie", target: "/api", header: http.Header{"Cookie": {"_gitlab_kas=%zz"}, "Gitlab-Agent-Id": {"42"}, "X-Csrf-Token": {"h"}}, wantCode: 401},
		{name: "agent id and csrf without cookie", target: "/api", header: http.Header{"Gitlab-Agent-Id": {"42"}, "X-Csrf-Token": {"h"}},
			wantCode: 401, wantMsg: "Unauthorized: no valid credentials provided"},
		{name: "nothing", target: "/api", header: http.Header{}, wantCode: 401, wantMsg: "Unauthorized: no valid credentials provided"},
		{name: "other cookie only", target: "/api", header: http.Header{"Cookie": {"_gitlab_session=x"}}, wantCode: 401,
			wantMsg: "Unauthorized: no valid credentials provided"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFakeGitLab(t, "")
			var rec recordingProxyUser
			f.handle(PathAuthorizeProxyUser, rec.handler(t))
			usage := NewUsage()
			a := NewProxyAuthenticator(f.client(), usage, nil)
			access, err := a.Authenticate(newRequest(tt.target, tt.header))
			got, calls := rec.last()
			if tt.wantReq == nil {
				checkAccess(t, access, err, nil, tt.wantCode, tt.wantMsg, "")
				if calls != 0 {
					t.Errorf("GitLab asked: %+v", got)
				}
				return
			}
			want := &kubeproxy.Access{AgentID: tt.wantReq.AgentID, AllowClientImpersonation: true, Principal: "user 7 (session cookie)"}
			checkAccess(t, access, err, want, 0, "", "")
			if got != *tt.wantReq {
				t.Errorf("GitLab asked %+v, want %+v", got, *tt.wantReq)
			}
			if m := usage.Take(); m.Counters["k8s_api_proxy_requests_via_user_access"] != 1 ||
				!reflect.DeepEqual(m.UniqueCounters["k8s_api_proxy_requests_unique_users_via_user_access"], []int64{7}) {
				t.Errorf("usage %+v", m)
			}
		})
	}
}

func TestProxyAuthenticatorCaches(t *testing.T) {
	f := newFakeGitLab(t, "")
	var rec recordingProxyUser
	f.handle(PathAuthorizeProxyUser, rec.handler(t))
	f.handle(PathAllowedAgents, jsonAnswer(200, allowedAgentsJSON))
	usage := NewUsage()
	a := NewProxyAuthenticator(f.client(), usage, nil)
	auth := func(h http.Header) {
		t.Helper()
		if _, err := a.Authenticate(newRequest("/api", h)); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		auth(http.Header{"Authorization": {"Bearer pat:1:tok"}})
		auth(http.Header{"Authorization": {"Bearer ci:5:job"}})
		auth(http.Header{"Authorization": {"Bearer ci:6:job"}}) // same job token, other agent: same answer
	}
	if n := f.callCount(PathAuthorizeProxyUser); n != 1 {
		t.Errorf("%d authorize_proxy_user calls, want 1", n)
	}
	if n := f.callCount(PathAllowedAgents); n != 1 {
		t.Errorf("%d allowed_agents calls, want 1", n)
	}
	// Anything else in the key is another question.
	auth(http.Header{"Authorization": {"Bearer pat:2:tok"}})
	auth(http.Header{"Cookie": {"_gitlab_kas=tok"}, "Gitlab-Agent-Id": {"1"}, "X-Csrf-Token": {"a"}})
	auth(http.Header{"Cookie": {"_gitlab_kas=tok"}, "Gitlab-Agent-Id": {"1"}, "X-Csrf-Token": {"b"}})
	if n := f.callCount(PathAuthorizeProxyUser); n != 4 {
		t.Errorf("%d authorize_proxy_user calls, want 4", n)
	}
	m := usage.Take()
	want := map[string]int64{
		"k8s_api_proxy_request":                  12,
		"k8s_api_proxy_requests_via_ci_access":   6,
		"k8s_api_proxy_requests_via_pat_access":  4,
		"k8s_api_proxy_requests_via_user_access": 2,
		"flux_git_push_notifications_total":      0,
	}
	if !reflect.DeepEqual(m.Counters, want) {
		t.Errorf("counters %v, want %v", m.Counters, want)
	}
}

func TestProxyAuthenticatorClientGone(t *testing.T) {
	f := newFakeGitLab(t, "")
	started, release := make(chan struct{}), make(chan struct{})
	f.handle(PathAllowedAgents, func(w http.ResponseWriter, r *http.Request) {
		close(started)
		<-release
		jsonAnswer(200, allowedAgentsJSON)(w, r)
	})
	a := NewProxyAuthenticator(f.client(), nil, nil)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		_, err := a.Authenticate(newRequest("/api", http.Header{"Authorization": {"Bearer ci:5:job"}}).WithContext(ctx))
		errc <- err
	}()
	<-started
	cancel() // the client goes away while GitLab thinks
	var kerr *kubeproxy.Error
	if err := <-errc; !errors.As(err, &kerr) || kerr.Code != 500 {
		t.Errorf("error %v", err)
	}
	close(release)
	// The call went on and its answer serves the next request.
	if _, err := a.Authenticate(newRequest("/api", http.Header{"Authorization": {"Bearer ci:5:job"}})); err != nil {
		t.Errorf("after a client went away: %v", err)
	}
	if n := f.callCount(PathAllowedAgents); n != 1 {
		t.Errorf("%d allowed_agents calls, want 1", n)
	}
}

func TestProxyAuthenticatorLogs(t *testing.T) {
	f := newFakeGitLab(t, "")
	f.handle(PathAuthorizeProxyUser, jsonAnswer(http.StatusBadGateway, `{"message":"502 Bad Gateway"}`))
	core, logs := observer.New(zap.DebugLevel)
	a := NewProxyAuthenticator(f.client(), nil, zap.New(core))
	_, err := a.Authenticate(newRequest("/api", http.Header{"Authorization": {"Bearer pat:12:glpat-secret"}}))
	if err == nil {
		t.Fatal("no error")
	}
	entries := logs.All()
	if len(entries) != 1 {
		t.Fatalf("%d log entries, want 1", len(entries))
	}
	fields := entries[0].ContextMap()
	if fields["gitlab_path"] != PathAuthorizeProxyUser || fields["agent_id"] != int64(12) || fields["status"] != int64(502) {
		t.Errorf("log fields %v", fields)
	}
	for _, v := range fields {
		if s, ok := v.(string); ok && strings.Contains(s, "glpat-secret") {
			t.Errorf("log carries the token: %v", fields)
		}
	}
}
